"""GLFN against numpy implementations of the paper's equations: position attention (eqs 2-12, padding rule
included, also on the real PFAN fixture), the image side (1-14), the text side (15-27, reusing the GRU checked in
test_scan) and the fused SCAN score (28-33, numpy port of SCAN's official loop)."""

import json
import os

import config_tables  # pylint: disable=g-bad-import-order (tests/)
import jax
import numpy as np
import pytest
from test_scan import np_aggregate  # pylint: disable=g-import-not-at-top
from test_scan import np_l2norm  # pylint: disable=g-import-not-at-top
from test_scan import np_leaky_relu  # pylint: disable=g-import-not-at-top
from test_scan import np_softmax  # pylint: disable=g-import-not-at-top
from test_scan import np_xattn_scores  # pylint: disable=g-import-not-at-top

from configs import glfn as glfn_config
from configs import scan as scan_config
from xmatch_jax import workdirs
from xmatch_jax.data import pfan
from xmatch_jax.data import wordpiece
from xmatch_jax.models import build_model
from xmatch_jax.models import glfn as glfn_lib

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
TINY_BERT = os.path.join(FIXTURES, 'tiny_bert')
N_IMG, K, IMG_DIM, GRID, TOP_L = 4, 5, 12, 4, 6
LENGTHS = [6, 3, 1, 4]


def np_position_attention(objects, blocks, weights, table):
  """Eqs 6-12 region by region, block by block."""
  out = np.zeros(objects.shape)
  for idx in np.ndindex(objects.shape[:-1]):
    v = table[blocks[idx]]  # [L, D_b]
    att = np.tanh(v @ objects[idx])  # eq 8
    att = np.exp(att) / np.exp(att).sum()  # eq 9
    p = att * weights[idx]  # eq 10
    p = p / p.sum()  # eq 11
    out[idx] = p @ v  # eq 12
  return out


def test_position_attention_on_the_real_pfan_file_ignores_padding():
  indices, weights = pfan.from_pfan_layout(np.load(os.path.join(FIXTURES, 'f30k_sample_train_boxes_8.npy')))
  rng = np.random.default_rng(0)
  table = rng.normal(size=(257, 7))
  objects = rng.normal(size=indices.shape[:2] + (7,))
  got = np.asarray(glfn_lib.position_attention(objects, indices, weights, table))
  np.testing.assert_allclose(got, np_position_attention(objects, indices, weights, table), atol=1e-5)
  # The padding row's embedding never matters (its weight is 0).
  table2 = table.copy()
  table2[256] = 1e3
  np.testing.assert_allclose(glfn_lib.position_attention(objects, indices, weights, table2), got, atol=1e-5)
  assert (indices == 256).any()


def _model(**fields):
  config = {
    'name': 'glfn',
    'bert_dir': TINY_BERT,
    'embed_size': 16,
    'word_dim': 8,
    'position_dim': 6,
    'grid': GRID,
    'top_l': TOP_L,
    'block_size': 3,
    **fields,
  }
  return build_model(config, vocab_size=34, img_dim=IMG_DIM)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x1, y1 = rng.uniform(0, 0.7, (N_IMG, K)), rng.uniform(0, 0.7, (N_IMG, K))
  boxes = np.stack([x1, y1, x1 + rng.uniform(0.05, 0.3, (N_IMG, K)), y1 + rng.uniform(0.05, 0.3, (N_IMG, K))], -1)
  tags = [
    [['red circle', 'blue square', 'big yellow cross', 'circle', 'green items'][(i + r) % 5] for r in range(K)]
    for i in range(N_IMG)
  ]
  images = {'regions': rng.normal(size=(N_IMG, K, IMG_DIM)).astype(np.float32), 'boxes': boxes, 'tags': tags}
  images = glfn_lib.prepare_images(images, wordpiece.WordPieceVocab(TINY_BERT), GRID, TOP_L)
  mask = (np.arange(max(LENGTHS))[None] < np.array(LENGTHS)[:, None]).astype(np.float32)
  tokens = (rng.integers(5, 34, mask.shape) * mask).astype(np.int32)
  return images, {'tokens': tokens, 'mask': mask}


def _sum_and_grads(model, params, inputs, text):
  """The sum of all scores and its gradients, compiled as one program (op by op, the backward pass through BERT
  compiles for ~10 s); the tests below share its compilations through the persistent compilation cache."""
  return jax.jit(jax.value_and_grad(lambda p, x, t: model.apply({'params': p}, x, t).sum()))(params, inputs, text)


