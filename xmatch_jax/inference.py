"""Encoding and all-pairs scoring of whole splits in fixed-size chunks (one compile per chunk shape).

Used by dev evaluation during training, `xmatch_jax.evaluate` and the `Retriever` API.
"""

import json
import os
import shutil

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from xmatch_jax import errors
from xmatch_jax import parallel
from xmatch_jax import progress

# All-pairs scoring takes each caption at its length rounded up to a multiple of this: one compiled program per
# multiple (3 for captions up to 24 tokens), not every caption at the split's longest.
TOKEN_STEP = 8


def pad_rows(tree, size: int):
  """Pads the leading axis of every leaf to `size` with zeros."""

  def pad(x):
    widths = [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, widths)

  return jax.tree.map(pad, tree)


def caption_widths(lengths: np.ndarray) -> np.ndarray:
  """[C] token counts -> [C] scoring widths: each length rounded up to TOKEN_STEP, at least TOKEN_STEP."""
  return np.maximum(-(-lengths // TOKEN_STEP) * TOKEN_STEP, TOKEN_STEP)


def map_chunks(fn, tree, chunk: int, desc: str | None = None, unit: str = 'row'):
  """Applies `fn` to fixed-size row chunks of `tree` (last one zero-padded) and concatenates the results.

  With `desc`, a progress bar (shown when the pass lasts over 10 s) counts the `unit`s (rows) whose chunk has been
  computed: one chunk stays in flight, so the next chunk is read and dispatched while the device computes this one.
  """
  n = jax.tree.leaves(tree)[0].shape[0]
  outputs = []
  bar = progress.bar(total=n, desc=desc, unit=unit) if desc is not None else None
  in_flight = None  # (rows, output) of the last dispatched chunk, not yet known to be computed
  try:
    for start in range(0, n, chunk):
      part = jax.tree.map(lambda x: x[start : start + chunk], tree)
      rows = jax.tree.leaves(part)[0].shape[0]
      out = fn(pad_rows(part, chunk) if rows < chunk else part)
      outputs.append(jax.tree.map(lambda y: y[:rows], out))
      if bar is not None:
        if in_flight is not None:
          jax.block_until_ready(in_flight[1])
          bar.update(in_flight[0])
        in_flight = (rows, out)
    result = jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=0), *outputs)
    if bar is not None:
      jax.block_until_ready(result)
      bar.update(n - bar.n)
    return result
  finally:
    if bar is not None:
      bar.close()


