"""tools/compare_models.py: equal budgets enforced, per-model overrides, fused entries, mean +- std over seeds."""

import json
import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import compare_models  # pylint: disable=g-import-not-at-top

TINY = ['num_epochs=1', 'batch_size=32', 'model.embed_size=32', 'model.word_dim=16']


@pytest.mark.slow
def test_fused_model_over_two_seeds(tmp_path, capsys):
  data_dir = str(tmp_path / 'tfds')
  sets = [f'--set={s}' for s in TINY + [f'data_dir="{data_dir}"']]
  spec = 'configs/vsepp.py:shapes_tiny'
  assert compare_models.main([f'--model=fused={spec}+{spec}', '--seeds=3,4', f'--workdir={tmp_path / "w"}', *sets]) == 0
  summary = json.loads((tmp_path / 'w' / 'summary.json').read_text())
  fused = summary['models']['fused']
  assert fused['per_seed']['3'] != fused['per_seed']['4']  # the seed reaches every run
  for seed in ('3', '4'):
    # Two parts with the same config and seed train the same model: their equal-weight fusion scores as one run.
    part = json.loads((tmp_path / 'w' / 'fused' / f'seed_{seed}' / 'part_0' / 'eval' / 'test.json').read_text())
    assert fused['per_seed'][seed] == {k: part[k] for k in fused['per_seed'][seed]}
    assert (tmp_path / 'w' / 'fused' / f'seed_{seed}' / 'eval' / 'test_fused.json').exists()
  rsums = [fused['per_seed'][s]['rsum'] for s in ('3', '4')]
  assert fused['mean']['rsum'] == pytest.approx(np.mean(rsums))
  assert fused['std']['rsum'] == pytest.approx(np.std(rsums, ddof=1))
  assert summary['budget'] == ['shapes_tiny', 'epochs', 1]
  out = capsys.readouterr().out
  assert 'rsum mean +- std' in out
  assert re.search(rf'{fused["mean"]["rsum"]:.1f} \+- +{fused["std"]["rsum"]:.1f}\n', out), out


def test_unequal_budgets_are_refused():
  models = compare_models.parse_models(['a=configs/scan.py:shapes', 'b=configs/rdan.py:shapes'])
  sets = compare_models.split_sets(['num_epochs=2', 'b:num_epochs=1'], models)
  assert sets == {'a': ['num_epochs=2'], 'b': ['num_epochs=2', 'num_epochs=1']}
  with pytest.raises(ValueError, match=r'different budgets.*b \(configs/rdan.py:shapes\): \(.shapes., .epochs., 1\)'):
    compare_models.build_configs(models, sets)
  # Equal caption counts at different batch sizes are an equal budget.
  sets = compare_models.split_sets(['max_steps=10', 'a:batch_size=64', 'b:batch_size=32', 'b:max_steps=20'], models)
  configs = compare_models.build_configs(models, sets)
  assert compare_models.budget_of(configs['a'][0]) == ('shapes', 'captions', 640)


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match='expected NAME=configs'):
    compare_models.parse_models(['configs/scan.py:shapes'])
  with pytest.raises(ValueError, match='used twice'):
    compare_models.parse_models(['a=configs/scan.py:shapes', 'a=configs/rdan.py:shapes'])
  with pytest.raises(ValueError, match="no --model named 'c'"):
    compare_models.split_sets(['c:num_epochs=1'], {'a': None})
  models = compare_models.parse_models(['a=configs/scan.py:shapes', 'd=configs/daer.py:shapes'])
  with pytest.raises(ValueError, match='different budgets'):
    compare_models.build_configs(models, compare_models.split_sets([], models))


def test_glfn_pair_is_fused_by_eq_33():
  models = compare_models.parse_models(['g=configs/glfn.py:shapes,i2t+configs/glfn.py:shapes,t2i'])
  configs = compare_models.build_configs(models, compare_models.split_sets(['model.alpha=0.3'], models))
  assert compare_models.fusion_weights(configs['g']) == pytest.approx([0.3, 0.7])  # alpha S_i2t + (1 - alpha) S_t2i
  models = compare_models.parse_models(['s=configs/scan.py:shapes+configs/scan.py:shapes,i2t+configs/vsepp.py:shapes'])
  configs = compare_models.build_configs(models, compare_models.split_sets([], models))
  assert compare_models.fusion_weights(configs['s']) == pytest.approx([1 / 3] * 3)


def test_summaries_of_comparable_runs_into_one_workdir_merge():
  def summary(models, budget=('shapes', 'epochs', 1)):
    return {'split': 'test', 'seeds': [0, 1], 'budget': list(budget), 'metric': 'rsum', 'models': models}

  merged = compare_models.merge_summary(summary({'a': 1, 'b': 2}), summary({'b': 3, 'c': 4}))
  assert merged['models'] == {'a': 1, 'b': 3, 'c': 4}
  other_budget = summary({'c': 4}, budget=('shapes', 'epochs', 2))
  assert compare_models.merge_summary(summary({'a': 1}), other_budget) == other_budget
