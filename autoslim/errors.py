"""Errors a user can act on.

Every problem with user input (a study file, a CLI flag, a data folder, a
storage URL, a trial number) is raised as :class:`UsageError`. The CLI turns it
into one line on stderr and exit code 2, and nothing is written to storage
before all input has been checked.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: one clear line naming the field and what is accepted."""


class TargetUnreachable(UsageError):
    """A size the knobs of a trial cannot build: a parameter budget below the smallest network of a method that
    builds its own (ThriftyNet with its sampled T and h). In a study the trial is pruned before it trains, with
    this line as its ``pruned_reason``; elsewhere (``autoslim train``) it is a usage error."""


def accepted(field: str, value: object, choices) -> UsageError:
    """Build the standard "unknown name" error for ``field``.

    >>> str(accepted("data.name", "foo", ["digits", "mnist"]))
    "data.name: unknown value 'foo'; accepted: digits, mnist"
    """
    return UsageError(f"{field}: unknown value {value!r}; accepted: {', '.join(sorted(map(str, choices)))}")


def load_error(e: BaseException) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` failed, without PyTorch's advice to retry
    with ``weights_only=False`` (never take it for a file you did not make).

    >>> import pickle
    >>> load_error(pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` "
    ...                                   "set to `False` will likely succeed.\\n\\n"
    ...                                   "Unsupported global: GLOBAL os.system"))
    'UnpicklingError: it holds objects other than tensors and plain data (Unsupported global: GLOBAL os.system)'
    """
    text = str(e)
    if "weights only load failed" not in text.lower():
        return f"{type(e).__name__}: {' '.join(text.split())}".rstrip(": ")
    lines = [line.split("WeightsUnpickler error:", 1)[-1].strip() for line in text.splitlines()]
    detail = " ".join(line for line in lines if line and "weights_only" not in line
                      and not line.startswith(("Weights only load failed", "Check the documentation", "Please file")))
    return (f"{type(e).__name__}: it holds objects other than tensors and plain data"
            + (f" ({detail})" if detail else ""))
