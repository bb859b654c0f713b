"""What every command-line entry point shares: absl flags, errors a user caused as one line, bugs with their traceback.

A user-caused error (`errors.UserError`, a bad flag, a named file that does not exist or cannot be opened)
prints `error: <message>` on stderr and exits with status 2. Anything else is a bug and raises as usual.
`XMATCH_DEBUG=1` shows the traceback of user errors too.

  cli.run_absl(main)             # xmatch_jax.train / evaluate / retrieve / ensemble (absl's global flags.FLAGS)
  sys.exit(cli.run_tool(main))   # tools/*.py (absl flags on the tool's own FlagValues, read by cli.parse_flags)

A tool defines its flags on its own `flags.FlagValues()`, not on the global `flags.FLAGS`: tests import several tools
into one process (their flag names overlap) and call `main(argv)` more than once, so `parse_flags` starts from the
defaults on every call.

  FLAGS = flags.FlagValues()
  flags.DEFINE_string('workdir', None, 'trained workdir', flag_values=FLAGS)
  cli.define_enum('split', 'test', ('dev', 'test'), 'split to score', FLAGS)

  def main(argv=None) -> int:  # argv: the arguments after the program name (None: sys.argv[1:])
    cli.parse_flags(FLAGS, argv, __doc__, required=('workdir',))
    ... FLAGS.workdir ...
"""

import contextlib
import json
import os
import sys
from typing import Callable
from typing import NoReturn
from typing import Sequence

from absl import app
from absl import flags

from xmatch_jax import errors

DEBUG_ENV = 'XMATCH_DEBUG'
USER_ERROR_STATUS = 2
_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# What asks a tool for its help: argparse's -h / --help and absl's --helpshort / --helpfull (absl reads -name as
# --name).
_HELP_ARGS = frozenset({'-h', '-?', '--help', '-help', '--helpshort', '-helpshort', '--helpfull', '-helpfull'})


def debug() -> bool:
  return os.environ.get(DEBUG_ENV, '') not in ('', '0')


def fail(message: str) -> NoReturn:
  """Prints `error: message` on stderr and exits with status 2."""
  sys.stdout.flush()
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_STATUS)


def user_error_message(error: BaseException) -> str | None:
  """The one-line message of an error the user caused; None for a bug."""
  if isinstance(error, (errors.UserError, app.UsageError)):
    return str(error)
  if isinstance(error, _OS_ERRORS) and error.filename:  # open() of a path the user gave
    return f'{error.filename}: {error.strerror}'
  return None


@contextlib.contextmanager
def user_errors():
  """Turns user-caused errors raised inside into `fail(...)`; re-raises everything else."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    message = user_error_message(e)
    if message is None or debug():
      raise
    fail(message)


def _parse_absl_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if debug():
      raise
    fail(f'{e} (--helpshort lists the flags)')


def run_absl(main: Callable[[list[str]], object]) -> None:
  """absl's app.run with one-line errors for bad flags, configs and inputs."""

  def guarded(argv):
    with user_errors():
      return main(argv)

  app.run(guarded, flags_parser=_parse_absl_flags)


def run_tool(main: Callable[[], int | None]) -> int:
  """Runs a tool's main() with one-line errors; returns its exit status.

  Use as `sys.exit(cli.run_tool(main))`: main() reads sys.argv[1:] through `parse_flags`.
  """
  with user_errors():
    return main() or 0


# ----------------------------------------------------------------------------------------------- tools' flags
def _prog() -> str:
  return os.path.basename(sys.argv[0])


def usage_error(message: str) -> NoReturn:
  """A bad command line of a tool: one line `error: <tool>: <message> (--helpshort lists the flags)`, status 2."""
  fail(f'{_prog()}: {message} (--helpshort lists the flags)')


class _ChoiceParser(flags.EnumParser):
  """absl's enum parser with argparse's message: `invalid choice: 'x' (choose from 'a', 'b')`."""

  def parse(self, argument: str) -> str:
    if argument not in self.enum_values:
      choices = ', '.join(repr(v) for v in self.enum_values)
      raise ValueError(f'invalid choice: {argument!r} (choose from {choices})')
    return argument


