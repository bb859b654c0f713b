"""A paper-scale dry run without the real files: Flickr30K-sized synthetic features, built, trained on and evaluated.

  python tools/paper_dry_run.py --dir=/tmp/dry --scale=0.02 --steps=3 --coco_5k --json=/tmp/dry/report.json
  python tools/paper_dry_run.py --dir=/scratch/dry --coco_5k          # the real sizes: 22 GiB of disk

1. Data. A synthetic manual dir at Flickr30K's sizes x --scale (train 29,000, dev 1,000, test 1,000 images; SCAN's
   f30k_precomp has 1,000 dev images, the builder checks it; the Karpathy split's 1,014 are not used), 36 x 2048
   float32 regions per image (uniform in [0, 1)), 5 captions per image. Features go to disk through a memory map
   one chunk at a time (precomp_build_memory.write_features), so memory stays bounded at any scale. The disk needed
   (manual dir + TFDS build: two copies of the features, plus checkpoints) is printed first, and the run is refused
   when the file system of --dir has less free. Captions: each copies the token pattern of a random caption of the
   Flickr30K fixture (--captions; tokenised as training tokenises) and replaces every word by a draw from a Zipf
   law over real words (the fixture's words by frequency, then the rest of SCAN's f30k vocabulary, --vocab);
   punctuation stays. So tokens per caption follow the fixture's empirical distribution (its mean / min / max are
   reported) and word frequencies have a realistic long tail.
2. Build: `precomp.build` in a child process (time and peak RSS reported).
3. Per model, the user's commands in child processes, with XMATCH_LAZY=1 (features read from the array_record
   files batch by batch) and XMATCH_DATA_DIR=<dir>/tfds:
     python -m xmatch_jax.train --config=configs/<model>.py:f30k --workdir=<dir>/runs/<model> \\
         --config.max_steps=<steps> --config.log_every_steps=1
     python -m xmatch_jax.evaluate --workdir=<dir>/runs/<model> --split=test --protocol=f30k_1k
   and with --coco_5k a 5,000-image x 25,000-caption split (x --scale), exhaustive (the models of --exhaustive,
   default all) and with --rerank_k. Each evaluation's JSON is copied to <dir>/results/<model>/<evaluation>.json
   (the workdir's W/eval/ names can clash).

Dataset names. The f30k and coco builders check the real split sizes, so only --scale=1 uses them: training on
`f30k`, `--protocol=f30k_1k`, and the coco_5k shape as a cross-dataset evaluation of the f30k run on a synthetic
coco_precomp manual dir (1-image train / dev / test, testall 5,000 x 25,000): `--config.dataset=coco
--protocol=coco_5k`. At --scale < 1 the same files are dataset `precomp` (`--config.dataset=precomp`; the f30k
config's hyperparameters are unchanged) and evaluation is recall over the whole scaled test split (no named
protocol); the coco shape is a second `precomp` data dir (<dir>/tfds_coco) evaluated with `--config.data_dir`.

The table:
  steps/s     1 / the median step time, from the train loop's own per-step `steps_per_s` (W/metrics.jsonl,
              logged every step). Logging every step waits for each step, so a step's time is building its batch
              plus computing it (no overlap). The step is compiled before the loop for the first batch's caption
              length; a batch whose longest caption falls in a length bucket not seen yet compiles again inside
              its step, an outlier the median drops when --steps is at least ~5.
  data        the share of a step spent building its batch: a probe child loads the train split as training does
              (lazy) and times `TrainBatcher.batch(i)` + `jax.device_put` for the same steps; median batch time /
              median step time. The files were just written and read, so the page cache is warm; a cold read from
              a slow disk costs more.
  RSS         peak resident memory (the child's VmHWM, sampled every 0.2 s, mapped file pages included) of the
              training child / of the largest evaluation child.
  f30k_1k ... seconds of each evaluation: `scoring_seconds` of its JSON (all-pairs scoring, or shortlist and
              re-scoring, after the images and captions are encoded; compiles included), then in brackets the wall
              time of the evaluate process (start-up, data loading, encoding, metrics).

The report (--json) also holds the caption statistics, the build's time and peak RSS, the disk used, every step's
and batch's seconds, and per evaluation its recall, wall time and, when exhaustive, the number of score tiles
(eval_image_chunk x eval_text_batch, the last ones zero-padded: at small scales one tile costs as much as a full
one) and the seconds per tile, the figure to extrapolate from: Flickr30K 1K has 8 x 20 tiles, COCO 5K 40 x 98.
Linux only (/proc, os.wait4). The features (manual and TFDS dirs) are deleted at the end unless --keep; the runs,
logs and results stay in --dir.
"""

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time

