"""tools/paper_dry_run.py end to end at a tiny scale: synthetic Flickr30K-shaped data through the build, lazy training
of SCAN and RDAN and every evaluation, with a report that has every row and sane values. (The timings themselves
are measured by the tool, never tested.)"""

import json
import os
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import paper_dry_run  # pylint: disable=g-import-not-at-top

from xmatch_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top

FIXTURE_CAPTIONS = os.path.join(paper_dry_run.FIXTURES, 'train_caps.txt')


def test_captions_copy_the_fixture_lengths(tmp_path):
  sampler = paper_dry_run.CaptionSampler(FIXTURE_CAPTIONS, os.path.join(paper_dry_run.FIXTURES, 'f30k_vocab.json'))
  path = tmp_path / 'caps.txt'
  sampler.write(str(path), 3000, np.random.default_rng(0), chunk=700)
  lines = path.read_text().splitlines()
  lengths = np.array([len(vocab_lib.tokenize(line)) for line in lines])
  stats = sampler.stats
  assert len(lines) == 3000 and stats['fixture_captions'] == 250
  assert lengths.min() >= stats['tokens_per_caption_min'] and lengths.max() <= stats['tokens_per_caption_max']
  assert abs(lengths.mean() - stats['tokens_per_caption_mean']) < 0.5
  assert stats['word_pool'] > 8000  # the fixture's words and the rest of SCAN's f30k vocabulary


def test_plan_uses_the_paper_names_only_at_full_scale():
  full = paper_dry_run.plan(1.0, True, 128)
  assert full['dataset'] == 'f30k' and full['f30k_images'] == {'train': 29000, 'dev': 1000, 'test': 1000}
  assert full['coco_images']['testall'] == 5000 and full['coco_split'] == 'testall'
  small = paper_dry_run.plan(0.02, True, 128)
  assert small['dataset'] == 'precomp' and small['f30k_images'] == {'train': 580, 'dev': 20, 'test': 20}
  assert small['coco_images']['test'] == 100
  disk = paper_dry_run.disk_needed(full, 2)
  assert 18e9 < disk['needed_bytes'] < 25e9  # two copies of (31,000 + 5,003) x 36 x 2048 float32, checkpoints
  with pytest.raises(paper_dry_run.errors.UserError, match='fewer than a batch'):
    paper_dry_run.plan(0.0005, False, 128)


