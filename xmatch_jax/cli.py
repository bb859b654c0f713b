"""What every command-line entry point shares: errors a user caused as one line, bugs with their traceback.

A user-caused error (`errors.UserError`, a bad flag, a named file that does not exist or cannot be opened)
prints `error: <message>` on stderr and exits with status 2. Anything else is a bug and raises as usual.
`XMATCH_DEBUG=1` shows the traceback of user errors too.

  cli.run_absl(main)             # xmatch_jax.train / evaluate / retrieve / ensemble (absl flags)
  sys.exit(cli.run_tool(main))   # tools/*.py (argparse: build the parser with cli.ArgumentParser)
"""

import argparse
import contextlib
import os
import sys
from typing import Callable
from typing import NoReturn

from absl import app
from absl import flags

from xmatch_jax import errors

DEBUG_ENV = 'XMATCH_DEBUG'
USER_ERROR_STATUS = 2
_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


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
  """Runs a tool's main() with one-line errors; returns its exit status."""
  with user_errors():
    return main() or 0


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the library's one-line `error: ...` (status 2) instead of the usage block."""

  def error(self, message: str) -> NoReturn:
    fail(f'{self.prog}: {message} (--help lists the flags)')
