"""Errors about the user's model input or output directory.

They subclass ``ValueError`` so the CLI reports them as one line with exit code 2 (models/ sits
below cli.py in the import order and cannot use ``easyquant.cli.UserError``).
"""

from __future__ import annotations


class ModelInputError(ValueError):
    """A model path, file or directory that cannot be used, said in one line."""


class OutputExistsError(ModelInputError):
    """The output directory exists and overwriting it was not asked for."""


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors can be long)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
