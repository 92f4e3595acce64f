"""The data stage's one error type: bad input, told in one line naming the file, row or field."""

from __future__ import annotations


class DataError(ValueError):
    """Input that cannot be prepared (missing file, empty file, missing column, nothing left to keep).

    The CLI prints it as ``seater prepare: error: <message>`` and exits with code 2.
    """