def _np_image_side(model, variables, images):
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), variables['params'])
  tags = (
    np.asarray(model.apply(variables, images['tag_tokens'], images['tag_mask'], method=model.tag_features), np.float64)
    if model.use_tags
    else None
  )
  regions = images['regions'].astype(np.float64)
  objects = np.concatenate([regions, tags], -1) if model.use_tags else regions  # eq 1
  compressed = objects @ p['object_fc']['kernel']  # eq 7 (no bias)
  positions = np_position_attention(
    compressed, images['pfan_blocks'], images['pfan_weights'], p['block_embed']['embedding']
  )
  if not model.use_tags:
    parts = [regions, positions]
  elif model.tag_in_fusion == 'twice':
    parts = [objects, positions, tags]  # eq 13 as written
  else:
    parts = [regions, positions, tags]  # official code
  v = np.concatenate(parts, -1) @ p['region_fc']['kernel'] + p['region_fc']['bias']  # eq 14
  return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-8)


def np_official_max_attention(regions, words, lengths, lambda_softmax, lambda_lse, agg_func):
  """The official GLFN t2i extra term: each word's largest attention weight, aggregated over words as the score."""
  columns = []
  for c, n_word in enumerate(lengths):
    attn = regions @ words[c, :n_word].T  # [I, k, n] (func_attention)
    attn = np_l2norm(np_leaky_relu(attn), 2)
    weights = np_softmax(attn.transpose(0, 2, 1) * lambda_softmax, axis=2)  # [I, n, k] over regions
    columns.append(np_aggregate(weights.max(axis=2), agg_func, lambda_lse))
  return np.stack(columns, axis=1)


OFFICIAL = {'tag_in_fusion': 'once', 'train_position_attention': False, 't2i_max_attention_weight': 0.5}


@pytest.mark.parametrize(
  'fields',
  [
    {},
    {'use_tags': False},
    {'score': 't2i'},
    {'score': 'i2t', 'alpha': 0.3},
    {'text_encoder': 'bert'},
    {'text_encoder': 'gru', 'alpha': 0.8},
    OFFICIAL,
    {**OFFICIAL, 'score': 't2i', 't2i_agg_func': 'LogSumExp'},
    {'t2i_agg_func': 'LogSumExp', 'i2t_agg_func': 'Max'},
  ],
)
def test_scores_equal_numpy_equations(fields):
  # Eqs 31-32 average over words / regions: the reference uses the mean unless the case names another aggregation.
  t2i_agg, i2t_agg = fields.get('t2i_agg_func', 'Mean'), fields.get('i2t_agg_func', 'Mean')
  model = _model(**fields)
  images, text = _inputs()
  variables = model.init(jax.random.key(0), {k: images[k] for k in model.image_keys}, text)
  regions = _np_image_side(model, variables, images)
  image_rep = model.apply(variables, {k: images[k] for k in model.image_keys}, method=model.encode_image)
  np.testing.assert_allclose(image_rep['regions'], regions, atol=1e-5)
  words = np.asarray(model.apply(variables, text, method=model.encode_text)['words'], np.float64)
  t2i = np_xattn_scores(regions, words, LENGTHS, 't2i', 'clipped_l2norm', t2i_agg, 9.0, 6.0)
  if model.t2i_max_attention_weight:
    t2i = t2i + model.t2i_max_attention_weight * np_official_max_attention(regions, words, LENGTHS, 9.0, 6.0, t2i_agg)
  i2t = np_xattn_scores(regions, words, LENGTHS, 'i2t', 'clipped_l2norm', i2t_agg, 4.0, 5.0)
  expected = {'t2i': t2i, 'i2t': i2t, 'fused': model.alpha * i2t + (1 - model.alpha) * t2i}[model.score]
  scores = model.apply(variables, {k: images[k] for k in model.image_keys}, text)
  np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_distinct_rows_says_when_they_fit():
  rows = np.array([[3, 1], [2, 2], [3, 1], [0, 0], [2, 2], [2, 5]], np.int32)  # 4 distinct rows
  for size in (4, 6):
    distinct, inverse, fits = jax.jit(glfn_lib.distinct_rows, static_argnums=1)(rows, size)
    assert bool(fits) and distinct.shape == (size, 2)
    np.testing.assert_array_equal(np.asarray(distinct)[np.asarray(inverse)], rows)
  assert not bool(glfn_lib.distinct_rows(rows, 3)[2])


