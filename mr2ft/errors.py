"""The one exception type that means "the user gave us something we cannot use".

Library code raises :class:`UserError` for every bad input a user can fix (a missing file, an unknown name,
a wrong option combination). The CLI turns it into one line on stderr and exit code 2, with no traceback
unless ``--debug`` is given. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, stated with how to fix it.

    Args:
        message: one sentence naming what is wrong and how to fix it.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
