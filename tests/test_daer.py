"""DAER matcher: the text module against a numpy LSTM + eqs 1-3, the all-pairs relation scores against the per-pair
network, the Table 3 variant switches, and staged training on `shapes_tiny` (learns, resumes, evaluates by mAP)."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from xmatch_jax import evaluate
from xmatch_jax import metrics as metrics_lib
from xmatch_jax.data import vocab as vocab_lib
from xmatch_jax.data import word_vectors
from xmatch_jax.models import build_model
from xmatch_jax.models import daer
from xmatch_jax.models import mobilenet_v3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import daer as daer_config  # noqa: E402  pylint: disable=g-import-not-at-top


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def np_lstm(p, x):
  """Standard LSTM (i, f, g, o gates), x [n, d] -> states [n, h]; Flax's OptimizedLSTMCell parameter names."""
  h = np.zeros(p['hi']['kernel'].shape[0])
  c = np.zeros_like(h)
  out = []
  for x_t in x:
    gate = {g: x_t @ p[f'i{g}']['kernel'] + h @ p[f'h{g}']['kernel'] + p[f'h{g}']['bias'] for g in 'ifgo'}
    c = sigmoid(gate['f']) * c + sigmoid(gate['i']) * np.tanh(gate['g'])
    h = sigmoid(gate['o']) * np.tanh(c)
    out.append(h)
  return np.stack(out)


def np_region_attention(p, x):
  """Eqs 1-3 on one caption's real words x [n, d]."""

  def f(h):
    for name in ('mlp_0', 'mlp_1', 'mlp_2'):
      h = np.maximum(h @ p[name]['kernel'] + p[name]['bias'], 0)
    return h @ p['mlp_out']['kernel'] + p['mlp_out']['bias']

  n, out = len(x), x
  for window, w in ((3, 'w0'), (7, 'w1')):
    half = window // 2
    avg = np.stack([x[max(0, j - half) : j + half + 1].mean(0) for j in range(n)])
    mx = np.stack([x[max(0, j - half) : j + half + 1].max(0) for j in range(n)])
    out = out * sigmoid(f(avg @ p[w]['kernel'] + mx @ p[w]['kernel']))
  return out


@pytest.mark.parametrize('region_attention,keras_init', [(True, False), (False, False), (True, True)])
def test_text_module_equals_numpy_lstm_attention_pool_fc(region_attention, keras_init):
  rng = np.random.default_rng(0)
  lengths = [6, 2, 4]
  mask = (np.arange(6)[None] < np.array(lengths)[:, None]).astype(np.float32)
  tokens = (rng.integers(1, 12, size=(3, 6)) * mask).astype(np.int32)
  module = daer.DAERText(
    vocab_size=12,
    word_dim=5,
    lstm_size=4,
    embed_size=3,
    region_attention=region_attention,
    attention_hidden=(6, 8, 6),
    keras_init=keras_init,
  )
  variables = module.init(jax.random.key(1), tokens, mask)
  got = np.asarray(module.apply(variables, tokens, mask))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  for q, n in enumerate(lengths):
    states = np_lstm(p['lstm'], p['embed']['embedding'][tokens[q, :n]])
    if region_attention:
      states = np_region_attention(p['region_attention'], states)
    want = states.mean(0) @ p['fc']['kernel'] + p['fc']['bias']
    np.testing.assert_allclose(got[q], want, atol=1e-5)