@pytest.mark.parametrize('tag_batch', [5, 8, 4])  # the inputs hold 5 distinct tags: fits, fits padded, overflows
def test_tag_batch_gives_every_region_the_same_tag_features(tag_batch):
  model, dedup = _model(), _model(tag_batch=tag_batch)
  images, text = _inputs()
  inputs = {k: images[k] for k in model.image_keys}
  variables = model.init(jax.random.key(0), inputs, text)
  dedup_tree = jax.eval_shape(dedup.init, jax.random.key(0), inputs, text)  # init's tree, traced, not compiled
  assert jax.tree.structure(dedup_tree) == jax.tree.structure(variables)
  tags = (images['tag_tokens'], images['tag_mask'])
  want = model.apply(variables, *tags, method=model.tag_features)
  got = jax.jit(lambda v: dedup.apply(v, *tags, method=dedup.tag_features))(variables)
  np.testing.assert_allclose(got, want, atol=1e-6)
  loss = lambda m: _sum_and_grads(m, variables['params'], inputs, text)
  (value, grads), (want_value, want_grads) = loss(dedup), loss(model)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, want_grads)


def test_text_side_is_bert_fc_then_bigru_and_bert_is_frozen():
  model = _model()
  images, text = _inputs()
  inputs = {k: images[k] for k in model.image_keys}
  variables = model.init(jax.random.key(1), inputs, text)
  _, grads = _sum_and_grads(model, variables['params'], inputs, text)
  assert all(float(np.abs(g).max()) == 0 for g in jax.tree.leaves(grads['bert']))
  assert float(np.abs(grads['gru']['forward_0']['ir']['kernel']).max()) > 0
  assert 'embed' not in variables['params']['gru']  # the GRU reads projected BERT features (eq 16)


def test_official_code_never_trains_the_position_attention():
  images, text = _inputs()
  for train_position, expect_zero in ((True, False), (False, True)):
    model = _model(train_position_attention=train_position)
    inputs = {k: images[k] for k in model.image_keys}
    params = model.init(jax.random.key(1), inputs, text)['params']
    _, grads = _sum_and_grads(model, params, inputs, text)
    for name in ('object_fc', 'block_embed'):
      assert (float(np.abs(jax.tree.leaves(grads[name])[0]).max()) == 0) == expect_zero, (name, train_position)


def test_official_init_follows_the_official_code():
  """official_init: position_embedding is nn.Embedding (N(0, 1)); posi_attn_matrix_add_tag and the text fc are
  Xavier-uniform, bound sqrt(6 / (fan_in + fan_out)), the fc bias zero (official model.py, init_weights)."""
  images, text = _inputs()
  big = {'position_dim': 64, 'grid': GRID}
  stats = {}
  for official in (False, True):
    model = _model(official_init=official, **big)
    params = model.init(jax.random.key(2), {k: images[k] for k in model.image_keys}, text)['params']
    stats[official] = params
  table = np.asarray(stats[True]['block_embed']['embedding'])
  assert abs(table.std() - 1.0) < 0.1, table.std()  # N(0, 1)
  assert np.asarray(stats[False]['block_embed']['embedding']).std() < 0.3  # Flax: N(0, 1 / D_b)
  for name in ('object_fc', 'word_fc'):
    kernel = np.asarray(stats[True][name]['kernel'])
    bound = np.sqrt(6.0 / sum(kernel.shape))
    assert kernel.max() <= bound and kernel.min() >= -bound and kernel.max() > 0.8 * bound, name
    assert abs(kernel.std() - bound / np.sqrt(3)) < 0.15 * bound / np.sqrt(3), name  # uniform's std
  assert float(np.abs(stats[True]['word_fc']['bias']).max()) == 0


def test_the_default_starts_as_the_official_code():
  # Paper silent on the init; the configs follow the official code (docs/fidelity.md#glfn-8). The model field's
  # own default stays False so that workdirs written before the field keep their meaning.
  for arg in ('shapes', 'shapes,i2t', 'f30k', 'coco,fused', 'f30k,official,t2i'):
    assert glfn_config.get_config(arg).model.official_init is True, arg
  assert glfn_lib.GLFN.official_init is False


def test_ablations_change_the_parameters_they_should():
  images, text = _inputs()
  params = {}
  for name, fields in {
    'full': {},
    'no_tag': {'use_tags': False},
    'only_gru': {'text_encoder': 'gru'},
    'only_bert': {'text_encoder': 'bert'},
  }.items():
    model = _model(**fields)
    params[name] = model.init(jax.random.key(0), {k: images[k] for k in model.image_keys}, text)['params']
  assert params['no_tag']['object_fc']['kernel'].shape[0] == IMG_DIM
  assert params['full']['object_fc']['kernel'].shape[0] == IMG_DIM + 16
  assert 'embed' in params['only_gru']['gru'] and 'word_fc' not in params['only_gru']  # BERT only for tags
  assert 'gru' not in params['only_bert']


