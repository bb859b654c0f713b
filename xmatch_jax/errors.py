"""Errors a user causes and can fix: bad flags, paths, files, configs and inputs.

Every check of the library that rejects an input raises one of these, with a message naming the file, the field
and what was expected (README.md, "Input validation", lists them). They subclass the built-in types they replace, so
`except ValueError` still catches them. Command-line entry points print them as one line `error: ...` and exit
with status 2 (`xmatch_jax.cli`); any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """An input, flag or config value is wrong; the message says which and what was expected."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user named (or a workdir should hold) does not exist."""