def test_keras_init_draws_as_tensorflow_2_keras_layers():
  """DAER-12: each LSTM gate's recurrent block is a block of an orthogonal [H, 4H] (rows of norm ~1/2: squared
  entries sum to ~H / 4 per block, H for Flax's orthogonal [H, H]), the stacked input kernel uniform within
  the glorot bound of [in, 4H], the forget bias 1; embeddings U(+-0.05); dense kernels glorot_uniform; the relation
  network's split first layer takes the bound of the whole [d_t + d_i, h0] kernel. Flax's init differs in each."""
  word_dim, hidden, vocab = 40, 64, 500
  tokens, mask = np.ones((2, 3), np.int32), np.ones((2, 3), np.float32)
  for keras_init in (True, False):
    module = daer.DAERText(vocab, word_dim, hidden, 32, attention_hidden=(48, 96, 48), keras_init=keras_init)
    p = jax.jit(module.init)(jax.random.key(0), tokens, mask)['params']  # one compilation, not one per operation
    lstm = jax.tree.map(np.asarray, p['lstm'])
    block_energy = [np.sum(np.square(lstm[f'h{g}']['kernel'])) / hidden for g in 'ifgo']
    stacked_input = np.concatenate([lstm[f'i{g}']['kernel'] for g in 'ifgo'], axis=1)  # [in, 4H]
    limit = np.sqrt(6 / (word_dim + 4 * hidden))
    embedding = np.asarray(p['embed']['embedding'])
    fc = np.asarray(p['fc']['kernel'])
    if keras_init:
      np.testing.assert_allclose(block_energy, 0.25, atol=0.03)
      assert np.abs(stacked_input).max() <= limit and stacked_input.std() == pytest.approx(limit / 3**0.5, 0.05)
      for g in 'ifgo':
        np.testing.assert_array_equal(lstm[f'h{g}']['bias'], 1.0 if g == 'f' else 0.0)
      assert np.abs(embedding).max() <= 0.05 and embedding.std() == pytest.approx(0.05 / 3**0.5, 0.05)
      assert np.abs(fc).max() <= np.sqrt(6 / (hidden + 32))
    else:
      np.testing.assert_allclose(block_energy, 1.0, atol=1e-5)
      np.testing.assert_array_equal(lstm['hf']['bias'], 0.0)
      assert embedding.std() == pytest.approx(word_dim**-0.5, 0.05)  # variance_scaling over the word axis

  relation = daer.RelationNetwork(hidden=(256, 16), keras_init=True)
  rp = jax.jit(relation.init)(jax.random.key(1), np.ones((2, 300), np.float32), np.ones((3, 300), np.float32))['params']
  first = np.concatenate([np.asarray(rp['fc0_text']['kernel']), np.asarray(rp['fc0_image']['kernel'])])
  whole = np.sqrt(6 / (600 + 256))
  assert np.abs(first).max() <= whole and first.std() == pytest.approx(whole / 3**0.5, 0.05)


def test_keras_init_is_the_default_and_keeps_the_parameter_tree():
  assert daer_config.get_config('shapes').model.keras_init is True
  assert daer_config.get_config('wikipedia').model.keras_init is True
  images = {'pixels': np.zeros((2, 32, 32, 3), np.uint8)}
  text = {'tokens': np.ones((2, 3), np.int32), 'mask': np.ones((2, 3), np.float32)}
  trees = [
    jax.tree.map(np.shape, jax.eval_shape(_tiny_daer(keras_init=k).init, jax.random.key(0), images, text))
    for k in (True, False)
  ]
  assert trees[0] == trees[1]  # checkpoints of either init load into the other
  fields = {'name': 'daer'}
  daer.DAER.upgrade_fields(fields)
  assert fields['keras_init'] is False  # workdirs from before the field trained with Flax's init


def test_text_padding_does_not_change_the_representation():
  module = daer.DAERText(vocab_size=12, word_dim=5, lstm_size=4, embed_size=3, attention_hidden=(6, 8, 6))
  tokens = np.array([[3, 4, 5]], np.int32)
  variables = module.init(jax.random.key(1), tokens, np.ones((1, 3), np.float32))
  short = module.apply(variables, tokens, np.ones((1, 3), np.float32))
  padded = module.apply(
    variables, np.array([[3, 4, 5, 0, 0, 0, 0, 0]], np.int32), np.array([[1, 1, 1, 0, 0, 0, 0, 0]], np.float32)
  )
  np.testing.assert_allclose(padded, short, atol=1e-6)


# Tests that run _tiny_daer's MobileNetV3 take this many 32 x 32 images: op-by-op (un-jitted) calls compile each
# operation once per input shape, so one batch shape compiles them once for the whole module.
N_IMAGES = 5


