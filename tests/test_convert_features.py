"""tools/convert_features.py: bottom-up-attention TSV and per-image npz -> precomp npy + PFAN boxes, in the order
of an id list, streaming; region tags from class / attribute ids (TSV with detections, npz arrays or the pickled info
dict, read without running code); malformed input is named."""

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
      f.write(
        '\t'.join(
          [
            image_id,
            str(w),
            str(h),
            str(len(feats)),
            base64.b64encode(boxes.tobytes()).decode(),
            base64.b64encode(feats.tobytes()).decode(),
          ]
        )
        + '\n'
      )


def test_tsv_in_id_order_with_pfan_positions(tmp_path):
  images = _images()
  _write_tsv(tmp_path / 'a.tsv', images[:2])
  _write_tsv(tmp_path / 'b.tsv', images[2:])
  (tmp_path / 'ids.txt').write_text('img3\nimg0\nimg2\n')
  assert (
    convert_features.main(
      [
        'tsv',
        f'--input={tmp_path / "a.tsv"}',
        f'--input={tmp_path / "b.tsv"}',
        f'--image_ids={tmp_path / "ids.txt"}',
        f'--out_dir={tmp_path / "out"}',
        '--split=test',
      ]
    )
    == 0
  )
  ims = np.load(tmp_path / 'out' / 'test_ims.npy')
  np.testing.assert_array_equal(ims, np.stack([images[3][1], images[0][1], images[2][1]]))
  blocks, weights = pfan.from_pfan_layout(np.load(tmp_path / 'out' / 'test_boxes.npy'))
  want_blocks, want_weights = pfan.block_positions(images[3][2][None], np.array([images[3][3]]))
  np.testing.assert_array_equal(blocks[0], want_blocks[0])
  np.testing.assert_allclose(weights[0], want_weights[0], rtol=1e-6)


@pytest.mark.slow
def test_tsv_order_without_ids_and_npz(tmp_path):
  images = _images(3)
  _write_tsv(tmp_path / 'a.tsv', images)
  convert_features.main(['tsv', f'--input={tmp_path / "a.tsv"}', f'--out_dir={tmp_path / "o"}', '--split=dev'])
  assert (tmp_path / 'o' / 'dev_ids.txt').read_text().split() == ['img0', 'img1', 'img2']
  os.makedirs(tmp_path / 'npz')
  for image_id, feats, boxes, (w, h) in images:
    np.savez(tmp_path / 'npz' / f'{image_id}.npz', x=feats, bbox=boxes, image_w=w, image_h=h)
  (tmp_path / 'ids.txt').write_text('img1\nimg2\n')
  convert_features.main(
    [
      'npz',
      f'--input={tmp_path / "npz"}',
      f'--image_ids={tmp_path / "ids.txt"}',
      f'--out_dir={tmp_path / "p"}',
      '--split=test',
    ]
  )
  np.testing.assert_array_equal(np.load(tmp_path / 'p' / 'test_ims.npy'), np.stack([images[1][1], images[2][1]]))


@pytest.mark.slow
def test_malformed_input_is_named(tmp_path):
  images = _images(2)
  _write_tsv(tmp_path / 'a.tsv', images)
  (tmp_path / 'ids.txt').write_text('img0\nimg9\n')
  with pytest.raises(ValueError, match=r"1 image\(s\) of --image_ids not found, e.g. \['img9'\]"):
    convert_features.main(
      [
        'tsv',
        f'--input={tmp_path / "a.tsv"}',
        f'--image_ids={tmp_path / "ids.txt"}',
        f'--out_dir={tmp_path / "o"}',
        '--split=test',
      ]
    )
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


OBJECTS_VOCAB = 'car,auto\nplate\nstop sign,stopsign\n'
ATTRIBUTES_VOCAB = 'white\nred\n'