from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.dirname(os.path.abspath(__file__))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
if TOOLS not in sys.path:
  sys.path.insert(0, TOOLS)

import precomp_build_memory  # pylint: disable=g-import-not-at-top

from xmatch_jax import cli  # pylint: disable=g-import-not-at-top
from xmatch_jax import errors  # pylint: disable=g-import-not-at-top
from xmatch_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top

FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'f30k_sample')  # 250 Flickr30K captions, SCAN's f30k vocab
# Flickr30K in SCAN's precomp release (Karpathy split; dev 1,000 images) and MS-COCO's 5K test.
F30K_IMAGES = {'train': 29000, 'dev': 1000, 'test': 1000}
COCO_5K_IMAGES = 5000
REGIONS, DIM = 36, 2048
CAPTIONS_PER_IMAGE = 5
CHECKPOINT_ALLOWANCE = 1 << 30  # disk per model run: SCAN / RDAN keep ~13M params + Adam state, latest and best
_BUILD = 'import sys; from xmatch_jax.data import precomp; precomp.build(sys.argv[1], sys.argv[2], sys.argv[3])'
_PROBE = (
  'import sys; sys.path.insert(0, sys.argv[1]); import paper_dry_run as t; t.probe(sys.argv[2], int(sys.argv[3]))'
)
_WORD = re.compile(r'[a-z][a-z0-9-]*')


def log(message: str) -> None:
  print(message, flush=True)


# ----------------------------------------------------------------------------------------------------- captions
class CaptionSampler:
  """Synthetic captions with the fixture's token patterns and Zipf-distributed real words."""

  def __init__(self, captions_path: str, vocab_path: str):
    with open(captions_path, encoding='utf-8') as f:
      fixture = [line.strip() for line in f if line.strip()]
    if not fixture:
      raise errors.UserError(f'{captions_path}: no captions; expected one caption per line')
    self.templates = [vocab_lib.tokenize(c) for c in fixture]
    counts = collections.Counter(t for tokens in self.templates for t in tokens if _WORD.fullmatch(t))
    ranked = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    rest = sorted(set(vocab_lib.Vocabulary.load(vocab_path).words) - set(ranked))
    self.words = [w for w in ranked + rest if _WORD.fullmatch(w) and vocab_lib.tokenize(w) == [w]]
    weights = 1.0 / np.arange(1, len(self.words) + 1)
    self.p = weights / weights.sum()
    self.slots = [np.array([bool(_WORD.fullmatch(t)) for t in tokens]) for tokens in self.templates]
    lengths = np.array([len(t) for t in self.templates])
    self.stats = {
      'fixture': captions_path,
      'fixture_captions': len(fixture),
      'tokens_per_caption_mean': round(float(lengths.mean()), 2),
      'tokens_per_caption_min': int(lengths.min()),
      'tokens_per_caption_max': int(lengths.max()),
      'word_pool': len(self.words),
      'fixture_words': len(ranked),
    }

  def write(self, path: str, n: int, rng: np.random.Generator, chunk: int = 20000) -> int:
    """Writes n captions, one per line; returns the bytes written."""
    written = 0
    with open(path, 'w', encoding='utf-8') as f:
      for start in range(0, n, chunk):
        which = rng.integers(len(self.templates), size=min(chunk, n - start))
        draws = iter(rng.choice(len(self.words), size=sum(int(self.slots[t].sum()) for t in which), p=self.p))
        lines = []
        for t in which:
          tokens = [self.words[next(draws)] if slot else tok for tok, slot in zip(self.templates[t], self.slots[t])]
          lines.append(' '.join(tokens) + '\n')
        text = ''.join(lines)
        f.write(text)
        written += len(text.encode('utf-8'))
    return written


