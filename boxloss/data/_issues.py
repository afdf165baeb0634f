"""What a loader does with bad input: raise a clear error, or skip it, count it and say so. Never drop silently."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np

ON_ERROR = ("raise", "skip")


class InputIssues:
    """Collects the problems a loader finds while indexing a dataset.

    ``on_error="raise"`` raises at the first problem with a message naming the file and what was wrong;
    ``on_error="skip"`` skips the image or box, counts it in :attr:`skipped` (reason -> count), keeps the message in
    :attr:`log`, and :meth:`report` warns once with the counts. Repairs that keep the data (a box clipped to the
    image in skip mode) are counted in :attr:`repaired` and reported the same way.  Data that loads but is
    probably not what its author meant (a box whose segmentation lies wholly outside the image, so the box holds no
    object pixel) is kept in both modes, counted in :attr:`noticed` and reported the same way.
    """

    def __init__(self, owner: str, on_error: str):
        if on_error not in ON_ERROR:
            raise ValueError(f"{owner}: on_error must be 'raise' or 'skip', got {on_error!r}")
        self.owner = owner
        self.on_error = on_error
        self.skipped: Counter = Counter()
        self.repaired: Counter = Counter()
        self.noticed: Counter = Counter()
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

    def notice(self, reason: str, message: str) -> None:
        """Suspicious but loadable data: kept in both modes, counted and warned about."""
        self.noticed[reason] += 1
        self.log.append(message)

    def summary(self) -> str:
        parts = []
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{n} x {r}" for r, n in sorted(self.skipped.items())))
        if self.repaired:
            parts.append("repaired " + ", ".join(f"{n} x {r}" for r, n in sorted(self.repaired.items())))
        if self.noticed:
            parts.append("kept but suspicious " + ", ".join(f"{n} x {r}" for r, n in sorted(self.noticed.items())))
        return "; ".join(parts)

    def report(self) -> None:
        """Warn once if anything was skipped, repaired or noticed."""
        if self.skipped or self.repaired or self.noticed:
            first = self.log[0] if self.log else ""
            warnings.warn(f"{self.owner}: {self.summary()} (first: {first}; all messages in .skip_log)", stacklevel=3)


def check_box(box, width: int, height: int, where: str, issues: InputIssues):
    """Validate a continuous box against the image: zero/negative size or entirely outside is a problem (the box is
    skipped in skip mode); partly outside is clipped in skip mode. Returns the box to keep, or None."""
    x0, y0, x1, y1 = box
    if not all(np.isfinite(v) for v in box):
        issues.problem("non-finite box", f"{where} has a non-finite coordinate: {tuple(box)}")
        return None
    if x1 <= x0 or y1 <= y0:
        issues.problem(
            "zero-size box",
            f"{where} has zero or negative size: x0={x0:g}, y0={y0:g}, x1={x1:g}, y1={y1:g} (continuous coordinates)",
        )
        return None
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        issues.problem(
            "box outside image", f"{where} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the {width}x{height} image"
        )
        return None
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        issues.repair(
            "box clipped to image",
            f"{where} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) extends outside the {width}x{height} image",
        )
        return max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    return x0, y0, x1, y1
