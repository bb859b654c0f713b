"""End to end on the tiny shapes split: training learns, evaluation writes the protocol's keys, runs resume
exactly, the Retriever agrees with evaluation, and bad input is refused with a clear message."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import scan as scan_config
from configs import vsepp as vsepp_config
from xmatch_jax import Retriever
from xmatch_jax import evaluate
from xmatch_jax import losses
from xmatch_jax import metrics as metrics_lib
from xmatch_jax import run_setup
from xmatch_jax import trainers
from xmatch_jax import workdirs
from xmatch_jax.checkpoints import RunCheckpoints
from xmatch_jax.data import batching
from xmatch_jax.data import load_split
from xmatch_jax.data import validation
from xmatch_jax.trainers import loop
from xmatch_jax.trainers import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, module=scan_config, **overrides):
  c = module.get_config('shapes_tiny')
  c.data_dir = data_dir
  c.batch_size = 32
  c.num_epochs = 2
  c.log_every_steps = 10
  c.checkpoint_every_steps = 20
  c.model.embed_size = 64
  c.model.word_dim = 32
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('scan_run'))
  config = tiny_config(data_dir, num_epochs=6, **{'model.embed_size': 256, 'model.word_dim': 128})
  dev = trainers.train_and_evaluate(config, workdir)
  return workdir, config, dev


def _params(workdir):
  state, _, _ = RunCheckpoints(workdir).restore_for_eval()
  return state['params']


@pytest.mark.slow
def test_training_learns_far_above_chance(trained):
  workdir, _, dev = trained
  # Chance rsum on 100 images / 500 captions is ~32 (R@K = K% each way, i2t a little higher with 5 positives).
  assert dev['rsum'] > 120, dev
  lines = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  losses = [line['loss'] for line in lines if 'loss' in line]
  assert losses[-1] < losses[0]


@pytest.mark.slow
def test_evaluate_writes_protocol_keys(trained):
  workdir, _, _ = trained
  result = evaluate.evaluate_workdir(workdir, split='test')
  saved = json.load(open(os.path.join(workdir, 'eval', 'test.json')))
  for key in ('i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10', 'rsum'):
    assert saved[key] == pytest.approx(result[key])
  assert saved['rsum'] == pytest.approx(sum(saved[k] for k in metrics_lib.RESULT_KEYS[:6]))
  assert saved['n_images'] == 100 and saved['n_captions'] == 500

  # Two-stage retrieval: shortlisting every item reproduces exhaustive scoring; a short list is written apart.
  every = evaluate.evaluate_workdir(workdir, split='test', rerank_k=500)
  for key in metrics_lib.RESULT_KEYS:
    assert every[key] == pytest.approx(result[key])
  short = evaluate.evaluate_workdir(workdir, split='test', rerank_k=5)
  assert short['rerank_k'] == 5 and os.path.exists(os.path.join(workdir, 'eval', 'test_rerank5.json'))
  assert short['t2i_r5'] <= 100 and short['rsum'] != result['rsum']


@pytest.mark.slow
def test_topk_lists_and_cross_dataset_evaluation_with_1_to_n_captions(trained, data_dir, tmp_path, monkeypatch):
  workdir, _, _ = trained
  result = evaluate.evaluate_workdir(workdir, split='test', save_scores=True, topk=3)
  sims = np.load(os.path.join(workdir, 'eval', 'test_scores.npy'))
  lists = json.load(open(os.path.join(workdir, 'eval', 'test_topk.json')))
  test = load_split('shapes_tiny', 'test', data_dir)
  ids = test.images['image_id']
  for i in (0, 57):  # the k best of the dense matrix, best first, with ids
    entry = lists['i2t'][i]
    assert entry['image_id'] == ids[i] and entry['captions'] == list(np.argsort(-sims[i], kind='stable')[:3])
    np.testing.assert_allclose(entry['scores'], np.sort(sims[i])[::-1][:3], rtol=1e-6)
  entry = lists['t2i'][123]
  assert entry['text'] == test.captions[123]
  assert entry['image_ids'] == [int(ids[j]) for j in np.argsort(-sims[:, 123], kind='stable')[:3]]
  assert len(lists['i2t']) == 100 and len(lists['t2i']) == 500 and result['n_captions'] == 500

  # The same test images as custom precomp data with ids and 1-3 captions each, evaluated from the shapes run.
  manual = tmp_path / 'manual' / 'custom_precomp'
  manual.mkdir(parents=True)
  rng = np.random.default_rng(0)
  keep = np.sort(
    np.concatenate(
      [np.arange(0, 500, 5), rng.choice(np.setdiff1d(np.arange(500), np.arange(0, 500, 5)), 150, replace=False)]
    )
  )
  for split in ('train', 'dev', 'test'):
    np.save(manual / f'{split}_ims.npy', np.asarray(test.images['regions'], np.float32))
    (manual / f'{split}_caps.txt').write_text(''.join(test.captions[c] + '\n' for c in keep))
    (manual / f'{split}_caption_images.txt').write_text(''.join(f'{c // 5}\n' for c in keep))
    (manual / f'{split}_ids.txt').write_text(''.join(f'{1000 + i}\n' for i in range(100)))
  monkeypatch.setenv('XMATCH_MANUAL_DIR', str(tmp_path / 'manual'))
  cross = evaluate.evaluate_workdir(
    workdir,
    split='test',
    topk=2,
    save_scores=True,
    overrides={'dataset': 'precomp', 'data_dir': str(tmp_path / 'tfds')},
  )
  # The cross-dataset matrix and layout are saved under the dataset's name, beside (not over) the run's own.
  np.testing.assert_array_equal(np.load(workdirs.scores_path(workdir, 'test')), sims)
  np.testing.assert_array_equal(np.load(workdirs.scores_path(workdir, 'test', 'precomp')), sims[:, keep])
  with np.load(workdirs.layout_path(workdir, 'test', 'precomp')) as layout:
    np.testing.assert_array_equal(layout['caption_to_image'], keep // 5)
  assert cross['dataset'] == 'precomp' and cross['trained_on'] == 'shapes_tiny' and cross['n_captions'] == 250
  assert cross == json.load(open(os.path.join(workdir, 'eval', 'precomp_test.json')))
  want = metrics_lib.recall_metrics(sims[:, keep], caption_to_image=keep // 5)
  for key in metrics_lib.RESULT_KEYS:
    assert cross[key] == pytest.approx(want[key], abs=1e-9)
  topk = json.load(open(os.path.join(workdir, 'eval', 'precomp_test_topk.json')))
  assert topk['i2t'][4]['image_id'] == 1004 and len(topk['t2i'][0]['image_ids']) == 2
  with pytest.raises(ValueError, match='not an evaluation field'):
    evaluate.evaluate_workdir(workdir, overrides={'batch_size': 3})


@pytest.mark.slow
def test_bundle_round_trip_scores_as_the_workdir(trained, data_dir, tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, 'tools'))
  import export_bundle  # pylint: disable=g-import-not-at-top

  from configs import from_json  # pylint: disable=g-import-not-at-top

  workdir, _, _ = trained
  evaluate.evaluate_workdir(workdir, split='test')
  out = str(tmp_path / 'bundle')
  assert export_bundle.main([f'--workdir={workdir}', f'--out={out}']) == 0
  assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'eval', 'model.safetensors', 'vocab.json']
  test = load_split('shapes_tiny', 'test', data_dir)
  images, captions = {'regions': test.images['regions'][:7]}, test.captions[:11]
  bundled = Retriever.from_pretrained(out)
  np.testing.assert_array_equal(
    bundled.score(images, captions), Retriever.from_workdir(workdir).score(images, captions)
  )
  assert bundled.checkpoint == 'best'
  card = open(os.path.join(out, 'README.md')).read()
  result = json.load(open(os.path.join(workdir, 'eval', 'test.json')))
  assert f'{result["rsum"]:.1f}' in card and 'configs/from_json.py:THIS_DIRECTORY/config.json' in card
  # The bundle's config trains again as it is: configs/from_json.py gives the run's config without data_info.
  again = from_json.get_config(os.path.join(out, 'config.json'))
  want = workdirs.load_config(workdir)
  del want['data_info']
  assert again.to_json(sort_keys=True) == want.to_json(sort_keys=True)
  with pytest.raises(ValueError, match='exists and is not empty'):
    bundled.save_pretrained(out)
  with pytest.raises(FileNotFoundError, match='is not a bundle'):
    Retriever.from_pretrained(workdir)


def test_protocols_refuse_wrong_split_sizes():
  sims = np.random.default_rng(0).normal(size=(100, 500))
  with pytest.raises(ValueError, match='1000 images'):
    metrics_lib.protocol_metrics(sims, '1k')
  with pytest.raises(ValueError, match='5000 images'):
    metrics_lib.protocol_metrics(sims, '5k')
  folds = metrics_lib.protocol_metrics(sims, 'fold5')
  assert folds['rsum'] == pytest.approx(sum(folds[k] for k in metrics_lib.RESULT_KEYS[:6]))


@pytest.mark.slow
def test_retriever_matches_evaluation_scores(trained, data_dir):
  workdir, _, _ = trained
  images, captions, _ = load_split('shapes_tiny', 'test', data_dir)
  r = Retriever.from_workdir(workdir)
  subset = {k: v[:7] for k, v in images.items()}
  scores = r.score(subset, captions[:11])
  assert scores.shape == (7, 11) and np.isfinite(scores).all()
  # The same pairs scored within the whole split give the same numbers (chunking does not matter).
  full = r.score(images, captions[:11])
  np.testing.assert_allclose(scores, full[:7], atol=1e-5)
  shortlisted = r.score(images, captions[:11], rerank_k=3)  # two-stage: each caption's 3 shortlisted images
  top = np.argsort(-shortlisted, axis=0, kind='stable')[:3]
  np.testing.assert_allclose(np.take_along_axis(shortlisted, top, 0), np.take_along_axis(full, top, 0), atol=1e-5)
  unk = r.score(subset, ['a zebra xylophone'])  # unknown words map to <unk>
  assert np.isfinite(unk).all()
  with pytest.raises(ValueError, match='empty'):
    r.score(subset, ['  '])
  with pytest.raises(ValueError, match='regions'):
    r.score({'regions': subset['regions'][..., :10]}, captions[:2])
  bad = subset['regions'].copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    r.score({'regions': bad}, captions[:2])


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted(data_dir, tmp_path, monkeypatch):
  config = tiny_config(data_dir, num_epochs=1)
  full_dir, cut_dir = str(tmp_path / 'full'), str(tmp_path / 'cut')
  trainers.train_and_evaluate(config, full_dir)

  original = batching.TrainBatcher.batch

  def crash_at_25(self, step):
    if step == 25:  # after the checkpoint at step 20
      raise KeyboardInterrupt('simulated kill')
    return original(self, step)

  monkeypatch.setattr(batching.TrainBatcher, 'batch', crash_at_25)
  with pytest.raises(KeyboardInterrupt):
    trainers.train_and_evaluate(config, cut_dir)
  monkeypatch.setattr(batching.TrainBatcher, 'batch', original)
  assert RunCheckpoints(cut_dir).latest.latest_step() == 20
  trainers.train_and_evaluate(config, cut_dir)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), _params(full_dir), _params(cut_dir)
  )


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'nan')
  config = tiny_config(data_dir, num_epochs=1)
  trainers.train_and_evaluate(config, workdir)
  good_step = RunCheckpoints(workdir).latest.latest_step()
  good = _params(workdir)
  monkeypatch.setattr(losses, 'contrastive_loss', lambda scores, *a, **k: jnp.sum(scores) * jnp.nan)
  monkeypatch.setattr(losses, 'hardest_negative_loss', lambda positive, *a, **k: jnp.sum(positive) * jnp.nan)
  with pytest.raises(FloatingPointError, match='last good checkpoint'):
    trainers.train_and_evaluate(tiny_config(data_dir, num_epochs=2), workdir)
  assert RunCheckpoints(workdir).latest.latest_step() == good_step
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), good, _params(workdir))


@pytest.mark.slow
def test_workdir_of_another_model_is_refused(trained, data_dir):
  workdir, _, _ = trained
  with pytest.raises(ValueError, match="model 'scan'.*model 'vsepp'"):
    trainers.train_and_evaluate(tiny_config(data_dir, module=vsepp_config), workdir)


@pytest.mark.slow
def test_vsepp_trains_two_epochs_with_a_sum_of_violations_warmup(data_dir, tmp_path):
  workdir = str(tmp_path / 'v')
  config = tiny_config(data_dir, module=vsepp_config, num_epochs=2, log_every_steps=1, **{'loss.warmup_epochs': 1})
  dev = trainers.train_and_evaluate(config, workdir)
  assert np.isfinite(dev['rsum'])
  logged = {r['step']: r['loss'] for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl'))) if 'loss' in r}
  per_epoch = 1500 // 32
  hardest_at_most = 2 * 32 * config.loss.margin + 1e-3  # the hardest-negative loss with equal scores; the sum
  assert logged[1] > 5 * hardest_at_most  # over all 31 negatives per query starts far above it
  assert max(logged[s] for s in range(per_epoch + 1, 2 * per_epoch + 1)) < 2 * hardest_at_most


def test_collapse_watch_warns_once_after_a_run_at_the_collapse_value():
  watch = loop.CollapseWatch(losses.collapse_value(128, 0.2, True), intervals=3)
  assert watch.collapsed_loss == pytest.approx(51.2)
  assert [watch.update(v) for v in (51.2, 51.3, 40.0, 51.2, 51.0, 51.25, 51.2, 51.2)] == [
    False,
    False,
    False,
    False,
    False,
    True,
    False,
    False,
  ]
  assert '2 x batch x margin' in watch.message(100)


@pytest.mark.parametrize(
  'key, value, message',
  [
    ('model.block_size', 0, 'block_size'),
    ('loss.margin', -0.1, 'margin'),
    ('batch_size', 1, 'batch_size'),
    ('loss.warmup_epochs', 3, 'warmup_epochs'),
  ],
)
def test_impossible_config_values(data_dir, tmp_path, key, value, message):
  with pytest.raises(ValueError, match=message):
    trainers.train_and_evaluate(tiny_config(data_dir, **{key: value}), str(tmp_path))


@pytest.mark.slow
def test_paper_dataset_without_its_files(tmp_path, monkeypatch):
  monkeypatch.setenv('XMATCH_MANUAL_DIR', str(tmp_path / 'manual'))
  config = scan_config.get_config('f30k')
  config.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(FileNotFoundError, match=r'manual/f30k_precomp: manual dir not found'):
    trainers.train_and_evaluate(config, str(tmp_path / 'w'))
  config.dataset = 'flickr8k'
  with pytest.raises(ValueError, match="no dataset builder named 'flickr8k'"):
    trainers.train_and_evaluate(config, str(tmp_path / 'w2'))
  with pytest.raises(ValueError, match='unknown dataset'):
    scan_config.get_config('flickr')


@pytest.mark.slow
def test_unknown_config_key_on_command_line(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'xmatch_jax.train',
      '--config=configs/scan.py:shapes_tiny',
      f'--workdir={tmp_path}',
      '--config.model.embed_sise=3',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0
  assert (
    "--config.model.embed_sise: config.model of configs/scan.py:shapes_tiny has no field 'embed_sise'. "
    "Did you mean 'embed_size'?"
  ) in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  with pytest.raises(ValueError, match=r'--config.optim.learning_rate.x: config.optim.learning_rate of .* is a value'):
    run_setup.check_config_overrides([f'--config={ROOT}/configs/scan.py:shapes', '--config.optim.learning_rate.x=1'])
  with pytest.raises(
    ValueError, match=r"the config of .*configs/scan.py has no field 'nope'.* Its fields: .*batch_size"
  ):
    run_setup.check_config_overrides(['--config', f'{ROOT}/configs/scan.py', '--config.nope', '2'])
  run_setup.check_config_overrides(
    [f'--config={ROOT}/configs/scan.py', '--config.model.embed_size=3', '--noconfig.seed']
  )


def test_split_validation_errors():
  regions = np.zeros((2, 3, 4), np.float32)
  with pytest.raises(ValueError, match=r'expected 5 x 2 = 10'):
    validation.check_split({'regions': regions}, ['a b'] * 9, np.arange(9) // 5, 'src')
  with pytest.raises(ValueError, match='feature size 4; expected 8'):
    validation.check_split({'regions': regions}, ['a b'] * 10, np.arange(10) // 5, 'src', region_dim=8)
  bad = regions.copy()
  bad[1, 2, 3] = np.inf
  with pytest.raises(ValueError, match='NaN or inf in 1 image.*index 1'):
    validation.check_split({'regions': bad}, ['a b'] * 10, np.arange(10) // 5, 'src')
  with pytest.raises(ValueError, match='caption 3 is empty'):
    validation.check_split({'regions': regions}, ['a b'] * 3 + [''] + ['a'] * 6, np.arange(10) // 5, 'src')


@pytest.mark.slow
def test_retrieve_ranks_by_the_retrievers_scores(trained, data_dir, monkeypatch, capsys):
  from xmatch_jax import retrieve  # pylint: disable=g-import-not-at-top

  workdir, _, _ = trained
  monkeypatch.setenv('XMATCH_DATA_DIR', data_dir)
  split = load_split('shapes_tiny', 'test', data_dir)
  r = Retriever.from_workdir(workdir)
  caption = split.captions[12]
  top = retrieve.run(workdir, 'test', caption, None, 3)
  scores = r.score(split.images, [caption])[:, 0]
  assert [i for i, _ in top] == list(np.argsort(-scores, kind='stable')[:3])
  assert top[0][1] >= top[1][1] >= top[2][1]
  by_image = retrieve.run(workdir, 'test', None, 4, 10)
  assert len(by_image) == 10 and 'captions of shapes_tiny/test for image 4' in capsys.readouterr().out
  with pytest.raises(ValueError, match='exactly one'):
    retrieve.run(workdir, 'test', caption, 4, 3)
  with pytest.raises(ValueError, match='outside the split'):
    retrieve.run(workdir, 'test', None, 100, 3)
  out = subprocess.run(
    [sys.executable, '-m', 'xmatch_jax.retrieve', f'--workdir={workdir}', '--caption', caption, '-k', '2'],
    capture_output=True,
    text=True,
    env={**os.environ, 'XMATCH_DATA_DIR': data_dir},
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert f'  1. image {top[0][0]:5d}' in out.stdout and '  3.' not in out.stdout


def test_named_protocols_fix_dataset_and_split():
  assert metrics_lib.resolve_protocol('coco_5k', 'coco', None) == ('testall', '5k', 'coco_5k')
  assert metrics_lib.resolve_protocol('coco_1k_fold5', 'coco', 'testall') == ('testall', 'fold5', 'coco_1k_fold5')
  assert metrics_lib.resolve_protocol('f30k_1k', 'f30k', None) == ('test', '1k', 'f30k_1k')
  assert metrics_lib.resolve_protocol(None, 'shapes', None) == ('test', None, None)
  with pytest.raises(ValueError, match="'coco_5k' evaluates split 'testall'; got --split=test"):
    metrics_lib.resolve_protocol('coco_5k', 'coco', 'test')
  with pytest.raises(ValueError, match="defined on dataset 'f30k'; this workdir was trained on 'shapes'"):
    metrics_lib.resolve_protocol('f30k_1k', 'shapes', None)


@pytest.mark.slow
def test_ensemble_of_two_runs_is_the_weighted_score_sum(trained, data_dir, tmp_path, monkeypatch):
  from xmatch_jax import ensemble  # pylint: disable=g-import-not-at-top
  from xmatch_jax import metrics  # pylint: disable=g-import-not-at-top

  workdir, _, _ = trained
  other = str(tmp_path / 'vsepp')
  trainers.train_and_evaluate(tiny_config(data_dir, module=vsepp_config, num_epochs=1), other)
  result = ensemble.ensemble([workdir, other], [0.7, 0.3], 'test')
  a = np.load(workdirs.scores_path(workdir, 'test'))
  b = np.load(workdirs.scores_path(other, 'test'))
  assert result['rsum'] == pytest.approx(metrics.recall_metrics(0.7 * a.astype(np.float64) + 0.3 * b)['rsum'])
  assert result['protocol'] == 'all' and result['weights'] == [0.7, 0.3] and result['kind'] == 'ensemble'
  assert json.load(open(os.path.join(workdir, 'eval', 'test.json')))['kind'] == 'single'
  with pytest.raises(ValueError, match='at least 2'):
    ensemble.ensemble([workdir])


@pytest.mark.parametrize('suffix', ['safetensors', 'npz'])
@pytest.mark.slow
def test_export_params_writes_every_variable_under_its_path(trained, tmp_path, suffix):
  sys.path.insert(0, os.path.join(ROOT, 'tools'))
  import export_params  # pylint: disable=g-import-not-at-top

  workdir, config, _ = trained
  out = str(tmp_path / f'p.{suffix}')
  assert export_params.main([f'--workdir={workdir}', f'--out={out}']) == 0
  if suffix == 'safetensors':
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top

    with safe_open(out, 'np') as f:
      loaded = {k: f.get_tensor(k) for k in f.keys()}
      assert f.metadata()['model'] == 'scan'
      assert json.loads(f.metadata()['config'])['model']['embed_size'] == config.model.embed_size
  else:
    loaded = dict(np.load(out))
    assert json.loads(str(loaded.pop('__config__')))['model']['name'] == 'scan'
  params = _params(workdir)
  want = {
    'params/' + '/'.join(str(p.key) for p in path): np.asarray(v)
    for path, v in jax.tree_util.tree_leaves_with_path(params)
  }
  assert sorted(loaded) == sorted(want) and 'params/image_encoder/fc/kernel' in loaded
  for key, value in want.items():
    np.testing.assert_array_equal(loaded[key], value)


def test_learning_rate_decays_every_lr_decay_epochs_as_the_official_code():
  """SCAN / GLFN adjust_learning_rate: lr * 0.1 ** (epoch // lr_update); warm-up ramps linearly from 0."""
  config = ml_collections.ConfigDict(
    {'learning_rate': 2e-4, 'lr_decay_epochs': 15, 'lr_decay_factor': 0.1, 'grad_clip': 0.0, 'warmup_steps': 0}
  )
  _, schedule = optim.make_optimizer(config, steps_per_epoch=10)
  for epoch, want in ((0, 2e-4), (14, 2e-4), (15, 2e-5), (29, 2e-5), (30, 2e-6), (39, 2e-6)):
    assert float(schedule(epoch * 10)) == pytest.approx(want, rel=1e-6), epoch
  config.warmup_steps = 100
  _, schedule = optim.make_optimizer(config, steps_per_epoch=10)
  assert [float(schedule(s)) for s in (0, 50)] == pytest.approx([0.0, 1e-4])
  assert float(schedule(149)) == pytest.approx(2e-4) and float(schedule(150)) == pytest.approx(2e-5)
