"""tools/benchmark.py: its analytic FLOP counts against XLA's own count, its PyTorch references against the
models, and an end-to-end run writing the JSON report. (Timings are measured by the tool, never tested.)"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from xmatch_jax.models import mmca

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import benchmark  # pylint: disable=g-import-not-at-top


def _model(spec, **overrides):
  config = benchmark.load_config(spec)
  if 'block_size' in config.model:
    config.model.block_size = 1000  # unblocked: XLA's cost analysis does not look inside lax.map
  for key, value in overrides.items():
    config.model[key] = value
  model = benchmark.build(config, vocab_size=50, img_dim=8)  # a BERT-based model: its BERT's vocabulary
  return config, model


def _variables(model, k, n):
  return model.init(
    jax.random.key(0),
    {'regions': jnp.zeros((1, k, 8))},
    {'tokens': jnp.ones((1, n), jnp.int32), 'mask': jnp.ones((1, n))},
  )


@pytest.mark.parametrize(
  'spec,overrides',
  [
    ('configs/rdan.py:f30k', {}),
    ('configs/rdan.py:f30k', {'one_path': True, 'cnn_channels': 8}),
    ('configs/rdan.py:f30k,mu0', {}),
    ('configs/rdan.py:f30k,no_cnn', {}),
    ('configs/scan.py:f30k', {'cross_attn': 't2i'}),
    ('configs/scan.py:f30k', {'cross_attn': 'i2t'}),
    ('configs/vsepp.py:f30k', {}),
    pytest.param('configs/glfn.py:f30k,fused', {'bert_dir': 'minilm'}, marks=pytest.mark.minilm),  # S once, both ways
    pytest.param('configs/glfn.py:f30k,t2i', {'bert_dir': 'minilm'}, marks=pytest.mark.minilm),
    pytest.param('configs/glfn.py:f30k,i2t', {'bert_dir': 'minilm'}, marks=pytest.mark.minilm),
    ('configs/daer.py:wikipedia', {}),
  ],
)
def test_analytic_flops_match_xlas_count(spec, overrides):
  n_img, n_cap, k, n, d = 3, 5, 36, 20, 512
  if spec.startswith('configs/rdan.py'):
    overrides = {**overrides, 'conv_impl': 'xla'}  # XLA cannot count inside the compiled CPU kernel
  _, model = _model(spec, embed_size=d, **overrides)
  image_rep, text_rep = model.example_reps(0, n_img, n_cap, k, n, n)
  fn = jax.jit(lambda v, i, t: model.apply(v, i, t, method=model.pair_scores))
  variables = benchmark.init_pair_head(model, 0, image_rep, text_rep)
  cost = fn.lower(variables, image_rep, text_rep).compile().cost_analysis()
  xla_flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']
  ours = benchmark.scoring_flops(model, n_img, n_cap, k, n)['total']
  # XLA also counts element-wise work (which we leave out) and skips the zero taps of 'same' padding (which
  # we count), so the two agree to a few percent, not exactly.
  assert 0.85 * xla_flops <= ours <= 1.1 * xla_flops, (ours, xla_flops)


def test_mmca_analytic_flops_match_xlas_count():
  tiny_bert = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tiny_bert')
  _, model = _model(
    'configs/mmca.py:f30k', bert_dir=tiny_bert, embed_size=64, num_heads=4, cnn_filters=64, attention_impl='xla'
  )
  n_img, n_cap, k, n = 3, 5, 36, 20
  variables = model.init(jax.random.key(0), *model.example_inputs(regions=k, words=n))
  images, _ = model.example_inputs(batch=n_img, regions=k, words=n, seed=1)
  _, text = model.example_inputs(batch=n_cap, regions=k, words=n, min_len=n, seed=2)
  image_rep = model.apply(variables, images, method=model.encode_image)
  text_rep = model.apply(variables, text, method=model.encode_text)
  fn = jax.jit(lambda v, i, t: model.apply(v, i, t, method=model.pair_scores))
  cost = fn.lower(variables, image_rep, text_rep).compile().cost_analysis()
  xla_flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']
  ours = benchmark.scoring_flops(model, n_img, n_cap, k, n)['total']
  # The text CNN runs as Winograd products (fewer multiplies than the direct count the benchmark reports).
  d, f = model.embed_size, model.cnn_filters
  ours -= n_img * n_cap * (mmca.text_cnn_flops(n, d, f) - mmca.text_cnn_flops(n, d, f, executed=True))
  assert 0.85 * xla_flops <= ours <= 1.1 * xla_flops, (ours, xla_flops)


def _reps(model, *args):
  """model.example_reps as one dict {'regions', 'words', 'mask'}."""
  image_rep, text_rep = model.example_reps(*args)
  return {**image_rep, **text_rep}


def _jax_scores(model, variables, reps):
  return np.asarray(
    model.apply(
      variables, {'regions': reps['regions']}, {'words': reps['words'], 'mask': reps['mask']}, method=model.pair_scores
    )
  )


@pytest.mark.torch
@pytest.mark.parametrize(
  'fields',
  [
    {'cross_attn': 't2i', 'agg_func': 'LogSumExp'},  # SCAN's published t2i head
    {'cross_attn': 'i2t', 'agg_func': 'Mean'},
    {'cross_attn': 't2i', 'agg_func': 'Max'},
  ],
)
def test_torch_scan_loops_equal_the_model_in_both_directions(fields):
  torch = pytest.importorskip('torch')
  config, model = _model('configs/scan.py:f30k', embed_size=16, **fields)
  reps = _reps(model, 4, 6, 7, 9, 11, 3)
  expected = _jax_scores(model, _variables(model, 9, 11), reps)
  m = config.model
  got = benchmark.torch_xattn_official(
    torch.from_numpy(reps['regions']),
    torch.from_numpy(reps['words']),
    reps['mask'].sum(1).astype(int),
    m.cross_attn,
    m.lambda_softmax,
    m.agg_func,
    m.lambda_lse,
  ).numpy()
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize(
  'spec, fields',
  [
    ('configs/glfn.py:f30k,fused', {}),  # eq 33: alpha S_i2t + (1 - alpha) S_t2i, both by the mean
    ('configs/glfn.py:f30k,t2i', {'t2i_agg_func': 'LogSumExp'}),
    ('configs/glfn.py:f30k,official,t2i', {}),  # the extra 0.5 x max attention term
    ('configs/glfn.py:f30k,official,i2t', {}),
  ],
)
def test_torch_glfn_official_loops_equal_the_model(spec, fields):
  torch = pytest.importorskip('torch')
  tiny_bert = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tiny_bert')
  config, model = _model(spec, bert_dir=tiny_bert, embed_size=16, **fields)
  image_rep, text_rep = model.example_reps(5, 6, 7, 9, 11, 3)
  variables = benchmark.init_pair_head(model, 0, image_rep, text_rep)
  expected = np.asarray(model.apply(variables, image_rep, text_rep, method=model.pair_scores))
  got = benchmark.torch_glfn_official(
    torch.from_numpy(np.asarray(image_rep['regions'])),
    torch.from_numpy(np.asarray(text_rep['words'])),
    np.asarray(text_rep['mask']).sum(1).astype(int),
    config.model.to_dict(),
  ).numpy()
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize('block, compiled', [(1, False), (4, False), (100, False), (4, True)])
def test_torch_daer_relation_network_equals_the_model(block, compiled):
  torch = pytest.importorskip('torch')
  config, model = _model('configs/daer.py:wikipedia', embed_size=12, relation_hidden=(10, 6))
  image_rep, text_rep = model.example_reps(6, 7, 9, 1, 1, 1)
  variables = benchmark.init_pair_head(model, 0, image_rep, text_rep)
  expected = np.asarray(model.apply(variables, image_rep, text_rep, method=model.pair_scores))
  got = benchmark.torch_daer(
    torch.from_numpy(np.asarray(image_rep)),
    torch.from_numpy(np.asarray(text_rep)),
    benchmark.flat_params(variables),
    config.model.to_dict(),
    block,
    compiled,
  ).numpy()
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize('block, compiled', [(1, False), (4, False), (100, False), (4, True)])
def test_torch_rdan_head_equals_the_model(block, compiled):
  torch = pytest.importorskip('torch')
  config, model = _model('configs/rdan.py:f30k', cnn_channels=4, embed_size=16)
  reps = _reps(model, 2, 5, 7, 9, 11, 3)
  variables = _variables(model, 9, 11)
  expected = _jax_scores(model, variables, reps)
  got = benchmark.torch_rdan(
    torch.from_numpy(reps['regions']),
    torch.from_numpy(reps['words']),
    torch.from_numpy(reps['mask']),
    benchmark.flat_params(variables),
    config.model.to_dict(),
    block,
    compiled,
  ).numpy()
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize(
  'block, fields, compiled',
  [
    (1, {}, False),
    (3, {'text_norm': 'layernorm', 'cross_attention_scale': 'head', 'projection_bias': True}, False),
    (100, {'alpha': 0.0}, False),
    (3, {}, True),  # torch.compile'd blocks, as `--torch-compile` times them
  ],
)
def test_torch_mmca_head_equals_the_model(block, fields, compiled):
  torch = pytest.importorskip('torch')
  tiny_bert = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tiny_bert')
  config, model = _model(
    'configs/mmca.py:f30k', bert_dir=tiny_bert, embed_size=16, num_heads=4, cnn_filters=6, **fields
  )
  variables = model.init(jax.random.key(0), *model.example_inputs(regions=5, words=9))
  images, _ = model.example_inputs(batch=7, regions=5, words=9, seed=1)
  _, text = model.example_inputs(batch=11, regions=5, words=9, min_len=1, seed=2)  # 1-token captions: no 2-, 3-windows
  image_rep = model.apply(variables, images, method=model.encode_image)
  text_rep = model.apply(variables, text, method=model.encode_text)
  expected = np.asarray(model.apply(variables, image_rep, text_rep, method=model.pair_scores))
  as_torch = lambda rep: {key: torch.from_numpy(np.array(value)) for key, value in rep.items()}
  got = benchmark.torch_mmca(
    as_torch(image_rep), as_torch(text_rep), benchmark.flat_params(variables), config.model.to_dict(), block, compiled
  ).numpy()
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow
def test_cli_writes_the_json_report(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  assert (
    benchmark.main(
      [
        '--config=configs/rdan.py:shapes',
        '--n_images=6',
        '--n_captions=5',
        '--k=8',
        '--n=7',
        '--min_len=3',
        '--embed_size=32',
        '--cnn_channels=4',
        '--block_size=4',
        '--train_batch=4',
        '--repeats=2',
        '--train_repeats=1',
        '--matmul_size=256',
        f'--json={out}',
      ]
    )
    == 0
  )
  report = json.loads(out.read_text())
  for key in ('pairs_per_s', 'pair_gflops_per_s', 'matmul_gflops_per_s', 'peak_memory_bytes', 'train_step_s'):
    assert report[key], key
  assert report['pairs_per_s'] == pytest.approx(30 / report['score_time_s']['median'])
  assert report['pair_gflops_per_s'] == pytest.approx(report['flops']['total'] / report['score_time_s']['median'] / 1e9)
  assert report['sizes']['block_size'] == 4 and report['model']['cnn_channels'] == 4
  assert report['peak_memory_bytes'] >= report['train_peak_host_bytes'] > 0
  assert 'pairs/s' in capsys.readouterr().out


@pytest.mark.parametrize(
  'spec,flags,flop_keys',
  [
    pytest.param(
      'configs/glfn.py:f30k,fused',
      ['--bert_dir=minilm', '--k=8', '--n=7', '--min_len=3', '--train_batch=2'],
      ['similarity', 'attention', 'item_gram'],
      marks=pytest.mark.minilm,
    ),
    ('configs/daer.py:wikipedia', ['--train_batch=0'], ['relation_mlp', 'item_first_layer']),
  ],
)
@pytest.mark.slow
def test_cli_reports_glfn_and_daer(tmp_path, capsys, spec, flags, flop_keys):
  out = tmp_path / 'bench.json'
  assert (
    benchmark.main(
      [
        f'--config={spec}',
        '--n_images=6',
        '--n_captions=5',
        '--embed_size=32',
        '--block_size=4',
        '--repeats=2',
        '--train_repeats=1',
        '--matmul_size=256',
        f'--json={out}',
      ]
      + flags
    )
    == 0
  )
  report = json.loads(out.read_text())
  assert sorted(report['flops']) == sorted(flop_keys + ['total'])
  s = report['sizes']
  model = benchmark.build(ml_collections.ConfigDict({'model': report['model']}), 100, 16)
  assert report['flops'] == benchmark.scoring_flops(model, 6, 5, s['k'], s['n'])
  assert report['pair_gflops_per_s'] == pytest.approx(report['flops']['total'] / report['score_time_s']['median'] / 1e9)
  assert ('train_step_s' in report) == (s['train_batch'] > 0)
  assert 'pairs/s' in capsys.readouterr().out


def test_bad_sizes_are_refused():
  with pytest.raises(SystemExit):
    benchmark.main(['--n=5', '--min_len=9'])
  with pytest.raises(ValueError, match='has no field cnn_channels'):
    benchmark.apply_overrides(benchmark.load_config('configs/scan.py:f30k'), benchmark.parse_args(['--cnn_channels=4']))
  with pytest.raises(ValueError, match='pass --bert_dir'):
    benchmark.main(['--config=configs/glfn.py:f30k', '--train_batch=0'])
  with pytest.raises(ValueError, match='DAER trains in stages'):
    benchmark.main(['--config=configs/daer.py:wikipedia', '--train_batch=4'])


@pytest.mark.parametrize('json_args', [['--json=r.json'], ['--json', 'r.json'], ['-json', 'r.json']])
def test_recorded_command_leaves_out_the_json_destination(json_args):
  argv = ['--config=configs/rdan.py:f30k', *json_args, '--n=20']
  assert benchmark.command_args(argv) == ['--config=configs/rdan.py:f30k', '--n=20']
