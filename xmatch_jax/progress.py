"""Progress reporting for every job that can run longer than a few seconds.

`bar(...)` is a `tqdm.tqdm`. On a terminal it redraws one line; when stderr is not a terminal (a SLURM log, a
pipe, CI) it writes a plain line every `XMATCH_PROGRESS_SECONDS` (default 30) seconds instead of carriage-return
redraws. Short jobs print nothing: a bar appears only after `delay` seconds (default 10); `XMATCH_PROGRESS_DELAY`,
when set, replaces the `delay` of every bar (e.g. XMATCH_PROGRESS_DELAY=0 XMATCH_PROGRESS_SECONDS=0 shows every bar
from its start and every update, as the tests do).
"""

import os
import re
import sys

import tqdm

from xmatch_jax import errors

_PLAIN_INTERVAL_ENV = 'XMATCH_PROGRESS_SECONDS'
_DELAY_ENV = 'XMATCH_PROGRESS_DELAY'


# Terminal control sequences (cursor moves of nested bars), which a log file would keep as junk.
_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')


class _PlainLines:
  """A file for tqdm that turns its carriage-return redraws into whole lines and drops cursor moves (non-terminal
  stderr)."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    for part in _ANSI.sub('', text).replace('\r', '\n').split('\n'):
      if part.strip():
        self.stream.write(part.rstrip() + '\n')

  def flush(self) -> None:
    self.stream.flush()


def is_terminal(stream=None) -> bool:
  stream = stream or sys.stderr
  return hasattr(stream, 'isatty') and stream.isatty()


def bar(
  total=None,
  desc: str = '',
  unit: str = 'it',
  *,
  initial: int = 0,
  disable: bool = False,
  delay: float = 10.0,
  unit_scale: bool = False,
  leave: bool = True,
) -> tqdm.tqdm:
  """A progress bar (tqdm) that counts `unit`s done of `total`, with rate and ETA; see the module docstring."""
  if os.environ.get(_DELAY_ENV, '').strip():
    try:
      delay = float(os.environ[_DELAY_ENV])
    except ValueError:
      raise errors.UserError(
        f'{_DELAY_ENV}={os.environ[_DELAY_ENV]!r}; expected seconds (a number) before a progress bar shows'
      ) from None
  kwargs = dict(
    total=total, desc=desc, unit=unit, initial=initial, disable=disable, delay=delay, unit_scale=unit_scale, leave=leave
  )
  if is_terminal():
    return tqdm.tqdm(mininterval=1.0, **kwargs)
  seconds = float(os.environ.get(_PLAIN_INTERVAL_ENV, '30'))
  return tqdm.tqdm(
    file=_PlainLines(sys.stderr), mininterval=seconds, maxinterval=seconds, ascii=True, ncols=100, **kwargs
  )


def write(message: str) -> None:
  """Prints a line without breaking an open bar."""
  tqdm.tqdm.write(message)