# ------------------------------------------------------------------------------------------------------- layout
def plan(scale: float, coco_5k: bool, batch_size: int) -> dict:
  """Image counts per split of the f30k-shaped and the coco_5k-shaped data, and the dataset names to use."""
  paper = scale == 1.0
  f30k = {split: max(2, round(n * scale)) for split, n in F30K_IMAGES.items()}
  if f30k['train'] * CAPTIONS_PER_IMAGE < batch_size:
    raise errors.UserError(
      f'--scale={scale}: {f30k["train"]} train images = {f30k["train"] * CAPTIONS_PER_IMAGE} captions, fewer '
      f'than a batch of {batch_size}; use --scale >= {batch_size / CAPTIONS_PER_IMAGE / F30K_IMAGES["train"]:.4f}'
    )
  coco_n = max(2, round(COCO_5K_IMAGES * scale))
  coco = (
    ({'train': 1, 'dev': 1, 'test': 1, 'testall': coco_n} if paper else {'train': 1, 'dev': 1, 'test': coco_n})
    if coco_5k
    else {}
  )
  return {
    'paper_names': paper,
    'dataset': 'f30k' if paper else 'precomp',
    'builder_config': 'f30k' if paper else 'custom',
    'f30k_images': f30k,
    'coco_builder_config': 'coco' if paper else 'custom',
    'coco_split': 'testall' if paper else 'test',
    'coco_images': coco,
  }


def _split_bytes(images: dict) -> int:
  """Bytes of the features of a manual dir (captions: ~80 bytes each, a bound)."""
  n = sum(images.values())
  return n * REGIONS * DIM * 4 + n * CAPTIONS_PER_IMAGE * 80


def disk_needed(layout: dict, n_models: int) -> dict:
  manual = _split_bytes(layout['f30k_images']) + _split_bytes(layout['coco_images'])
  return {'manual_bytes': manual, 'needed_bytes': int(2.05 * manual) + n_models * CHECKPOINT_ALLOWANCE}


def _free_bytes(path: str) -> int:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def write_manual(manual: str, images: dict, sampler: CaptionSampler, rng: np.random.Generator) -> int:
  """{split}_ims.npy and {split}_caps.txt for every split of `images`; returns the bytes written."""
  os.makedirs(manual, exist_ok=True)
  total = 0
  for split, n in images.items():
    total += precomp_build_memory.write_features(os.path.join(manual, f'{split}_ims.npy'), n, REGIONS, DIM, rng)
    total += sampler.write(os.path.join(manual, f'{split}_caps.txt'), CAPTIONS_PER_IMAGE * n, rng)
  return total


# ------------------------------------------------------------------------------------------------ child processes
class ChildFailed(errors.UserError):
  pass


def _status_kb(pid: int) -> dict:
  """RssAnon and VmHWM (kB) of a running process, from /proc/<pid>/status; {} once it is gone."""
  out = {}
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith(('RssAnon:', 'VmHWM:')):
          out[line.split(':')[0]] = int(line.split()[1])
  except (FileNotFoundError, ProcessLookupError):
    pass
  return out


def _last_line(path: str) -> str:
  with open(path, errors='replace') as f:
    lines = [line.strip() for line in f if line.strip()]
  return lines[-1] if lines else '(no output)'