def define_enum(
  name: str,
  default: str | None,
  choices: Sequence[str],
  help: str,  # pylint: disable=redefined-builtin
  flag_values: flags.FlagValues,
) -> flags.FlagHolder:
  """`flags.DEFINE_enum` on `flag_values` whose error for a bad value names it and the choices.

  Args:
    name: the flag's name.
    default: its value when the command line does not give it (one of `choices`, or None).
    choices: the values it accepts.
    help: its help text (--help shows `<a|b|c>: help`).
    flag_values: the tool's FlagValues.

  Returns:
    The flag's holder, as `flags.DEFINE_enum` returns it.
  """
  holder = flags.DEFINE_enum(name, default, list(choices), help, flag_values=flag_values)
  flag_values[name].parser = _ChoiceParser(list(choices))
  return holder


def help_text(flag_values: flags.FlagValues, doc: str = '', required: Sequence[str] = (), args: str = '') -> str:
  """A tool's --help: usage, its description and its flags in definition order (absl's layout; a boolean is
  listed as `--name, --noname`)."""
  lines = [f'usage: {_prog()} [flags]{" " + args if args else ""}', '']
  if doc.strip():
    lines += [doc.strip('\n').rstrip(), '']
  lines.append('flags:')
  for name in flag_values:
    flag = flag_values[name]
    if name != flag.name:  # a short name of a flag listed under its name
      continue
    label = f'--{name}, --no{name}' if flag.boolean else f'--{name}'
    lines.append(flags.text_wrap(f'{label}: {flag.help}', indent='    ', firstline_indent='  '))
    notes = ['required'] if name in required else []
    if flag.default_as_str and name not in required:
      notes.append(f'default: {flag.default_as_str}')
    if flag.parser.syntactic_help:
      notes.append(flag.parser.syntactic_help)
    lines += [flags.text_wrap(f'({note})', indent='    ') for note in notes]
  return '\n'.join(lines)


def parse_flags(
  flag_values: flags.FlagValues,
  argv: Sequence[str] | None = None,
  doc: str = '',
  required: Sequence[str] = (),
  args: str = '',
) -> list[str]:
  """Parses a tool's command line into `flag_values`, afresh: flags a command line does not give have their defaults.

  -h / --help / --helpshort / --helpfull print `help_text` and exit with status 0. A bad command line (unknown flag,
  bad value, missing required flag, unexpected argument) exits through `usage_error`; with XMATCH_DEBUG=1 absl's
  own errors raise instead.

  Args:
    flag_values: the tool's FlagValues.
    argv: the arguments after the program name; None: sys.argv[1:].
    doc: the tool's description for --help (its module docstring).
    required: names of flags the command line must give.
    args: how --help shows the tool's positional arguments, e.g. 'FILE [FILE ...]'; '' for a tool that takes none
      (then any is an error).

  Returns:
    The positional arguments (absl's leftover argv, without the program name), in order; the tool checks them.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  flag_args = argv[: argv.index('--')] if '--' in argv else argv
  if any(a in _HELP_ARGS for a in flag_args):
    print(help_text(flag_values, doc, required, args))
    sys.exit(0)
  flag_values.unparse_flags()
  try:
    positional = flag_values([_prog()] + argv)[1:]
  except flags.Error as e:
    if debug():
      raise
    usage_error(str(e))
  missing = [name for name in required if not flag_values[name].present]
  if missing:
    usage_error(f'the following arguments are required: {", ".join("--" + name for name in missing)}')
  if positional and not args:
    usage_error(f'unrecognized arguments: {" ".join(positional)}')
  return positional


def write_json(path: str, value) -> None:
  """A tool's --json output: `value` as indented JSON at `path`; nothing when `path` is empty."""
  if path:
    with open(path, 'w') as f:
      json.dump(value, f, indent=2)
