"""README stays true: CI runs the test command verbatim; the main job names real files; every `python -m
xmatch_jax.<x>` / `python tools/<x>.py` command README shows runs a program that exists, with flags it defines
(from its --helpshort / --help) and config fields its config file has; every repository path README names exists."""

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  quick = text.split('## Quick start', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```\n(.*?)\n```', quick, flags=re.S)


def test_readme_has_exactly_two_commands():
  commands = _commands()
  assert len(commands) == 2, commands
  assert all('\n' not in c for c in commands)


def test_ci_runs_the_readme_test_command():
  _, test_command = _commands()
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci_lines = [line.strip() for line in f]
  assert test_command in ci_lines
  # CI installs nothing the README command does not: CI fails exactly when a user's set-up would.
  installs = [line for line in ci_lines if 'pip install' in line and not line.startswith('#')]
  assert installs == [test_command], installs


def test_main_job_names_existing_config_and_default_dataset():
  main_command, _ = _commands()
  configs = re.findall(r'--config=(configs/\w+\.py):(\w+)', main_command)
  assert configs, main_command
  for path, dataset in configs:
    assert os.path.exists(os.path.join(ROOT, path)), path
    assert dataset == 'shapes'
  assert 'xmatch_jax.evaluate' in main_command


@pytest.mark.parametrize(
  'folder,names',
  [
    (
      'perf_results/intel_xeon',
      ('scan_t2i_f30k', 'rdan_f30k', 'mmca_f30k', 'glfn_f30k', 'daer_wikipedia', 'rdan_shapes'),
    ),
    ('perf_results/intel_xeon_2026-12-04', ('scan_t2i_f30k', 'rdan_f30k', 'mmca_f30k', 'glfn_f30k', 'daer_wikipedia')),
    (
      'perf_results/amd_epyc',
      ('scan_t2i_f30k', 'rdan_f30k', 'mmca_f30k', 'glfn_f30k', 'daer_wikipedia', 'rdan_shapes'),
    ),
    (
      'perf_results/amd_epyc_b',
      ('scan_t2i_f30k', 'rdan_f30k', 'mmca_f30k', 'glfn_f30k', 'daer_wikipedia', 'rdan_shapes'),
    ),
    ('perf_results/amd_epyc_b_winograd', ('rdan_f30k', 'rdan_shapes')),
    ('perf_results/amd_epyc_b_winograd', ('mmca_f30k',)),
    (
      'perf_results/amd_epyc_b_2026-12-06',
      ('scan_t2i_f30k', 'rdan_f30k', 'mmca_f30k', 'glfn_f30k', 'daer_wikipedia', 'rdan_shapes'),
    ),
  ],
)
def test_performance_table_is_generated_from_the_benchmark_json(folder, names):
  sys.path.insert(0, os.path.join(ROOT, 'tools'))
  import perf_table  # pylint: disable=g-import-not-at-top

  table = perf_table.table([os.path.join(ROOT, 'tools', folder, f'{n}.json') for n in names])
  assert table in open(os.path.join(ROOT, 'README.md')).read()


# ---- Every command README shows stays runnable: programs exist, flags exist, config fields exist, paths exist. ----

import concurrent.futures  # pylint: disable=g-import-not-at-top,g-bad-import-order
import functools  # pylint: disable=g-import-not-at-top,g-bad-import-order
import subprocess  # pylint: disable=g-import-not-at-top,g-bad-import-order

ABSL_PROGRAMS = ('train', 'evaluate', 'retrieve', 'ensemble')  # python -m xmatch_jax.<x>: absl flags, --helpshort
# Tools whose --help cannot list their flags (none today; every tool is argparse-based). A tool listed here gets
# only its existence checked, not its flags.
NO_USABLE_HELP = ()
# Top-level entries of the repository: a backticked word starting with one of these names a repository file.
REPO_PREFIXES = ('configs/', 'tools/', 'tests/', 'launch/', 'xmatch_jax/', 'docs/', '.ci/')
_COMMAND = re.compile(r'(?:^|[\s/])python3?\s+(?:-m\s+xmatch_jax\.(\w+)|(tools/[\w/]+\.py))(.*)$')


def _readme_text(skip_validation_table: bool = False) -> str:
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  if skip_validation_table:  # its error messages name files that do not exist on purpose (test_validation_docs.py)
    head, _, rest = text.partition('\n## Input validation')
    text = head + ('\n## ' + rest.split('\n## ', 1)[1] if '\n## ' in rest else '')
  return text


def _code_spans(text: str) -> list[str]:
  """The text of every code block and inline code span (markdown lets a span run over lines), whitespace joined."""
  blocks = re.findall(r'```[^\n]*\n(.*?)```', text, flags=re.S)
  inline = re.findall(r'`([^`]+)`', re.sub(r'```[^\n]*\n.*?```', '', text, flags=re.S))
  return [' '.join(s.split()) for s in blocks + inline]


def _readme_commands() -> list[tuple[str, str]]:
  """(program, arguments) of every `python -m xmatch_jax.<x>` / `python tools/<x>.py` in README; program is
  'xmatch_jax.<x>' or 'tools/<x>.py'."""
  commands = []
  for span in _code_spans(_readme_text()):
    for part in span.split('&&'):
      match = _COMMAND.search(part.strip())
      if match:
        program = f'xmatch_jax.{match.group(1)}' if match.group(1) else match.group(2)
        commands.append((program, match.group(3).strip()))
  return commands


def _flags_used(arguments: str) -> list[str]:
  """Flag names in a command's arguments: '--name=v' / '--name' -> 'name', '-k' -> 'k'; placeholders skipped."""
  names = []
  for token in arguments.replace('[', ' ').replace(']', ' ').split():
    match = re.fullmatch(r'--?([A-Za-z][\w.<>|-]*)(=.*)?', token)
    if match and '<' not in match.group(1):
      names.append(match.group(1))
  return names


def _help_text(program: str) -> tuple[str, str, int]:
  if program.startswith('xmatch_jax.'):
    argv = [sys.executable, '-m', program, '--helpshort']
  else:
    argv = [sys.executable, os.path.join(ROOT, program), '--help']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
  return program, done.stdout + done.stderr, done.returncode


def _defined_flags(program: str, help_text: str) -> set[str]:
  """Flag names a program's help lists (absl: '  --[no]name: ...' lines; argparse: '  -k K, --k K' lines)."""
  names = set()
  if program.startswith('xmatch_jax.'):
    for no, name in re.findall(r'^\s+--(\[no\])?([\w.-]+):', help_text, flags=re.M):
      names.add(name)
      if no:
        names.add('no' + name)
  else:
    options = re.split(r'^(?:options|optional arguments):$', help_text, maxsplit=1, flags=re.M)[-1]
    for line in options.splitlines():
      if re.match(r'^\s+-', line):
        names.update(re.findall(r'(?:^|[\s,])--?([A-Za-z][\w-]*)', line))
  return names


@functools.lru_cache(maxsize=None)
def _help_of_every_program() -> dict:
  """program -> (help text, exit status), one subprocess per distinct program, a few at a time."""
  programs = sorted(
    {p for p, _ in _readme_commands() if p.removeprefix('xmatch_jax.') in ABSL_PROGRAMS or p.startswith('tools/')}
    - set(NO_USABLE_HELP)
  )
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
    return {program: (text, status) for program, text, status in pool.map(_help_text, programs)}


def _load_config(spec: str):
  if str(ROOT) not in sys.path:
    sys.path.insert(0, ROOT)  # config files import `configs.common`
  from xmatch_jax import run_setup  # pylint: disable=g-import-not-at-top

  return run_setup.load_config_file(spec, root=ROOT)


def _concrete_config_spec(spec: str) -> str | None:
  """'configs/rdan.py:shapes,<variant>' / 'configs/daer.py:shapes[,<variant>]' -> 'configs/rdan.py:shapes' (the
  dataset a README example names); None when the file or dataset itself is a placeholder."""
  spec = re.sub(r',<[^>]*>', '', re.sub(r'\[[^\]]*\]', '', spec).strip('[]'))
  return None if '<' in spec else spec


def _has_field(config, dotted: str) -> bool:
  import ml_collections  # pylint: disable=g-import-not-at-top

  node = config
  for part in dotted.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


@functools.lru_cache(maxsize=None)
def _every_model_config() -> tuple:
  """Each configs/<model>.py at its default dataset (to check overrides shown without a config file)."""
  names = sorted(
    n
    for n in os.listdir(os.path.join(ROOT, 'configs'))
    if n.endswith('.py') and n not in ('__init__.py', 'common.py', 'from_json.py')
  )
  return tuple(_load_config(f'configs/{name}') for name in names)


def _config_overrides_ok(spec: str | None, overrides: list[str]) -> list[str]:
  """Overrides (dotted fields after --config.) that the config file `spec` (None: any model's config) lacks."""
  configs = [_load_config(spec)] if spec else list(_every_model_config())
  return [f for f in overrides if '<' not in f and not any(_has_field(c, f) for c in configs)]


def test_readme_commands_name_existing_programs():
  commands = _readme_commands()
  assert len(commands) > 20, commands  # the parser still finds README's commands
  for program, _ in commands:
    if program.startswith('xmatch_jax.'):
      path = os.path.join(ROOT, *program.split('.')) + '.py'
      assert os.path.exists(path), f'README runs python -m {program}, but {path} does not exist'
    else:
      assert os.path.exists(os.path.join(ROOT, program)), f'README runs python {program}, which does not exist'


@pytest.mark.slow
def test_readme_commands_use_only_flags_their_program_defines():
  helps = _help_of_every_program()
  problems = []
  for program, (text, status) in helps.items():
    absl = program.startswith('xmatch_jax.')
    # absl's --helpshort exits with status 1 after printing; argparse's --help with 0.
    if status not in ((0, 1) if absl else (0,)) or ('flags:' not in text if absl else 'usage:' not in text):
      problems.append(
        f'{program}: its help ({"--helpshort" if absl else "--help"}) failed with status {status}: {text[-500:]}'
      )
  for program, arguments in _readme_commands():
    if program not in helps:
      continue
    defined = _defined_flags(program, helps[program][0])
    for name in _flags_used(arguments):
      if name.startswith('config.') and program.startswith('xmatch_jax.'):
        continue  # config field overrides: test_readme_config_overrides_name_existing_fields
      if name not in defined:
        problems.append(f'README: python {program} {arguments}: flag {name!r} is not one of {sorted(defined)}')
  assert not problems, '\n'.join(problems)


def test_readme_config_files_and_overrides_exist():
  problems = []
  for program, arguments in _readme_commands():
    specs = re.findall(r'--config=(\S+)', arguments)
    for spec in specs:
      concrete = _concrete_config_spec(spec)
      if concrete:
        try:
          _load_config(concrete)
        except Exception as e:  # pylint: disable=broad-except
          problems.append(f'README: python {program} {arguments}: --config={spec} does not load: {e}')
    if program.startswith('xmatch_jax.'):
      overrides = [n.split('.', 1)[1] for n in _flags_used(arguments) if n.startswith('config.')]
      spec = _concrete_config_spec(specs[0]) if specs else None
      missing = _config_overrides_ok(spec, overrides) if overrides else []
      problems += [
        f'README: python {program} {arguments}: --config.{f} is not a field of {spec or "any configs/*.py"}'
        for f in missing
      ]
  # Overrides shown on their own (`--config.model.dtype=bfloat16`): a field of some model's config, or of the
  # config file the same span names.
  for span in _code_spans(_readme_text(skip_validation_table=True)):
    if _COMMAND.search(span) or '--config.' not in span:
      continue
    specs = [_concrete_config_spec(s) for s in re.findall(r'--config=(\S+)', span)]
    spec = specs[0] if specs else None
    overrides = [n.split('.', 1)[1] for n in _flags_used(span) if n.startswith('config.')]
    problems += [
      f'README: `{span}`: --config.{f} is not a field of {spec or "any configs/*.py"}'
      for f in _config_overrides_ok(spec, overrides)
    ]
  assert not problems, '\n'.join(problems)


def test_readme_names_only_existing_repository_files():
  text = _readme_text(skip_validation_table=True)
  words = [w for span in _code_spans(text) for w in span.split()]
  words += re.findall(r'\]\(([^)\s]+)\)', text)  # markdown link targets
  missing = []
  for word in words:
    path = word.split('=', 1)[1] if word.startswith('-') and '=' in word else word
    path = path.strip('()[],;:"\'').split('::')[0].partition(':')[0]
    if not path.startswith(REPO_PREFIXES) or any(c in path for c in '<{*$') or '...' in path:
      continue
    if not os.path.exists(os.path.join(ROOT, path)):
      missing.append(word)
  assert not missing, f'README names files that do not exist: {sorted(set(missing))}'
