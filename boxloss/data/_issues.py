"""What a loader does with bad input: raise a clear error, or skip it, count it and say so. Never drop silently."""

from __future__ import annotations

import warnings
from collections import Counter

ON_ERROR = ("raise", "skip")


class InputIssues:
    """Collects the problems a loader finds while indexing a dataset.

    ``on_error="raise"`` raises at the first problem with a message naming the file and what was wrong;
    ``on_error="skip"`` skips the image or box, counts it in :attr:`skipped` (reason -> count), keeps the message in
    :attr:`log`, and :meth:`report` warns once with the counts. Repairs that keep the data (a box clipped to the
    image in skip mode) are counted in :attr:`repaired` and reported the same way.
    """

    def __init__(self, owner: str, on_error: str):
        if on_error not in ON_ERROR:
            raise ValueError(f"{owner}: on_error must be 'raise' or 'skip', got {on_error!r}")
        self.owner = owner
        self.on_error = on_error
        self.skipped: Counter = Counter()
        self.repaired: Counter = Counter()
        self.log: list[str] = []

    @property
    def raising(self) -> bool:
        return self.on_error == "raise"

    def problem(self, reason: str, message: str, exc_type: type = ValueError) -> None:
        """A bad image or box: raise ``exc_type(message)``, or count ``reason`` and go on (the caller skips)."""
        if self.raising:
            raise exc_type(message)
        self.skipped[reason] += 1
        self.log.append(message)

    def repair(self, reason: str, message: str) -> None:
        """A problem fixed in skip mode (raised in raise mode)."""
        if self.raising:
            raise ValueError(message)
        self.repaired[reason] += 1
        self.log.append(message)

    def summary(self) -> str:
        parts = []
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{n} x {r}" for r, n in sorted(self.skipped.items())))
        if self.repaired:
            parts.append("repaired " + ", ".join(f"{n} x {r}" for r, n in sorted(self.repaired.items())))
        return "; ".join(parts)

    def report(self) -> None:
        """Warn once if anything was skipped or repaired."""
        if self.skipped or self.repaired:
            first = self.log[0] if self.log else ""
            warnings.warn(f"{self.owner}: {self.summary()} (first: {first}; all messages in .skip_log)", stacklevel=3)
