"""Errors that a user fixes from the command line, told apart from bugs.

launch/main.py prints the message of a UserError alone and exits non-zero: for a bad flag, config
value, missing file or busy workdir a Python traceback only buries the one line that says what to
do. Everything else is a bug and keeps its traceback. --verbose (or TRANSFORMER_TRACEBACK=1) shows
the traceback of user errors too.
"""


class UserError(Exception):
  """A mistake the user can fix: its message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
  """A config value or flag that cannot work (a ValueError, as such errors always were)."""


class MissingError(UserError, FileNotFoundError):
  """A file or checkpoint that the command needs is not there."""