class Scorer:
  """Jitted `encode_image`, `encode_text` and `pair_scores` of one model and its variables.

  All-pairs scoring, the cost of an evaluation, is split over `devices` (default: every local device): each call
  scores image_chunk images per device against a tile of captions (shard_map over the images, no collectives),
  so every device runs the same program on the same shapes as a one-device scorer and the scores are the same.
  In a multi-process job with `devices` not given, the images are also split over the processes: each scores its
  contiguous share on its local devices, and every finished column of tiles is all-gathered, so every process
  returns the whole matrix (docs/architecture.md, "Parallelism"). Every process must then call `pair_scores` with
  the same reps, as training's dev scoring and a multi-process `evaluate` do.
  """

  def __init__(
    self,
    model,
    variables,
    image_chunk: int = 128,
    text_batch: int = 256,
    desc: str = 'scoring',
    devices: list | None = None,
  ):
    if image_chunk < 1 or text_batch < 1:
      raise errors.UserError(f'image_chunk and text_batch must be >= 1; got {image_chunk}, {text_batch}.')
    self.model = model
    self.variables = variables
    self.image_chunk = image_chunk
    self.text_batch = text_batch
    self.desc = desc  # the progress bar's label (bars appear for scoring that lasts over 10 s)
    self.devices = list(devices or jax.local_devices())
    self.processes = 1 if devices else jax.process_count()  # given devices: this process scores alone
    self._encode_image = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image))
    self._encode_text = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_text))
    self.mesh = mesh = jax.sharding.Mesh(np.array(self.devices), ('images',))  # the devices, along `images`
    spec = jax.sharding.PartitionSpec
    # Inputs committed to one device (the trainer's local copy of the params, reps computed from them) are placed
    # on the mesh first: replicated variables and captions, images split.
    self.replicated = jax.sharding.NamedSharding(mesh, spec())
    self.split = jax.sharding.NamedSharding(mesh, spec('images'))
    self._mesh_variables = None
    self._pair_scores = jax.jit(
      jax.shard_map(
        lambda v, i, t: model.apply(v, i, t, method=model.pair_scores),
        mesh=mesh,
        in_specs=(spec(), spec('images'), spec()),
        out_specs=spec('images'),
        check_vma=False,
      )
    )
    self._tile_scores = {}  # `pair_list_scores`' jitted programs, one per (width, tiles per call)

  @property
  def mesh_variables(self):
    """The variables replicated over the mesh, placed on first use (the trainer's copy may sit on one device)."""
    if self._mesh_variables is None:
      self._mesh_variables = jax.device_put(self.variables, self.replicated)
    return self._mesh_variables

  def process_share(self, tree, n: int):
    """This process's contiguous share of the n rows of `tree`, zero-padded to ceil(n / processes) rows (the whole
    tree in one process). `gather_shares` puts the shares' results back together."""
    if self.processes == 1:
      return tree
    share = -(-n // self.processes)
    first = jax.process_index() * share
    return pad_rows(jax.tree.map(lambda x: np.asarray(x[first : first + share]), tree), share)

  def gather_shares(self, rows: np.ndarray, n: int) -> np.ndarray:
    """Every process's result rows for its `process_share`, all-gathered in process order and cut to n rows."""
    if self.processes > 1:
      rows = np.asarray(multihost_utils.process_allgather(rows)).reshape(-1, *rows.shape[1:])
    return np.asarray(rows)[:n]

  def encode_images(self, images: dict):
    """images: dataset-format dict -> image rep pytree with leading dim n_img."""
    inputs = self.model.image_inputs(images)
    return map_chunks(
      lambda x: self._encode_image(self.variables, x),
      inputs,
      self.image_chunk,
      desc=f'{self.desc}: encoding images',
      unit='image',
    )

  def encode_text(self, tokens: np.ndarray, mask: np.ndarray):
    """tokens, mask: [n_txt, n] -> text rep pytree with leading dim n_txt."""
    inputs = {'tokens': np.asarray(tokens, np.int32), 'mask': np.asarray(mask, np.float32)}
    return map_chunks(
      lambda x: self._encode_text(self.variables, x),
      inputs,
      self.text_batch,
      desc=f'{self.desc}: encoding captions',
      unit='caption',
    )

  def pair_scores(self, image_rep, text_rep, resume_dir: str | None = None, identity: dict | None = None) -> np.ndarray:
    """All pairs -> [n_img, n_txt] numpy, streamed in tiles of image_chunk images (per device) x text_batch captions.

    Tiling both sides bounds memory for heads whose pair tensors grow with the caption count (MMCA's joint
    sequence); the columns of zero-padded captions in the last tile are dropped. When the model can cut its text
    rep's token axis (`Matcher.text_lengths`, `trim_text_rep`), each caption is scored at its length rounded up to
    TOKEN_STEP, in tiles of captions of one such width: a split padded to its longest caption (96 tokens for
    Flickr30K's, 14 on average) is not scored at that length. The returned columns are in the given order. With
    `resume_dir`, every finished column of tiles (all images x text_batch captions) is saved there and a later
    call with the same `identity`
    (what the scores depend on: checkpoint, data, sizes) computes only the missing ones: an interrupted COCO-5K
    evaluation resumes. The directory is removed when the matrix is complete.
    """
    n_txt = jax.tree.leaves(text_rep)[0].shape[0]
    n_img = jax.tree.leaves(image_rep)[0].shape[0]
    chief = self.processes == 1 or jax.process_index() == 0
    lengths = self.model.text_lengths(text_rep)
    order = None  # positions of the captions in scoring order (None: as given)
    tiles = [(start, min(start + self.text_batch, n_txt), None) for start in range(0, n_txt, self.text_batch)]
    if lengths is not None:
      # Every caption is scored at its own width (its length rounded up to TOKEN_STEP), whatever its neighbours:
      # tiles never mix widths, so identical captions get identical scores (ties rank as without trimming).
      widths = caption_widths(lengths)
      order = np.argsort(widths, kind='stable')
      widths = widths[order]
      tiles = []
      for width in np.unique(widths):
        first, end = np.searchsorted(widths, width), np.searchsorted(widths, width, side='right')
        tiles += [
          (start, min(start + self.text_batch, end), int(width)) for start in range(first, end, self.text_batch)
        ]
    identity = {**(identity or {}), 'shape': [n_img, n_txt], 'text_batch': self.text_batch}
    identity['caption_order'] = 'by_width' if order is not None else 'given'
    done = _ColumnStore(resume_dir if chief else None, identity)  # process 0 keeps the finished columns
    image_rep = self.process_share(image_rep, n_img)
    columns = []
    with progress.bar(total=n_img * n_txt, desc=self.desc, unit='pair', unit_scale=True) as bar:
      for start, stop, width in tiles:
        rows = stop - start
        if width is None:
          part = jax.tree.map(lambda x: x[start:stop], text_rep)
        else:  # gathered tile by tile: no reordered copy of the whole rep
          part = self.model.trim_text_rep(jax.tree.map(lambda x: x[order[start:stop]], text_rep), width)
        column = self._finished_column(done, start, (n_img, rows), resume_dir)
        if column is None:
          if rows < self.text_batch:
            part = pad_rows(part, self.text_batch)
          on_mesh = jax.device_put(part, self.replicated)
          tile = np.asarray(
            map_chunks(
              lambda i: self._pair_scores(self.mesh_variables, jax.device_put(i, self.split), on_mesh),
              image_rep,
              self.image_chunk * len(self.devices),
            )
          )
          column = self.gather_shares(tile, n_img)[:, :rows]
          done.put(start, column)
        columns.append(column)
        bar.update(n_img * rows)
    done.finish()
    scores = np.concatenate(columns, axis=1)
    if order is None:
      return scores
    given = np.empty_like(scores)
    given[:, order] = scores
    return given

  def _finished_column(self, done, start: int, shape: tuple, resume_dir: str | None) -> np.ndarray | None:
    """The column from an earlier, interrupted call; with several processes process 0's copy, sent to all."""
    column = done.get(start, shape)
    if self.processes == 1 or resume_dir is None:
      return column
    if not parallel.agree({'found': float(column is not None)})['found']:
      return None
    return np.asarray(
      multihost_utils.broadcast_one_to_all(column if column is not None else np.zeros(shape, np.float32))
    )

  def pair_list_scores(self, image_rep, text_rep, image_index, caption_index, tile: int = 64) -> np.ndarray:
    """Full scores of the listed pairs (image image_index[p], caption caption_index[p]) -> [P] numpy; two-stage
    retrieval (`xmatch_jax.rerank`) scores its candidates with it.

    The pairs are grouped by caption width (each caption at its length rounded up to TOKEN_STEP, as `pair_scores`
    scores it) and then by image: a tile is one image against up to `tile` of its listed captions, scored as a dense
    [1, size] block, so a pair costs what it costs in exhaustive scoring plus the gather of its caption's rep. The
    size is the mean number of pairs per image at that width rounded up to a power of 2, at most `tile`. One call
    runs `block_size x text_batch / size` tiles per device (the pairs of one exhaustive block), one tile at a time in
    lax.map: sequential tiles stay in cache, and were faster than vmapped ones (SCAN f30k: 5.9 k vs 2.9 k pairs/s).
    The tiles of a width are split as `pair_scores` splits images: contiguous shares over the processes (each
    process's scores all-gathered), and within a process over its devices; every tile runs the same program
    wherever it runs, so the scores do not depend on the split. Every process must pass the same list.
    """
    image_index, caption_index = np.asarray(image_index, np.int64), np.asarray(caption_index, np.int64)
    if image_index.shape != caption_index.shape or image_index.ndim != 1:
      raise errors.UserError(
        f'image_index and caption_index must be two [P] arrays; got shapes {image_index.shape}, {caption_index.shape}.'
      )
    scores = np.zeros(len(image_index), np.float32)
    if not len(image_index):
      return scores
    lengths = self.model.text_lengths(text_rep)
    widths = caption_widths(lengths)[caption_index] if lengths is not None else np.zeros_like(caption_index)
    order = np.lexsort((caption_index, image_index, widths))  # by width, then image
    on_mesh = jax.device_put(image_rep, self.replicated)
    with progress.bar(total=len(order), desc=f'{self.desc} (re-rank)', unit='pair', unit_scale=True) as bar:
      for width in np.unique(widths):
        in_width = order[widths[order] == width]
        # Tiles: runs of one image, cut every `tile` pairs; padding slots repeat the tile's first pair.
        runs = np.flatnonzero(np.r_[True, np.diff(image_index[in_width]) != 0])
        run_ends = np.r_[runs[1:], len(in_width)]
        # Few pairs per image (sparse lists): smaller tiles, so padding does not dominate.
        size = int(min(tile, 2 ** np.ceil(np.log2(np.mean(run_ends - runs)))))
        per_device = max(1, (getattr(self.model, 'block_size', None) or 1) * self.text_batch // size)
        per_call = per_device * len(self.devices)
        bounds = [(a, min(a + size, end)) for run, end in zip(runs, run_ends) for a in range(run, end, size)]
        slots = np.array([np.r_[np.arange(a, e), np.full(size - (e - a), a)] for a, e in bounds])  # [T, size]
        pairs = in_width[slots]  # positions in the given list
        real = np.array([np.arange(size) < e - a for a, e in bounds])
        part = text_rep if lengths is None else self.model.trim_text_rep(text_rep, int(width))
        part = jax.device_put(part, self.replicated)
        fn = self._tile_program(int(width), per_call)
        mine = self.process_share(pairs, len(pairs))  # this process's tiles
        out = np.zeros((len(mine), size), np.float32)
        for start in range(0, len(mine), per_call):
          chunk = mine[start : start + per_call]
          rows = len(chunk)
          if rows < per_call:  # one compiled shape per width
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], per_call - rows, axis=0)])
          images = jax.device_put(image_index[chunk[:, 0]], self.split)
          captions = jax.device_put(caption_index[chunk], self.split)
          out[start : start + rows] = np.asarray(fn(self.mesh_variables, on_mesh, part, images, captions))[:rows]
          if self.processes == 1:
            bar.update(int(real[start : start + rows].sum()))
        out = self.gather_shares(out, len(pairs))
        if self.processes > 1:
          bar.update(int(real.sum()))
        scores[pairs[real]] = out[real]
    return scores

  def _tile_program(self, width: int, per_call: int):
    """jit: (variables, image_rep, text_rep, images [G], captions [G, size]) -> [G, size], one image per tile, the G
    tiles split over the devices (G = per_call)."""
    key = (width, per_call)
    if key not in self._tile_scores:
      model = self.model
      spec = jax.sharding.PartitionSpec

      def tiles(variables, image_rep, text_rep, images, captions):
        take = lambda rep, index: jax.tree.map(lambda x: x[index], rep)
        one = lambda it: model.apply(
          variables, take(image_rep, it[0][None]), take(text_rep, it[1]), method=model.pair_scores
        )[0]
        return jax.lax.map(one, (images, captions))

      self._tile_scores[key] = jax.jit(
        jax.shard_map(
          tiles,
          mesh=self.mesh,
          in_specs=(spec(), spec(), spec(), spec('images'), spec('images')),
          out_specs=spec('images'),
          check_vma=False,
        )
      )
    return self._tile_scores[key]

  def score(self, images: dict, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return self.pair_scores(self.encode_images(images), self.encode_text(tokens, mask))


class _ColumnStore:
  """Finished score columns of one `Scorer.pair_scores` call on disk (`resume_dir`), valid for one identity."""

  def __init__(self, directory: str | None, identity: dict):
    self.directory = directory
    if directory is None:
      return
    manifest = os.path.join(directory, 'identity.json')
    identity = json.loads(json.dumps(identity))  # as it reads back
    if os.path.exists(manifest):
      with open(manifest) as f:
        try:
          same = json.load(f) == identity
        except json.JSONDecodeError:
          same = False
      if not same:  # another checkpoint, split or size: nothing here is valid
        shutil.rmtree(directory)
    os.makedirs(directory, exist_ok=True)
    if not os.path.exists(manifest):
      with open(manifest, 'w') as f:
        json.dump(identity, f)
    found = sorted(n for n in os.listdir(directory) if n.startswith('columns_') and n.endswith('.npy'))
    if found:
      progress.write(f'{directory}: resuming with {len(found)} finished column block(s)')

  def _path(self, start: int) -> str:
    return os.path.join(self.directory, f'columns_{start:09d}.npy')

  def get(self, start: int, shape: tuple) -> np.ndarray | None:
    if self.directory is None or not os.path.exists(self._path(start)):
      return None
    try:
      column = np.load(self._path(start), allow_pickle=False)
    except (ValueError, OSError, EOFError):  # cut short by the interruption: compute it again
      return None
    return column if column.shape == shape else None

  def put(self, start: int, column: np.ndarray) -> None:
    if self.directory is None:
      return
    tmp = self._path(start) + '.tmp.npy'
    np.save(tmp, column)
    os.replace(tmp, self._path(start))  # a column file is whole or absent

  def finish(self) -> None:
    if self.directory is not None:
      shutil.rmtree(self.directory, ignore_errors=True)