def _write_detections_tsv(path, images, labels, header=False, id_dtype=np.int64):
  """The 10-column layout (py-bottom-up-attention / LXMERT: img_h before img_w) with class / attribute ids."""

  def b64(a):
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()

  with open(path, 'w') as f:
    if header:
      f.write('\t'.join(convert_features.TSV_FIELDS_DETECTIONS) + '\n')
    for (image_id, feats, boxes, (w, h)), (objects, attrs, conf) in zip(images, labels):
      f.write(
        '\t'.join(
          [
            image_id,
            str(h),
            str(w),
            b64(np.asarray(objects, id_dtype)),
            b64(np.ones(len(feats), np.float32)),
            b64(np.asarray(attrs, id_dtype)),
            b64(np.asarray(conf, np.float32)),
            str(len(feats)),
            b64(boxes),
            b64(feats),
          ]
        )
        + '\n'
      )


def _vocab_args(tmp_path, attributes=True):
  (tmp_path / 'objects_vocab.txt').write_text(OBJECTS_VOCAB)
  (tmp_path / 'attributes_vocab.txt').write_text(ATTRIBUTES_VOCAB)
  return [f'--objects_vocab={tmp_path / "objects_vocab.txt"}'] + (
    [f'--attributes_vocab={tmp_path / "attributes_vocab.txt"}'] if attributes else []
  )


@pytest.mark.slow
def test_tsv_with_detections_writes_tags_in_id_order(tmp_path, capsys):
  images = _images(3, k=3)
  labels = [
    ([0, 1, 2], [1, 0, 1], [0.9, 0.0, 0.05]),
    ([2, 2, 1], [0, 0, 1], [0.5, 0.5, 0.5]),
    ([1, 0, 0], [1, 1, 1], [0.2, 0.2, 0.2]),
  ]
  _write_detections_tsv(tmp_path / 'd.tsv', images, labels, header=True)
  (tmp_path / 'ids.txt').write_text('img2\nimg0\n')
  convert_features.main(
    [
      'tsv',
      f'--input={tmp_path / "d.tsv"}',
      f'--image_ids={tmp_path / "ids.txt"}',
      f'--out_dir={tmp_path / "o"}',
      '--split=test',
    ]
    + _vocab_args(tmp_path)
  )
  # Attribute confidence 0 (exports without an attribute head) drops the attribute; img_h / img_w order is read.
  assert (tmp_path / 'o' / 'test_tags.txt').read_text() == (
    'red plate\tred car\tred car\nred car\tplate\tred stop sign\n'
  )
  np.testing.assert_array_equal(np.load(tmp_path / 'o' / 'test_ims.npy'), np.stack([images[2][1], images[0][1]]))
  blocks, _ = pfan.from_pfan_layout(np.load(tmp_path / 'o' / 'test_boxes.npy'))
  np.testing.assert_array_equal(blocks[1], pfan.block_positions(images[0][2][None], np.array([images[0][3]]))[0][0])
  assert 'test_tags.txt' in capsys.readouterr().out

  # int32 ids, columns named by --tsv_fields, TSV order, a threshold, class names only.
  _write_detections_tsv(tmp_path / 'e.tsv', images, labels, id_dtype=np.int32)
  convert_features.main(
    [
      'tsv',
      f'--input={tmp_path / "e.tsv"}',
      f'--out_dir={tmp_path / "p"}',
      '--split=dev',
      '--tsv_fields=img_id,img_h,img_w,objects_id,objects_conf,attrs_id,attrs_conf,num_boxes,boxes,features',
      '--attr_threshold=0.3',
    ]
    + _vocab_args(tmp_path)
  )
  assert (tmp_path / 'p' / 'dev_tags.txt').read_text().splitlines()[:2] == [
    'red car\tplate\tstop sign',
    'white stop sign\twhite stop sign\tred plate',
  ]
  convert_features.main(
    ['tsv', f'--input={tmp_path / "e.tsv"}', f'--out_dir={tmp_path / "q"}', '--split=dev']
    + _vocab_args(tmp_path, attributes=False)
  )
  assert (tmp_path / 'q' / 'dev_tags.txt').read_text().splitlines()[2] == 'plate\tcar\tcar'
  # Without the vocab files: features only, and a hint that tags could be written.
  convert_features.main(['tsv', f'--input={tmp_path / "e.tsv"}', f'--out_dir={tmp_path / "r"}', '--split=dev'])
  assert not (tmp_path / 'r' / 'dev_tags.txt').exists() and '--objects_vocab' in capsys.readouterr().out


class _Code:
  def __reduce__(self):
    return (print, ('pickled code ran',))


