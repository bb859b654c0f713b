"""tools/convert_features.py: bottom-up-attention TSV and per-image npz -> precomp npy + PFAN boxes, in the order
of an id list, streaming; malformed input is named."""

import base64
import os
import sys

import numpy as np
import pytest

from xmatch_jax.data import pfan

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import convert_features  # pylint: disable=g-import-not-at-top


def _images(n=4, k=5, d=6, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    w, h = 200 + 10 * i, 150
    x1, y1 = rng.uniform(0, w / 2, k), rng.uniform(0, h / 2, k)
    boxes = np.stack([x1, y1, x1 + rng.uniform(5, w / 2, k), y1 + rng.uniform(5, h / 2, k)], -1).astype(np.float32)
    out.append((f'img{i}', rng.normal(size=(k, d)).astype(np.float32), boxes, (w, h)))
  return out


def _write_tsv(path, images):
  with open(path, 'w') as f:
    for image_id, feats, boxes, (w, h) in images:
      f.write('\t'.join([image_id, str(w), str(h), str(len(feats)), base64.b64encode(boxes.tobytes()).decode(),
                         base64.b64encode(feats.tobytes()).decode()]) + '\n')


def test_tsv_in_id_order_with_pfan_positions(tmp_path):
  images = _images()
  _write_tsv(tmp_path / 'a.tsv', images[:2])
  _write_tsv(tmp_path / 'b.tsv', images[2:])
  (tmp_path / 'ids.txt').write_text('img3\nimg0\nimg2\n')
  assert convert_features.main(['tsv', f'--input={tmp_path / "a.tsv"}', f'--input={tmp_path / "b.tsv"}',
                                f'--image_ids={tmp_path / "ids.txt"}', f'--out_dir={tmp_path / "out"}',
                                '--split=test']) == 0
  ims = np.load(tmp_path / 'out' / 'test_ims.npy')
  np.testing.assert_array_equal(ims, np.stack([images[3][1], images[0][1], images[2][1]]))
  blocks, weights = pfan.from_pfan_layout(np.load(tmp_path / 'out' / 'test_boxes.npy'))
  want_blocks, want_weights = pfan.block_positions(images[3][2][None], np.array([images[3][3]]))
  np.testing.assert_array_equal(blocks[0], want_blocks[0])
  np.testing.assert_allclose(weights[0], want_weights[0], rtol=1e-6)


def test_tsv_order_without_ids_and_npz(tmp_path):
  images = _images(3)
  _write_tsv(tmp_path / 'a.tsv', images)
  convert_features.main(['tsv', f'--input={tmp_path / "a.tsv"}', f'--out_dir={tmp_path / "o"}', '--split=dev'])
  assert (tmp_path / 'o' / 'dev_ids.txt').read_text().split() == ['img0', 'img1', 'img2']
  os.makedirs(tmp_path / 'npz')
  for image_id, feats, boxes, (w, h) in images:
    np.savez(tmp_path / 'npz' / f'{image_id}.npz', x=feats, bbox=boxes, image_w=w, image_h=h)
  (tmp_path / 'ids.txt').write_text('img1\nimg2\n')
  convert_features.main(['npz', f'--input={tmp_path / "npz"}', f'--image_ids={tmp_path / "ids.txt"}',
                         f'--out_dir={tmp_path / "p"}', '--split=test'])
  np.testing.assert_array_equal(np.load(tmp_path / 'p' / 'test_ims.npy'), np.stack([images[1][1], images[2][1]]))


def test_malformed_input_is_named(tmp_path):
  images = _images(2)
  _write_tsv(tmp_path / 'a.tsv', images)
  (tmp_path / 'ids.txt').write_text('img0\nimg9\n')
  with pytest.raises(ValueError, match=r"1 image\(s\) of --image_ids not found, e.g. \['img9'\]"):
    convert_features.main(['tsv', f'--input={tmp_path / "a.tsv"}', f'--image_ids={tmp_path / "ids.txt"}',
                           f'--out_dir={tmp_path / "o"}', '--split=test'])
  (tmp_path / 'bad.tsv').write_text('img0\t10\t10\t2\tnot-base64!\tAAAA\n')
  with pytest.raises(ValueError, match=r'bad.tsv:1: field boxes is not base64'):
    convert_features.main(['tsv', f'--input={tmp_path / "bad.tsv"}', f'--out_dir={tmp_path / "o"}', '--split=x'])
  (tmp_path / 'short.tsv').write_text('img0\t10\t10\n')
  with pytest.raises(ValueError, match=r'short.tsv:1: 3 columns; expected 6'):
    convert_features.main(['tsv', f'--input={tmp_path / "short.tsv"}', f'--out_dir={tmp_path / "o"}', '--split=x'])
  other = _images(1, k=7)[0]
  _write_tsv(tmp_path / 'mixed.tsv', [images[0], ('img5',) + other[1:]])
  with pytest.raises(ValueError, match=r'image img5 has features \(7, 6\); the first image had \(5, 6\)'):
    convert_features.main(['tsv', f'--input={tmp_path / "mixed.tsv"}', f'--out_dir={tmp_path / "o"}', '--split=x'])
