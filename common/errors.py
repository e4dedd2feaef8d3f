"""The one mark of a failure the user can act on (a bad file, an unreachable server, a busy gate):
the command lines print its message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A failure whose message tells the user what to change; raised by any layer."""