def _tiny_daer(**kwargs):
  fields = dict(
    name='daer',
    num_classes=4,
    word_dim=8,
    lstm_size=8,
    embed_size=6,
    attention_hidden=(8, 8, 8),
    width_mult=0.25,
    relation_hidden=(10, 6),
    image_head_hidden=12,
  )
  fields.update(kwargs)
  return build_model(fields, vocab_size=15, img_dim=0)


def _stage_two_grads(model, variables, images, names):
  """Gradients of stage 2's loss with respect to the image module's parameters `names` (the others held fixed: the
  same values as in the gradient of every parameter, without compiling the backward pass through MobileNetV3)."""
  from xmatch_jax.trainers import staged  # pylint: disable=g-import-not-at-top

  batch = {'images': images, 'labels': np.arange(len(images['pixels'])) % 4}

  def loss(part):
    params = {**variables['params'], 'image': {**variables['params']['image'], **part}}
    return staged.ImageStage.loss(model, {**variables, 'params': params}, batch, jax.random.key(1))[0]

  return jax.jit(jax.grad(loss))({name: variables['params']['image'][name] for name in names})


@pytest.mark.slow
def test_pair_scores_are_the_relation_network_of_every_pair_in_any_block_size():
  rng = np.random.default_rng(3)
  images = {'pixels': rng.integers(0, 256, size=(N_IMAGES, 32, 32, 3)).astype(np.uint8)}
  text = {'tokens': rng.integers(1, 15, size=(7, 4)).astype(np.int32), 'mask': np.ones((7, 4), np.float32)}
  model = _tiny_daer(block_size=2)  # 3 blocks of 2 images, the last padded
  variables = model.init(jax.random.key(0), images, text)
  assert set(variables) == {'params', 'batch_stats'}
  assert 'text_classifier' not in variables['params'] and 'image_classifier' not in variables['params']
  image_rep = model.apply(variables, images, method=model.encode_image)
  text_rep = model.apply(variables, text, method=model.encode_text)
  got = np.asarray(model.apply(variables, image_rep, text_rep, method=model.pair_scores))
  assert got.shape == (N_IMAGES, 7)
  relation = daer.RelationNetwork(hidden=(10, 6), block_size=0)
  want = np.asarray(relation.apply({'params': variables['params']['relation']}, text_rep, image_rep)).T
  np.testing.assert_allclose(got, want, atol=1e-6)
  whole = _tiny_daer(block_size=256)
  np.testing.assert_allclose(whole.apply(variables, images, text), got, atol=1e-6)


def test_variants_switch_the_parts_of_table_3():
  flags = {}
  for arg in ('shapes', 'shapes,c', 'shapes,i', 'shapes,t', 'shapes,i_t'):
    m = daer_config.get_config(arg).model
    flags[arg] = (m.spatial_attention, m.region_attention, m.power)
  assert flags == {
    'shapes': (True, True, 0.6),
    'shapes,c': (False, False, 1.0),
    'shapes,i': (True, False, 1.0),
    'shapes,t': (False, True, 1.0),
    'shapes,i_t': (True, True, 1.0),
  }
  with pytest.raises(ValueError, match='at most one variant'):
    daer_config.get_config('shapes,i,t')
  with pytest.raises(ValueError, match='unknown dataset'):
    daer_config.get_config('f30k')
  model = _tiny_daer(spatial_attention=False, region_attention=False)
  images = {'pixels': np.zeros((N_IMAGES, 32, 32, 3), np.uint8)}
  text = {'tokens': np.ones((2, 3), np.int32), 'mask': np.ones((2, 3), np.float32)}
  params = model.init(jax.random.key(0), images, text)['params']
  assert 'region_attention' not in params['text']
  assert not any('DualSpatialAttention' in k for k in jax.tree_util.keystr(params).split("'"))