def test_refuses_before_writing_when_the_disk_is_short(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(paper_dry_run, '_free_bytes', lambda path: 1 << 30)
  with pytest.raises(paper_dry_run.errors.UserError, match=r'1.00 GiB free, 2[0-9.]+ GiB needed'):
    paper_dry_run.main([f'--dir={tmp_path / "dry"}', '--coco_5k'])
  assert 'disk: 2' in capsys.readouterr().out and not (tmp_path / 'dry').exists()


@pytest.mark.parametrize(
  'argv, error',
  [
    (['--models=scan', '--exhaustive=rdan', '--coco_5k'], r'--exhaustive=rdan: expected models of --models \(scan\)'),
    (['--models=scan,rdan', '--exhaustive=scan', '--coco_5k', '--rerank_k=0'], 'needs --coco_5k and --rerank_k > 0'),
    (['--models=scan,rdan', '--exhaustive=scan'], 'needs --coco_5k and --rerank_k > 0'),
    (['--evaluations=coco_5k'], r'--evaluations=coco_5k: expected some of f30k_1k \(--helpshort'),
    (['--coco_5k', '--evaluations=coco_5k_rerank10'], 'expected some of f30k_1k,coco_5k,coco_5k_rerank100'),
  ],
)
def test_a_model_left_out_of_the_exhaustive_coco_5k_must_be_reranked(tmp_path, capsys, argv, error):
  with pytest.raises(SystemExit) as exit_:
    paper_dry_run.main([f'--dir={tmp_path / "dry"}'] + argv)
  assert exit_.value.code == 2 and re.search(error, capsys.readouterr().err)
  assert not (tmp_path / 'dry').exists()


def test_the_table_says_which_evaluation_a_model_did_not_run():
  def evaluation(n_images):
    return {'scoring_seconds': 2.0, 'seconds': 3.0, 'peak_rss_bytes': 1 << 30, 'n_images': n_images, 'n_captions': 5}

  train = {'steps_per_s': 0.5, 'data_share': 0.01, 'peak_rss_bytes': 2 << 30}
  report = {
    'evaluations': [('f30k_1k', [], 'test'), ('coco_5k', [], 'test'), ('coco_5k_rerank100', [], 'test')],
    'models': {
      'scan': {'train': train, 'evaluations': {'f30k_1k': evaluation(1), 'coco_5k': evaluation(5)}},
      'rdan': {'train': train, 'evaluations': {'f30k_1k': evaluation(1), 'coco_5k_rerank100': evaluation(5)}},
    },
    'batch_size': 128,
    'scale': 1.0,
  }
  table = paper_dry_run.format_table(report).splitlines()
  assert table[2].endswith('| 2.0 (3) | 2.0 (3) | not run |') and table[3].endswith('| 2.0 (3) | not run | 2.0 (3) |')
  assert table[4].endswith('f30k_1k: 1 x 5, coco_5k: 5 x 5, coco_5k_rerank100: 5 x 5)')


@pytest.mark.parametrize('scale', [1.0, 0.02])
def test_evaluation_flags_agree_with_evaluate(scale):
  """The protocols and dataset overrides the tool passes are accepted by evaluate, and the result file it copies is
  the one evaluate writes (scale 1 is never run by the tests: this checks its f30k_1k / coco_5k names)."""
  from xmatch_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from xmatch_jax import workdirs  # pylint: disable=g-import-not-at-top

  layout = paper_dry_run.plan(scale, True, 128)
  for label, extra, name in paper_dry_run.evaluations(layout, True, 100, '/scratch'):
    given = dict(arg[2:].split('=', 1) for arg in extra)
    dataset = given.get('config.dataset', layout['dataset'])
    split, _, protocol = metrics_lib.resolve_protocol(given.get('protocol'), dataset, given.get('split'))
    cross = dataset if dataset != layout['dataset'] else ''
    assert workdirs.result_name(split, int(given.get('rerank_k', 0)), dataset=cross) == name, label
    if label.startswith('coco_5k'):
      assert split == layout['coco_split'] and (protocol == 'coco_5k') == (scale == 1.0)
    else:
      assert split == 'test' and (protocol == 'f30k_1k') == (scale == 1.0)


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
  out = tmp_path / 'report.json'
  scratch = tmp_path / 'dry'
  # Batch, scoring tiles and k shrunk so that the 12 child processes stay quick; the tool's defaults are the paper's.
  argv = [
    f'--dir={scratch}',
    '--scale=0.004',
    '--steps=2',
    '--models=scan',  # RDAN goes through the same commands; one model keeps this test short
    '--coco_5k',
    '--rerank_k=8',
    '--set=batch_size=32',
    '--set=eval_image_chunk=8',
    '--set=eval_text_batch=40',
    f'--json={out}',
  ]
  assert paper_dry_run.main(argv) == 0
  report = json.loads(out.read_text())
  assert report['layout']['f30k_images'] == {'train': 116, 'dev': 4, 'test': 4}
  assert report['captions']['tokens_per_caption_max'] >= report['captions']['tokens_per_caption_mean'] > 0
  labels = ['f30k_1k', 'coco_5k', 'coco_5k_rerank8']
  assert [e[0] for e in report['evaluations']] == labels
  assert set(report['models']) == {'scan'}
  for model, entry in report['models'].items():
    train = entry['train']
    assert train['steps_per_s'] > 0 and 0 < train['data_share'] < 1, (model, train)
    assert len(train['step_seconds']) == 2 and len(train['batch_seconds']) == 2
    assert train['peak_rss_bytes'] > 100 << 20
    assert set(entry['evaluations']) == set(labels)
    for label, e in entry['evaluations'].items():
      assert e['scoring_seconds'] > 0 and e['seconds'] > 0 and e['peak_rss_bytes'] > 0, (model, label, e)
      assert os.path.isfile(e['json']) and json.load(open(e['json']))['n_images'] == e['n_images']
    assert entry['evaluations']['f30k_1k']['n_images'] == 4 and entry['evaluations']['f30k_1k']['tiles'] == 1
    assert entry['evaluations']['coco_5k']['tiles'] == 3 * 3  # 20 images / 8 per chunk x 100 captions / 40 per batch
    assert entry['evaluations']['coco_5k']['n_captions'] == 5 * 20
    assert json.load(open(entry['evaluations']['coco_5k_rerank8']['json']))['rerank_k'] == 8
  for build in report['builds'].values():
    assert build['peak_rss_bytes'] > 0 and build['written_bytes'] > 0
  # The features are deleted (no --keep); runs, logs and results stay.
  assert not (scratch / 'tfds').exists() and not (scratch / 'tfds_coco').exists()
  assert (scratch / 'runs' / 'scan' / 'metrics.jsonl').is_file()
