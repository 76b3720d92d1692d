"""Errors that the command line reports as one line: ``vbseg: error: <path>: <problem>``.

Everything that is the user's fault (a file, an option, a config key) raises one of
these; ``vbseg.cli`` catches them, prints ``str(error)`` after ``vbseg: error:`` and
exits with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class VbsegError(Exception):
    """Base class of the errors the CLI reports without a traceback."""


class InputError(VbsegError, ValueError):
    """A problem with one named input (a file, a directory or an option).

    ``str(error)`` is ``"<subject>: <problem>"`` so the user sees which file (or option)
    is wrong and why, in one line.
    """

    def __init__(self, subject: str | os.PathLike, problem: str):
        self.subject = os.fspath(subject)
        self.problem = problem
        super().__init__(f"{self.subject}: {problem}")


class OutputError(InputError):
    """An output path that must not be written (exists without --overwrite, or is an input)."""


class InputErrors(VbsegError):
    """Several input problems found together (the cases of ``segment --batch``, all checked
    before the first fit): ``str(error)`` is one line per problem, each a
    :class:`InputError`'s."""

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__("\n".join(str(error) for error in self.errors))
