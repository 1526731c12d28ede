"""Errors a user can act on.

Every problem with user input (a study file, a CLI flag, a data folder, a
storage URL, a trial number) is raised as :class:`UsageError`. The CLI turns it
into one line on stderr and exit code 2, and nothing is written to storage
before all input has been checked.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: one clear line naming the field and what is accepted."""


def accepted(field: str, value: object, choices) -> UsageError:
    """Build the standard "unknown name" error for ``field``.

    >>> str(accepted("data.name", "foo", ["digits", "mnist"]))
    "data.name: unknown value 'foo'; accepted: digits, mnist"
    """
    return UsageError(f"{field}: unknown value {value!r}; accepted: {', '.join(sorted(map(str, choices)))}")
