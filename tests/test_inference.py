"""Scorer: tiled encoding and all-pairs scoring equal one unchunked call of the model."""

import jax
import ml_collections
import numpy as np
import pytest

from xmatch_jax import inference
from xmatch_jax.models import build_model


@pytest.mark.parametrize('image_chunk,text_batch', [(2, 3), (4, 5), (16, 64)])
def test_tiled_scores_equal_one_call(image_chunk, text_batch):
    rng = np.random.default_rng(0)
    n_img, n_txt, k, n, vocab = 5, 11, 4, 6, 20
    config = ml_collections.ConfigDict({'name': 'scan', 'embed_size': 8, 'word_dim': 8, 'cross_attn': 't2i'})
    model = build_model(config, vocab_size=vocab, img_dim=7)
    images = {'regions': rng.normal(size=(n_img, k, 7)).astype(np.float32)}
    lengths = rng.integers(1, n + 1, size=n_txt)
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    tokens = (rng.integers(1, vocab, size=(n_txt, n)) * mask).astype(np.int32)
    text = {'tokens': tokens, 'mask': mask}
    variables = model.init(jax.random.key(0), images, text)

    scorer = inference.Scorer(model, variables, image_chunk=image_chunk, text_batch=text_batch)
    got = scorer.score(images, tokens, mask)
    want = np.asarray(model.apply(variables, images, text))
    assert got.shape == (n_img, n_txt)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_chunk_sizes_must_be_positive():
    with pytest.raises(ValueError, match='image_chunk and text_batch'):
        inference.Scorer(None, {}, image_chunk=0)
