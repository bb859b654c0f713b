r"""TFDS builder of the built-in `shapes` dataset (`xmatch_shapes`): rendered scenes with detector-like regions.

Build (happens on first use through `shapes_builder`; array_record files, no TensorFlow needed):

  python -c "from xmatch_jax.data import shapes; shapes.shapes_builder('DATA_DIR', config='default')"

Every image i of a split is `shapes_scenes.example_from_scene(scene_for_index(split, i),
example_seed(split, i), image_id=i)`, a pure function of (split, i), so the data does not depend on how it is
generated; shuffling is disabled so `as_data_source(split)[i]` is image i. Images 8g..8g+7 are one look-alike
group (same objects, different relations / colour binding; see `shapes_scenes.sample_group`).

Features per image: `image_id` int64; `regions` [12, 256] float32; `boxes` [12, 4] float32 (x1, y1, x2, y2 in
[0, 1]); `tags` 12 strings ("red circle", ~12% wrong, "background"); `pixels` [64, 64, 3] uint8; `label` int64
ClassLabel in [0, NUM_LABELS = 30): shape and colour of the largest object (ties: leftmost), names
`shapes_scenes.LABEL_NAMES`; `scene` JSON text (`shapes_scenes` documents it); `captions` 5 strings.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from xmatch_jax import errors
from xmatch_jax.data import array_record
from xmatch_jax.data import shapes_scenes
from xmatch_jax.data.shapes_scenes import CANVAS
from xmatch_jax.data.shapes_scenes import CAPTIONS_PER_IMAGE
from xmatch_jax.data.shapes_scenes import NUM_LABELS
from xmatch_jax.data.shapes_scenes import NUM_REGIONS
from xmatch_jax.data.shapes_scenes import REGION_DIM

__all__ = [
  'XmatchShapes',
  'shapes_builder',
  'CANVAS',
  'CAPTIONS_PER_IMAGE',
  'NUM_LABELS',
  'NUM_REGIONS',
  'REGION_DIM',
  'SPLITS',
]

SPLITS = ('train', 'dev', 'test')
# Arrays are stored as raw bytes: TFDS's default per-value proto lists doubled the build time (41 s -> 20 s).
_RAW = tfds.features.Encoding.BYTES


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Number of images per split (images are the first n of each split's fixed sequence)."""

  train: int = 0
  dev: int = 0
  test: int = 0


class XmatchShapes(array_record.ArrayRecordBuilder):
  """Scenes of 2-4 coloured shapes with region features, tags, labels and 5 captions per image."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
    '1.0.0': 'Initial release: 2-4 objects (5 shapes, 6 colours, 2 sizes) on 64x64, 12 regions of 256-d, '
    'look-alike groups of 8 (4 layouts x 2 colour bindings), 5 grammar captions per image.',
  }
  BUILDER_CONFIGS = [
    ShapesConfig(
      name='default',
      description='Flickr30K-sized protocol: 1000 test images, 5000 captions.',
      train=10_000,
      dev=1_000,
      test=1_000,
    ),
    ShapesConfig(
      name='tiny', description='For tests: the first images of every split of `default`.', train=300, dev=100, test=100
    ),
  ]
  DEFAULT_CONFIG_NAME = 'default'

  def _info(self) -> tfds.core.DatasetInfo:
    return array_record.LocalDatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image_id': tfds.features.Scalar(np.int64),
          'regions': tfds.features.Tensor(shape=(NUM_REGIONS, REGION_DIM), dtype=np.float32, encoding=_RAW),
          'boxes': tfds.features.Tensor(shape=(NUM_REGIONS, 4), dtype=np.float32, encoding=_RAW),
          'tags': tfds.features.Sequence(tfds.features.Text(), length=NUM_REGIONS),
          # tfds.features.Image needs TensorFlow to encode; raw uint8 is 12 KB per image.
          'pixels': tfds.features.Tensor(shape=(CANVAS, CANVAS, 3), dtype=np.uint8, encoding=_RAW),
          'label': tfds.features.ClassLabel(names=list(shapes_scenes.LABEL_NAMES)),
          'scene': tfds.features.Text(),
          'captions': tfds.features.Sequence(tfds.features.Text(), length=CAPTIONS_PER_IMAGE),
        }
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated
    return {split: self._generate_examples(split, getattr(self.builder_config, split)) for split in SPLITS}

  def _generate_examples(self, split: str, num_images: int):
    for index in range(num_images):
      scene = shapes_scenes.scene_for_index(split, index)
      yield index, shapes_scenes.example_from_scene(scene, shapes_scenes.example_seed(split, index), index)


def shapes_builder(data_dir: str, config: str = 'default') -> XmatchShapes:
  """The `xmatch_shapes/<config>` builder in `data_dir` (array_record), generated there on first use.

  Generation is single-process (default config: ~20 s on 2 CPU cores). Multi-process runs should build it
  once beforehand rather than let every process race to generate it.
  """
  names = [c.name for c in XmatchShapes.BUILDER_CONFIGS]
  if config not in names:
    raise errors.UserError(f'xmatch_shapes has no config {config!r}; expected one of {names}.')
  # Generated when missing; an incomplete or foreign build is an error naming the directory to delete.
  return XmatchShapes.prepare(config=config, data_dir=data_dir)