def run_child(args: list, env: dict, log_path: str, what: str, interval: float = 0.2) -> dict:
  """Runs `args` (stdout and stderr to `log_path`); returns wall seconds and the sampled peak RSS (the child's VmHWM)
  and RssAnon. A failure is one line naming the log. (Not ru_maxrss: Linux carries the forking process's own high
  water mark into it at exec, so after writing 8.5 GiB of features through a memory map every child reported it.)"""
  start = time.perf_counter()
  peak_anon = peak_rss = 0
  with open(log_path, 'w') as out:
    child = subprocess.Popen(args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
      while True:
        status_kb = _status_kb(child.pid)  # read before wait4 reaps it; VmHWM only grows
        pid, status, _ = os.wait4(child.pid, os.WNOHANG)
        if pid:
          break
        peak_anon = max(peak_anon, status_kb.get('RssAnon', 0))
        peak_rss = max(peak_rss, status_kb.get('VmHWM', 0))
        time.sleep(interval)
    except BaseException:
      child.kill()
      child.wait()
      raise
  child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; Popen must not wait again
  if child.returncode:
    raise ChildFailed(f'{what} failed (exit {child.returncode}): {_last_line(log_path)} (log: {log_path})')
  return {
    'seconds': round(time.perf_counter() - start, 2),
    'peak_rss_bytes': peak_rss * 1024,
    'peak_anon_bytes': peak_anon * 1024,
  }


def child_env(data_dir: str) -> dict:
  env = dict(os.environ, XMATCH_LAZY='1', XMATCH_DATA_DIR=data_dir)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env.pop('XMATCH_MANUAL_DIR', None)  # manual dirs are <data_dir>/manual/<name>_precomp
  return env


def probe(workdir: str, steps: int) -> None:
  """In a child process: loads the run's train split as training does and times building batches 0..steps-1 (the
  batcher's reads and padding, then the device transfer); prints {'batch_seconds': [...]} as JSON."""
  import jax  # pylint: disable=g-import-not-at-top

  from xmatch_jax import run_setup  # pylint: disable=g-import-not-at-top
  from xmatch_jax import workdirs  # pylint: disable=g-import-not-at-top
  from xmatch_jax.data import load_split  # pylint: disable=g-import-not-at-top
  from xmatch_jax.trainers import contrastive  # pylint: disable=g-import-not-at-top

  config, vocab = workdirs.load_config(workdir), workdirs.load_vocab(workdir)
  train = load_split(config.dataset, 'train', config.data_dir or None)
  model = run_setup.build_model(config, len(vocab), run_setup.img_dim_of(train.images), workdir)
  batcher = contrastive.train_batcher(config, model, vocab, train)  # the batches training makes
  seconds = []
  for i in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(jax.device_put(batcher.batch(i)))
    seconds.append(time.perf_counter() - start)
  print('PROBE ' + json.dumps({'batch_seconds': seconds}), flush=True)


def _probe_result(log_path: str) -> dict:
  with open(log_path) as f:
    lines = [line for line in f if line.startswith('PROBE ')]
  return json.loads(lines[-1][len('PROBE ') :])


def step_seconds(workdir: str) -> list:
  """Per-step wall seconds from the train loop's W/metrics.jsonl (logged every step)."""
  out = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'steps_per_s' in record:
        out.append(1.0 / record['steps_per_s'])
  return out


# ------------------------------------------------------------------------------------------------------ the run
def train_model(model: str, layout: dict, steps: int, sets: list, root: str, env: dict) -> dict:
  workdir = os.path.join(root, 'runs', model)
  args = [
    sys.executable,
    '-m',
    'xmatch_jax.train',
    f'--config=configs/{model}.py:f30k',
    f'--workdir={workdir}',
    f'--config.max_steps={steps}',
    '--config.log_every_steps=1',
  ]
  if not layout['paper_names']:
    args.append(f'--config.dataset={layout["dataset"]}')
  args += [f'--config.{item}' for item in sets]
  log_path = os.path.join(root, 'logs', f'{model}_train.log')
  result = {'command': _shown(args), **run_child(args, env, log_path, f'training {model}')}
  seconds = step_seconds(workdir)
  if len(seconds) != steps:
    raise ChildFailed(f'training {model}: {len(seconds)} steps logged in {workdir}/metrics.jsonl; expected {steps}')
  step_time = float(np.median(seconds))
  result.update(workdir=workdir, step_seconds=[round(s, 4) for s in seconds], steps_per_s=1.0 / step_time)
  probe_log = os.path.join(root, 'logs', f'{model}_batch_probe.log')
  probe_run = run_child([sys.executable, '-c', _PROBE, TOOLS, workdir, str(steps)], env, probe_log, 'batch probe')
  batch = _probe_result(probe_log)['batch_seconds']
  result.update(
    batch_seconds=[round(s, 4) for s in batch],
    data_share=float(np.median(batch)) / step_time,
    probe_seconds=probe_run['seconds'],
  )
  return result


def evaluate_model(model: str, label: str, extra: list, result_name: str, root: str, env: dict) -> dict:
  workdir = os.path.join(root, 'runs', model)
  args = [sys.executable, '-m', 'xmatch_jax.evaluate', f'--workdir={workdir}'] + extra
  log_path = os.path.join(root, 'logs', f'{model}_eval_{label}.log')
  run = run_child(args, env, log_path, f'evaluating {model} ({label})')
  source = os.path.join(workdir, 'eval', f'{result_name}.json')
  target = os.path.join(root, 'results', model, f'{label}.json')
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.copyfile(source, target)
  with open(target) as f:
    metrics = json.load(f)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  out = {
    'command': _shown(args),
    **run,
    'json': target,
    'n_images': metrics['n_images'],
    'n_captions': metrics['n_captions'],
    'protocol': metrics['protocol'],
    'rsum': round(metrics['rsum'], 2),
    'scoring_seconds': metrics['scoring_seconds'],
  }
  if not metrics.get('rerank_k'):  # exhaustive: tiles of eval_image_chunk x eval_text_batch, the last zero-padded
    chunk, batch = config['eval_image_chunk'], config['eval_text_batch']
    out['tiles'] = -(-metrics['n_images'] // chunk) * -(-metrics['n_captions'] // batch)
    out['seconds_per_tile'] = round(metrics['scoring_seconds'] / out['tiles'], 3)
  return out


def evaluations(layout: dict, coco_5k: bool, rerank_k: int, root: str) -> list:
  """(label, evaluate flags, W/eval result name) of every evaluation."""
  out = [('f30k_1k', ['--split=test'] + (['--protocol=f30k_1k'] if layout['paper_names'] else []), 'test')]
  if coco_5k:
    if layout['paper_names']:
      flags_, name = ['--config.dataset=coco', '--protocol=coco_5k'], 'coco_testall'
    else:
      flags_, name = [f'--config.data_dir={os.path.join(root, "tfds_coco")}', '--split=test'], 'test'
    out.append(('coco_5k', flags_, name))
    if rerank_k:
      out.append((f'coco_5k_rerank{rerank_k}', flags_ + [f'--rerank_k={rerank_k}'], f'{name}_rerank{rerank_k}'))
  return out


def _shown(args: list) -> str:
  return ' '.join(['python'] + args[1:])


def gib(n: float) -> str:
  return f'{n / 2**30:.2f} GiB'


def format_table(report: dict) -> str:
  labels = [label for label, *_ in report['evaluations']]
  head = ['model', 'steps/s', 'data share', 'peak RSS train', 'peak RSS eval'] + [f'{x} s (wall)' for x in labels]
  rows = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for model, r in report['models'].items():
    evals = r['evaluations']
    cells = [
      model,
      f'{r["train"]["steps_per_s"]:.3f}',
      f'{100 * r["train"]["data_share"]:.1f}%',
      gib(r['train']['peak_rss_bytes']),
      gib(max(e['peak_rss_bytes'] for e in evals.values())),
    ] + [f'{evals[x]["scoring_seconds"]:.1f} ({evals[x]["seconds"]:.0f})' if x in evals else 'not run' for x in labels]
    rows.append('| ' + ' | '.join(cells) + ' |')
  sizes = {x: e for r in report['models'].values() for x, e in r['evaluations'].items()}
  shapes = ', '.join(f'{x}: {sizes[x]["n_images"]} x {sizes[x]["n_captions"]}' for x in labels if x in sizes)
  return '\n'.join(rows) + f'\n(batch {report["batch_size"]}, scale {report["scale"]}; images x captions {shapes})'


FLAGS = flags.FlagValues()
flags.DEFINE_string(
  'dir', None, 'scratch directory, new or empty (manual dirs, TFDS data dirs, runs, logs)', flag_values=FLAGS
)
flags.DEFINE_float('scale', 1.0, "fraction of Flickr30K's (and the coco_5k shape's) image counts", flag_values=FLAGS)
flags.DEFINE_list('models', ['scan', 'rdan'], 'models to run, each configs/<model>.py:f30k', flag_values=FLAGS)
flags.DEFINE_integer('steps', 20, 'training steps per model', flag_values=FLAGS)
flags.DEFINE_boolean(
  'coco_5k', False, 'also evaluate a 5,000-image x 25,000-caption split (x --scale)', flag_values=FLAGS
)
flags.DEFINE_integer(
  'rerank_k', 100, 'with --coco_5k, also evaluate it re-ranking the top K (0: not)', flag_values=FLAGS
)
flags.DEFINE_list(
  'exhaustive',
  None,
  'with --coco_5k, the models whose coco_5k split is also scored exhaustively (default: every model; the others '
  'only re-rank, e.g. --exhaustive=scan: RDAN scores ~5,000 pairs/s on 2 CPU cores, ~7 h for 125 M pairs)',
  flag_values=FLAGS,
)
flags.DEFINE_list(
  'evaluations',
  None,
  'evaluations to run, of f30k_1k, coco_5k, coco_5k_rerank<K> (default: all; e.g. the coco_5k rows alone: '
  '--evaluations=coco_5k,coco_5k_rerank100)',
  flag_values=FLAGS,
)
flags.DEFINE_multi_string(
  'set', [], 'training config override key=value (--config.key=value), e.g. model.bert_dir=PATH', flag_values=FLAGS
)
flags.DEFINE_string(
  'captions', os.path.join(FIXTURES, 'train_caps.txt'), 'captions whose lengths to copy', flag_values=FLAGS
)
flags.DEFINE_string(
  'vocab', os.path.join(FIXTURES, 'f30k_vocab.json'), "SCAN's f30k vocabulary json", flag_values=FLAGS
)
flags.DEFINE_integer('seed', 0, 'seed of the synthetic data', flag_values=FLAGS)
flags.DEFINE_boolean('keep', False, 'keep the features (manual and TFDS dirs) at the end', flag_values=FLAGS)
flags.DEFINE_string('json', '', 'also write the report here', flag_values=FLAGS)


def _batch_size(sets: list) -> int:
  for item in sets:
    key, _, value = item.partition('=')
    if key == 'batch_size':
      return int(value)
  return 128  # configs/common.py: SCAN's batch size


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__, required=('dir',))
  if not 0 < FLAGS.scale <= 1:
    cli.usage_error(f'--scale={FLAGS.scale}: expected a fraction in (0, 1]')
  if FLAGS.steps < 1 or FLAGS.rerank_k < 0:
    cli.usage_error('--steps must be >= 1 and --rerank_k >= 0')
  models = [m.strip() for m in FLAGS.models if m.strip()]
  missing = [m for m in models if not os.path.exists(os.path.join(REPO, 'configs', f'{m}.py'))]
  if not models or missing:
    cli.usage_error(f'--models: no configs/{missing[0] if missing else "<model>"}.py; expected e.g. scan,rdan')
  exhaustive = models if FLAGS.exhaustive is None else [m.strip() for m in FLAGS.exhaustive if m.strip()]
  if [m for m in exhaustive if m not in models]:
    cli.usage_error(f'--exhaustive={",".join(exhaustive)}: expected models of --models ({",".join(models)})')
  if set(exhaustive) != set(models) and not (FLAGS.coco_5k and FLAGS.rerank_k):
    cli.usage_error('--exhaustive leaves out a model: needs --coco_5k and --rerank_k > 0 (its coco_5k evaluation)')
  if not os.path.exists('/proc/self/status'):
    cli.usage_error("needs Linux /proc to read the children's memory")
  root = os.path.abspath(FLAGS.dir)
  planned = [label for label, *_ in evaluations({'paper_names': True}, FLAGS.coco_5k, FLAGS.rerank_k, root)]
  wanted = planned if FLAGS.evaluations is None else [x.strip() for x in FLAGS.evaluations if x.strip()]
  if not wanted or [x for x in wanted if x not in planned]:
    cli.usage_error(f'--evaluations={",".join(wanted)}: expected some of {",".join(planned)}')
  if os.path.exists(root) and os.listdir(root):
    cli.usage_error(f'--dir {FLAGS.dir} is not empty; give a new scratch directory')
  batch_size = _batch_size(FLAGS.set)
  layout = plan(FLAGS.scale, FLAGS.coco_5k, batch_size)
  disk = disk_needed(layout, len(models))
  free = _free_bytes(root)
  log(
    f'data: f30k-shaped {layout["f30k_images"]}'
    + (f', coco_5k-shaped {layout["coco_images"]}' if FLAGS.coco_5k else '')
    + f' images of {REGIONS} x {DIM} float32, {CAPTIONS_PER_IMAGE} captions each; dataset {layout["dataset"]}'
  )
  log(
    f'disk: {gib(disk["needed_bytes"])} needed in {root} (manual dir {gib(disk["manual_bytes"])} + its TFDS build, '
    f'+ {gib(CHECKPOINT_ALLOWANCE)} per run for checkpoints); {gib(free)} free'
  )
  if free < disk['needed_bytes']:
    raise errors.UserError(f'{root}: {gib(free)} free, {gib(disk["needed_bytes"])} needed; free space or lower --scale')
  sampler = CaptionSampler(FLAGS.captions, FLAGS.vocab)
  s = sampler.stats
  log(
    f'captions: tokens per caption from {s["fixture_captions"]} fixture captions (mean {s["tokens_per_caption_mean"]}, '
    f'min {s["tokens_per_caption_min"]}, max {s["tokens_per_caption_max"]}); words from a pool of {s["word_pool"]}'
  )
  os.makedirs(os.path.join(root, 'logs'), exist_ok=True)
  data_dir, coco_dir = os.path.join(root, 'tfds'), os.path.join(root, 'tfds_coco')
  report = {
    'scale': FLAGS.scale,
    'steps': FLAGS.steps,
    'batch_size': batch_size,
    'rerank_k': FLAGS.rerank_k,
    'sets': FLAGS.set,
    'layout': layout,
    'captions': s,
    'disk': {**disk, 'free_bytes': free},
    'builds': {},
    'models': {},
  }
  try:
    rng = np.random.default_rng(FLAGS.seed)
    targets = [(data_dir, layout['builder_config'], layout['f30k_images'])]
    if FLAGS.coco_5k:
      targets.append(
        (data_dir if layout['paper_names'] else coco_dir, layout['coco_builder_config'], layout['coco_images'])
      )
    for target_dir, config, images in targets:
      manual = os.path.join(target_dir, 'manual', f'{"custom" if config == "custom" else config}_precomp')
      log(f'writing {manual} ...')
      start = time.perf_counter()
      written = write_manual(manual, images, sampler, rng)
      write_seconds = time.perf_counter() - start
      log(f'building xmatch_precomp/{config} in {target_dir} ...')
      build = run_child(
        [sys.executable, '-c', _BUILD, config, manual, target_dir],
        child_env(target_dir),
        os.path.join(root, 'logs', f'build_{os.path.basename(target_dir)}_{config}.log'),
        f'building xmatch_precomp/{config}',
      )
      report['builds'][f'{os.path.basename(target_dir)}/{config}'] = {
        'images': images,
        'written_bytes': written,
        'write_seconds': round(write_seconds, 2),
        **build,
      }
      log(
        f'  wrote {gib(written)} in {write_seconds:.1f} s; built in {build["seconds"]:.1f} s, peak RSS '
        f'{gib(build["peak_rss_bytes"])} (RssAnon {gib(build["peak_anon_bytes"])})'
      )
    report['disk']['used_bytes'] = sum(
      os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files
    )
    report['evaluations'] = [e for e in evaluations(layout, FLAGS.coco_5k, FLAGS.rerank_k, root) if e[0] in wanted]
    env = child_env(data_dir)
    for model in models:
      log(f'{model}: training {FLAGS.steps} steps of {batch_size} ...')
      entry = report['models'][model] = {'train': train_model(model, layout, FLAGS.steps, FLAGS.set, root, env)}
      entry['evaluations'] = {}
      for label, extra, name in report['evaluations']:
        if label == 'coco_5k' and model not in exhaustive:
          continue
        log(f'{model}: evaluating {label} ...')
        entry['evaluations'][label] = evaluate_model(model, label, extra, name, root, env)
  finally:
    if not FLAGS.keep:
      for d in (data_dir, coco_dir):
        shutil.rmtree(d, ignore_errors=True)
  print(format_table(report))
  if FLAGS.json:
    cli.write_json(FLAGS.json, report)
    log(f'wrote {FLAGS.json}')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