def test_word_vectors_fill_the_vocabulary_rows(tmp_path):
  vocab = vocab_lib.Vocabulary(list(vocab_lib.SPECIAL_TOKENS) + ['red', 'circle', 'square'])
  path = tmp_path / 'glove.txt'
  path.write_text('2 3\nred 1 2 3\nblue 4 5 6\nsquare 7 8 9\n')
  init = np.zeros((len(vocab), 3), np.float32)
  table, found = word_vectors.load_for_vocab(str(path), vocab, init)
  assert found == 2
  np.testing.assert_array_equal(table[vocab('red')], [1, 2, 3])
  np.testing.assert_array_equal(table[vocab('square')], [7, 8, 9])
  np.testing.assert_array_equal(table[vocab('circle')], 0)
  path.write_text('red 1 2\n')
  with pytest.raises(ValueError, match=r'line 1: word .red. has 2 values; expected 3'):
    word_vectors.load_for_vocab(str(path), vocab, init)


@pytest.mark.slow
def test_staged_training_learns_resumes_and_evaluates_by_map(tmp_path, monkeypatch, capsys):
  from xmatch_jax import Retriever  # pylint: disable=g-import-not-at-top
  from xmatch_jax import trainers  # pylint: disable=g-import-not-at-top
  from xmatch_jax.data import load_split  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv('XMATCH_DATA_DIR', os.environ.get('XMATCH_DATA_DIR', str(tmp_path / 'data')))
  config = daer_config.get_config('shapes_tiny')
  config.model.update(
    word_dim=32,
    lstm_size=32,
    embed_size=32,
    attention_hidden=(32, 32, 32),
    width_mult=0.25,
    relation_hidden=(64, 32),
    image_head_hidden=64,
  )
  for stage, epochs in (('text', 3), ('image', 1), ('relation', 1)):
    config.stage[stage].update(num_epochs=epochs, batch_size=32, learning_rate=3e-3 if stage != 'relation' else 1e-3)
  config.stage.image.update(num_epochs=2, max_steps=3)  # stops inside epoch 1, evaluating dev there
  config.log_every_steps = 10
  workdir = str(tmp_path / 'run')
  trainers.train_and_evaluate(config, workdir)

  logged = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  text_acc = [r['text/dev_accuracy'] for r in logged if 'text/dev_accuracy' in r]
  relation_loss = [r['relation/loss'] for r in logged if 'relation/loss' in r]
  assert len(text_acc) == 3 and text_acc[-1] > 2 / 30, text_acc  # chance is 1/30
  assert relation_loss[-1] < relation_loss[0], relation_loss  # from ~B^2/4 (all 0.5) down
  assert [r['step'] for r in logged if 'image/dev_accuracy' in r] == [3]
  assert os.path.isdir(os.path.join(workdir, 'stages', 'text', 'checkpoints'))

  # The evaluation restores params and BatchNorm statistics; its mAP equals mAP of the Retriever's scores.
  result = evaluate.evaluate_workdir(workdir, 'test')
  assert result['protocol'] == 'map' and result['model'] == 'daer' and result['checkpoint'] == 'best'
  test = load_split('shapes_tiny', 'test')
  scores = Retriever.from_workdir(workdir).score(test.images, test.captions)
  labels = test.images['label']
  want = metrics_lib.map_metrics(scores, labels, labels[test.caption_to_image])
  for key in ('i2t_map', 't2i_map', 'mean_map'):
    assert result[key] == pytest.approx(want[key], abs=1e-9)
  with pytest.raises(ValueError, match='recall protocol'):
    evaluate.evaluate_workdir(workdir, 'test', protocol='1k')

  # A second run finds every stage done and trains nothing.
  lines = len(logged)
  trainers.train_and_evaluate(config, workdir)
  assert len(open(os.path.join(workdir, 'metrics.jsonl')).readlines()) == lines

  # A Table 3 sweep: DAER-I-T (power 1, a relation-stage field) takes stages 1-2 from this run (train_and_evaluate
  # copies a stage when reuse_stage says so) ...
  from xmatch_jax.trainers import staged  # pylint: disable=g-import-not-at-top

  capsys.readouterr()
  sweep = config.copy_and_resolve_references()
  sweep.model.power = 1.0
  for stage in ('text', 'image'):
    assert staged.reuse_stage(stage, sweep, workdir, str(tmp_path / 'i_t_stages'))
    assert f'stage {stage}: checkpoints copied from {workdir}' in capsys.readouterr().out
  # ... and a run with stages_from takes stages 1-2 and trains stage 3. Here the relation-stage field that differs is
  # only max_steps: stage 3 of DAER-I-T would compile its training and scoring again (power 1), 30 s of this test.
  sweep = config.copy_and_resolve_references()
  sweep.stages_from = workdir
  sweep.stage.relation.max_steps = 2
  trainers.train_and_evaluate(sweep, str(tmp_path / 'i_t'))
  out = capsys.readouterr().out
  for stage in ('text', 'image'):
    assert f'stage {stage}: checkpoints copied from {workdir}' in out and f'stage {stage}: done' in out
  assert 'stage relation: ' in out and 'stage relation: done' not in out
  # Without region attention the text stage differs (it is trained, not copied); the image stage does not.
  other = config.copy_and_resolve_references()
  other.model.region_attention = False
  assert not staged.reuse_stage('text', other, workdir, str(tmp_path / 't'))
  assert 'fields differ: model.region_attention' in capsys.readouterr().out
  assert staged.reuse_stage('image', other, workdir, str(tmp_path / 't'))
  with pytest.raises(FileNotFoundError, match='stages_from'):
    staged.reuse_stage('text', other, str(tmp_path / 'nothing'), str(tmp_path / 'u'))


