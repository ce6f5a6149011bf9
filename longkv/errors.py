"""User-facing errors.

Every mistake a user can make (a missing file, a wrong model reference, a budget
that cannot work) raises :class:`LongKVError` with a message that names the
problem and the fix. The CLI prints it as one line and exits with status 2;
internal invariants use ``assert`` instead.
"""

from __future__ import annotations


class LongKVError(Exception):
    """A problem with the user's input, with a hint on how to fix it.

    ``str(err)`` is a single line: ``"<what is wrong>: <what to do>"``.
    """