def test_missing_inputs_are_named():
  with pytest.raises(ValueError, match='needs block positions'):
    glfn_lib.prepare_images({'regions': np.zeros((1, 2, 3)), 'tags': [['a', 'b']]}, None)
  with pytest.raises(ValueError, match='needs per-region tags'):
    glfn_lib.prepare_images({'regions': np.zeros((1, 1, 3)), 'boxes': np.array([[[0, 0, 1, 1.0]]])}, None)
  with pytest.raises(ValueError, match='score must be one of'):
    _model(score='both')


# Sec 4.2 of the paper, transcribed (the margin and batch size are not given: SCAN's 0.2 and 128 are used).
PAPER = {
  'optim.learning_rate': 2e-4,
  'optim.grad_clip': 2.0,
  'num_epochs': 30,  # Adam 0.0002, clip 2, 30 epochs
  'model.embed_size': 1024,
  'model.word_dim': 300,
  'model.position_dim': 200,  # D, GRU input size, D_b
  'model.grid': 16,
  'model.top_l': 15,
  'model.alpha': 0.5,  # 16 x 16 blocks, L, eq 33
  'model.t2i_agg_func': 'Mean',
  'model.i2t_agg_func': 'Mean',  # eqs 31-32
  'loss.max_violation': True,  # hardest negatives (sec 3.5)
}
# The official code's training (f30k_i2t.sh and ContrastiveLoss in model.py).
OFFICIAL_TRAINING = {
  'num_epochs': 40,
  'batch_size': 196,
  'optim.lr_decay_epochs': 15,
  'optim.learning_rate': 2e-4,
  'loss.mask_same_image': False,
  'model.official_init': True,
  'model.i2t_agg_func': 'Mean',
  'model.i2t_lambda_softmax': 4.0,
}


@pytest.mark.parametrize('dataset', ['f30k', 'coco'])
def test_paper_configs_follow_section_4_2(dataset):
  config = glfn_config.get_config(dataset)
  wrong = config_tables.mismatches(config, PAPER)
  assert not wrong, f'config field: (config, paper): {wrong}'
  assert config.optim.lr_decay_epochs >= config.num_epochs  # no decay is mentioned


def test_official_variant_trains_as_the_official_script():
  config = glfn_config.get_config('f30k,official,i2t')
  wrong = config_tables.mismatches(config, OFFICIAL_TRAINING)
  assert not wrong, f'config field: (config, official): {wrong}'
  assert glfn_config.get_config('f30k').loss.mask_same_image
  assert glfn_config.get_config('f30k,official').model.score == 't2i'
  with pytest.raises(ValueError, match='official trains one direction'):  # the official code never trains eq 33
    glfn_config.get_config('f30k,official,fused')


def test_the_default_is_a_run_of_the_papers_two_run_procedure():
  # Sec 4.2 / Table 1: t2i and i2t are trained apart and fused at evaluation; one fused model is the variant.
  assert glfn_config.get_config('f30k').model.score == glfn_config.get_config('shapes').model.score == 't2i'
  assert glfn_config.get_config('shapes,i2t').model.score == 'i2t'
  assert glfn_config.get_config('shapes,fused').model.score == 'fused'
  with pytest.raises(ValueError, match='at most one of the variants t2i, i2t, fused'):
    glfn_config.get_config('shapes,t2i,fused')


def test_workdirs_with_one_aggregation_keep_their_meaning(tmp_path):
  config = glfn_config.get_config('shapes').to_dict()
  for field in ('t2i_agg_func', 'i2t_agg_func', 'official_init'):
    del config['model'][field]
  config['model']['agg_func'] = 'LogSumExp'  # config.json of a run trained before the split
  (tmp_path / 'config.json').write_text(json.dumps(config))
  model = workdirs.load_config(str(tmp_path)).model
  assert (model.t2i_agg_func, model.i2t_agg_func, model.official_init) == ('LogSumExp', 'LogSumExp', False)


def test_shapes_warms_up_like_scan_and_the_paper_configs_do_not():
  for arg in ('f30k', 'coco', 'shapes_tiny', 'f30k,official,t2i'):
    assert glfn_config.get_config(arg).optim.warmup_steps == 0, arg
  for arg in ('shapes', 'shapes,t2i', 'shapes,i2t', 'shapes,no_tag'):
    assert glfn_config.get_config(arg).optim.warmup_steps == scan_config.get_config('shapes').optim.warmup_steps == 100