def test_npz_tags_from_arrays_and_from_the_pickled_info_dict(tmp_path, capsys):
  images = _images(2, k=3)
  os.makedirs(tmp_path / 'a')
  os.makedirs(tmp_path / 'b')
  for i, (image_id, feats, boxes, (w, h)) in enumerate(images):
    np.savez(
      tmp_path / 'a' / f'{image_id}.npz',
      x=feats,
      bbox=boxes,
      image_w=w,
      image_h=h,
      objects=np.array([i, 1, 2]),
      attrs=np.array([1, 1, 0]),
    )
    # bottom-up-attention.pytorch: the ids in a pickled dict, read without unpickling arbitrary objects.
    info = {
      'image_id': image_id,
      'num_boxes': 3,
      'objects_id': np.array([2, i, 0]),
      'objects_conf': np.ones(3),
      'attrs_id': np.array([0, 1, 1]),
      'attrs_conf': np.array([0.5, 0.5, 0.0], np.float32),
    }
    np.savez_compressed(
      tmp_path / 'b' / f'{image_id}.npz',
      x=feats,
      bbox=boxes,
      num_bbox=3,
      image_w=w,
      image_h=h,
      info=np.array(info, dtype=object),
    )
  (tmp_path / 'ids.txt').write_text('img1\nimg0\n')
  for directory, want in (
    ('a', ['red plate\tred plate\twhite stop sign', 'red car\tred plate\twhite stop sign']),
    ('b', ['white stop sign\tred plate\tcar', 'white stop sign\tred car\tcar']),
  ):
    convert_features.main(
      [
        'npz',
        f'--input={tmp_path / directory}',
        f'--image_ids={tmp_path / "ids.txt"}',
        f'--out_dir={tmp_path / directory / "o"}',
        '--split=test',
      ]
      + _vocab_args(tmp_path)
    )
    assert (tmp_path / directory / 'o' / 'test_tags.txt').read_text().splitlines() == want
  np.savez(
    tmp_path / 'b' / 'img0.npz',
    x=images[0][1],
    bbox=images[0][2],
    image_w=1,
    image_h=1,
    info=np.array({'objects_id': _Code()}, dtype=object),
  )
  with pytest.raises(ValueError, match=r'img0.npz: a field cannot be read .*refusing to load global builtins.print'):
    convert_features.main(
      [
        'npz',
        f'--input={tmp_path / "b"}',
        f'--image_ids={tmp_path / "ids.txt"}',
        f'--out_dir={tmp_path / "x"}',
        '--split=test',
      ]
      + _vocab_args(tmp_path)
    )
  assert 'pickled code ran' not in capsys.readouterr().out


def test_tag_errors_are_named(tmp_path):
  images = _images(2, k=3)
  _write_detections_tsv(
    tmp_path / 'd.tsv', images, [([0, 1, 2], [0, 0, 0], [1, 1, 1]), ([0, 3, 2], [0, 0, 0], [1, 1, 1])]
  )
  args = ['tsv', f'--input={tmp_path / "d.tsv"}', f'--out_dir={tmp_path / "o"}', '--split=x']
  with pytest.raises(
    ValueError,
    match=r'd.tsv: image img1 region 1: objects_id 3 is outside .*objects_vocab.txt '
    r'\(3 names: ids 0 .. 2\)',
  ):
    convert_features.main(args + _vocab_args(tmp_path))
  _write_tsv(tmp_path / 'plain.tsv', images)
  with pytest.raises(ValueError, match=r'plain.tsv: image img0 has no objects_id; tags need detections'):
    convert_features.main(
      ['tsv', f'--input={tmp_path / "plain.tsv"}', f'--out_dir={tmp_path / "o"}', '--split=x'] + _vocab_args(tmp_path)
    )
  (tmp_path / 'bad_vocab.txt').write_text('car\n\nplate\n')
  with pytest.raises(ValueError, match=r'bad_vocab.txt: line 2 is empty; expected one object class name per line'):
    convert_features.main(args + [f'--objects_vocab={tmp_path / "bad_vocab.txt"}'])
  with pytest.raises(SystemExit):
    convert_features.main(args + [f'--attributes_vocab={tmp_path / "attributes_vocab.txt"}'])