@pytest.mark.parametrize('head_hidden', [1280, 0])
def test_stage_two_starts_from_converted_torchvision_weights(monkeypatch, tmp_path, head_hidden):
  from xmatch_jax.convert import torchvision_mobilenet  # pylint: disable=g-import-not-at-top
  from xmatch_jax.data import load_split  # pylint: disable=g-import-not-at-top
  from xmatch_jax.trainers import staged  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv('XMATCH_DATA_DIR', os.environ.get('XMATCH_DATA_DIR', str(tmp_path / 'data')))
  weights = os.path.join(ROOT, 'tests', 'fixtures', 'mobilenet_v3_large_w025.safetensors')
  config = daer_config.get_config('shapes_tiny')
  config.model.update(width_mult=0.25, word_dim=8, lstm_size=8, embed_size=8, attention_hidden=(8, 8, 8))
  config.model.image_head_hidden = head_hidden
  config.mobilenet_weights = weights
  config.stage.image.batch_size = 32  # as in the staged training test: stage 2's (op-by-op) init compiles per shape
  model = build_model(config.model, vocab_size=10, img_dim=0)
  train = load_split('shapes_tiny', 'train')
  vocab = vocab_lib.Vocabulary.build(train.captions, min_count=1)
  stage = staged.ImageStage(config, model, train, vocab, str(tmp_path))
  variables = staged.initial_variables(stage, {})
  imagenet = torchvision_mobilenet.load_imagenet_mobilenet(weights, 0.25)
  got = {
    'params': variables['params']['image']['mobilenet'],
    'batch_stats': variables['batch_stats']['image']['mobilenet'],
  }
  # Every converted weight is in place; the dual spatial attention convolutions (not in torchvision) stay initialised.
  for collection in ('params', 'batch_stats'):
    for path, value in jax.tree_util.tree_leaves_with_path(imagenet[collection]):
      node = got[collection]
      for p in path:
        node = node[p.key]
      np.testing.assert_array_equal(np.asarray(node), value)
  assert any(
    'DualSpatialAttention' in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(got['params'])
  )
  # MobileNetV3's FC 1280 (torchvision classifier.0) starts the image module's head; the classification layer
  # (classifier.3) is not used. Without the head (DAER-2's alternative) classifier.0 is not used either.
  if head_hidden:
    np.testing.assert_array_equal(
      np.asarray(variables['params']['image']['head']['kernel']), imagenet['head']['kernel']
    )
  else:
    assert set(variables['params']['image']) == {'mobilenet', 'fc'}


