"""tools/run_seeds.py: one run per seed (different seeds give different models), mean and std over them."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import run_seeds  # pylint: disable=g-import-not-at-top


@pytest.mark.slow
def test_two_seeds_mean_and_std(tmp_path, capsys):
  data_dir = str(tmp_path / 'tfds')
  out = tmp_path / 'summary.json'
  assert (
    run_seeds.main(
      [
        '--config=configs/vsepp.py:shapes_tiny',
        '--seeds=3,4',
        f'--workdir={tmp_path / "w"}',
        f'--set=data_dir="{data_dir}"',
        '--set=num_epochs=1',
        '--set=batch_size=32',
        '--set=model.embed_size=32',
        '--set=model.word_dim=16',
        f'--json={out}',
      ]
    )
    == 0
  )
  summary = json.loads(out.read_text())
  a, b = summary['per_seed']['3'], summary['per_seed']['4']
  assert a != b  # the seed changes init and data order
  for key in ('rsum', 'i2t_r1'):
    assert summary['mean'][key] == pytest.approx((a[key] + b[key]) / 2)
    assert summary['std'][key] == pytest.approx(np.std([a[key], b[key]], ddof=1))
  assert 'mean' in capsys.readouterr().out
  assert os.path.isdir(tmp_path / 'w' / 'seed_3') and os.path.isdir(tmp_path / 'w' / 'seed_4')


def test_bad_arguments_are_refused():
  with pytest.raises(SystemExit):
    run_seeds.main(['--config=configs/vsepp.py:shapes_tiny', '--seeds=1,1', '--workdir=/tmp/x'])
  with pytest.raises(ValueError, match='no field .nope'):
    run_seeds.apply_sets(run_seeds.load_config('configs/vsepp.py:shapes_tiny'), ['nope=1'])
