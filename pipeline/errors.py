"""The errors a user can fix by changing an argument, a file or the config: the CLI prints their
message in one line instead of a traceback. Each stage's error class derives from ``UserError``."""

from __future__ import annotations


class UserError(Exception):
    """Base of every stage's error whose message tells the user what to change."""