@pytest.mark.slow
def test_stage_two_trains_the_300d_representation_and_drops_only_the_classifier():
  """Sec 4.4: the classification layer sits on the 1 x 300 output and is removed after stage 2, so stage 2 trains
  the FC to 300; MobileNetV3's head (FC, hard-swish, dropout 0.2) stays in the image module."""
  rng = np.random.default_rng(0)
  images = {'pixels': rng.integers(0, 256, size=(N_IMAGES, 32, 32, 3)).astype(np.uint8)}
  model = _tiny_daer()
  variables = model.init(jax.random.key(0), images, method=model.classify_image)
  image = variables['params']['image']
  assert set(image) == {'mobilenet', 'head', 'fc'} and image['fc']['kernel'].shape[1] == 6
  assert variables['params']['image_classifier']['kernel'].shape == (6, 4)  # 300-d (here 6) -> classes
  grads = _stage_two_grads(model, variables, images, ('fc', 'head'))
  assert float(np.abs(grads['fc']['kernel']).max()) > 0
  assert float(np.abs(grads['head']['kernel']).max()) > 0
  # Dropout acts in training only.
  train = jax.jit(
    lambda key: model.apply(
      variables, images, train=True, method=model.encode_image, rngs={'dropout': key}, mutable=['batch_stats']
    )[0]
  )
  assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)))
  infer = jax.jit(lambda: model.apply(variables, images, method=model.encode_image))
  np.testing.assert_array_equal(infer(), infer())


def test_without_mobilenets_head_the_fc_to_300_reads_the_pooled_features_and_trains_in_stage_two():
  """DAER-2's alternative reading: MobileNetV3's head removed with its classifier, the FC to 300 on the 960 x width
  pooled features (through the dropout); stage 2 still trains that FC."""
  rng = np.random.default_rng(1)
  images = {'pixels': rng.integers(0, 256, size=(N_IMAGES, 32, 32, 3)).astype(np.uint8)}
  model = _tiny_daer(image_head_hidden=0)
  variables = model.init(jax.random.key(0), images, method=model.classify_image)
  image = variables['params']['image']
  assert set(image) == {'mobilenet', 'fc'}
  rep, features = model.apply(variables, images, method=lambda m, x: m.image(x['pixels']))
  assert features.shape == (N_IMAGES, mobilenet_v3.make_divisible(960 * 0.25)) and image['fc']['kernel'].shape[0] == 240
  np.testing.assert_allclose(rep, features @ image['fc']['kernel'] + image['fc']['bias'], rtol=1e-5, atol=1e-6)
  assert float(np.abs(_stage_two_grads(model, variables, images, ('fc',))['fc']['kernel']).max()) > 0


@pytest.mark.parametrize('dataset', ['wikipedia', 'pascal', 'xmedianet'])
def test_paper_datasets_train_every_stage_by_sgd(dataset):
  config = daer_config.get_config(dataset)
  assert [config.stage[s].optimizer for s in ('text', 'image', 'relation')] == ['sgd'] * 3  # sec 3.1, alg. 1
  assert (config.model.word_dim, config.model.lstm_size, config.model.embed_size) == (300, 300, 300)  # sec 4.4
  assert config.model.power == 0.6 and config.model.image_dropout == 0.2
  from xmatch_jax.trainers import optim  # pylint: disable=g-import-not-at-top

  tx = optim.stage_optimizer(config.stage.image)
  params = {'w': np.ones(3, np.float32)}
  updates, _ = tx.update({'w': np.full(3, 2.0, np.float32)}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -config.stage.image.learning_rate * 2.0)  # plain SGD: -lr g


def test_workdirs_trained_before_the_optimizer_field_resume_with_adam(tmp_path):

  from xmatch_jax import workdirs  # pylint: disable=g-import-not-at-top

  config = daer_config.get_config('wikipedia').to_dict()
  for stage in config['stage'].values():
    del stage['optimizer']  # config.json of a run trained with Adam before the field
  (tmp_path / 'config.json').write_text(json.dumps(config))
  loaded = workdirs.load_config(str(tmp_path))
  assert [loaded.stage[s].optimizer for s in ('text', 'image', 'relation')] == ['adam'] * 3
