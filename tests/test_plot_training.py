"""tools/plot_training.py: a PNG from metrics.jsonl, and clear errors for bad files."""

import json
import os
import sys

from PIL import Image
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import plot_training  # pylint: disable=g-import-not-at-top


def _write(workdir, records):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in records) + '\n')


@pytest.mark.slow
def test_plots_every_series(tmp_path):
  _write(
    tmp_path / 'a',
    [{'step': s, 'loss': 10 / s, 'learning_rate': 1e-3} for s in range(1, 50)] + [{'step': 49, 'dev_rsum': 123.0}],
  )
  series = plot_training.read_metrics(str(tmp_path / 'a'))
  assert len(series['loss'][0]) == 49 and series['dev_rsum'] == ([49], [123.0])
  out = tmp_path / 'plots' / 'p.png'
  assert plot_training.main([f'--workdir={tmp_path / "a"}', f'--workdir={tmp_path / "a"}', f'--out={out}']) == 0
  assert Image.open(out).size[0] > 1000


def test_bad_files_name_file_and_line(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    plot_training.read_metrics(str(tmp_path))
  _write(tmp_path, [{'step': 1, 'loss': 1.0}])
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"loss": 2.0}\n{oops\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:2: record has no "step"'):
    plot_training.read_metrics(str(tmp_path))
