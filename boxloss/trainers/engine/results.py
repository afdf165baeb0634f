"""A trainer's results: one row per cell of its paper's table, written as ``results.json`` and ``results.md``.

``results.json`` is ``{"trainer", "preset", "seed", "rows": [{"table", "setting", "metric", "value"}, ...],
"timing": {...}}``. Over several seeds (:func:`aggregate`) ``seed`` is the list of seeds and each row's ``value`` is
the mean, with ``std``, ``min``, ``max`` and the per-seed ``values`` beside it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Results:
    trainer: str
    preset: str
    seed: int | list
    rows: list[dict] = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, table: str, setting: str, metric: str, value: float) -> None:
        self.rows.append(
            {
                "table": str(table),
                "setting": setting,
                "metric": metric,
                "value": None if value is None else round(float(value), 4),
            }
        )

    def value(self, table: str, setting: str, metric: str) -> float | None:
        for r in self.rows:
            if (r["table"], r["setting"], r["metric"]) == (str(table), setting, metric):
                return r["value"]
        raise KeyError((table, setting, metric))

    def to_dict(self) -> dict:
        d = {
            "trainer": self.trainer,
            "preset": self.preset,
            "seed": self.seed,
            "rows": self.rows,
            "timing": self.timing,
        }
        if self.notes:
            d["notes"] = self.notes
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Results:
        return cls(
            d["trainer"], d["preset"], d["seed"], list(d["rows"]), dict(d.get("timing", {})), list(d.get("notes", []))
        )

    def markdown(self) -> str:
        """One markdown table per paper table: settings as rows, metrics as columns (mean ± std over seeds)."""
        seeds = self.seed if isinstance(self.seed, list) else [self.seed]
        lines = [
            f"# {self.trainer} ({self.preset} preset, seed{'s' if len(seeds) > 1 else ''} "
            f"{', '.join(map(str, seeds))})",
            "",
        ]
        tables: dict[str, dict[str, dict[str, dict]]] = {}
        for r in self.rows:
            tables.setdefault(r["table"], {}).setdefault(r["setting"], {})[r["metric"]] = r
        for table, settings in tables.items():
            metrics = list(dict.fromkeys(m for s in settings.values() for m in s))
            lines += [
                f"## Table {table}",
                "",
                "| setting | " + " | ".join(metrics) + " |",
                "|---|" + "---|" * len(metrics),
            ]
            for setting, cells in settings.items():
                lines.append(f"| {setting} | " + " | ".join(_cell(cells.get(m)) for m in metrics) + " |")
            lines.append("")
        scalar = {k: v for k, v in self.timing.items() if not isinstance(v, (dict, list))}
        if scalar:
            lines += ["## Timing", ""] + [f"- {k}: {v}" for k, v in scalar.items()] + [""]
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(lines)


def _cell(row: dict | None) -> str:
    if row is None or row["value"] is None:
        return "-"
    if "std" in row and len(row.get("values", [])) > 1:
        return f"{row['value']:.2f} ± {row['std']:.2f}"
    return f"{row['value']:.2f}"


def aggregate(per_seed: list[Results]) -> Results:
    """The mean over seeds of every row (with std, min, max and values), and the timing of each seed."""
    first = per_seed[0]
    out = Results(first.trainer, first.preset, [r.seed for r in per_seed])
    for row in first.rows:
        key = (row["table"], row["setting"], row["metric"])
        values = []
        for res in per_seed:
            try:
                values.append(res.value(*key))
            except KeyError:
                pass
        values = [v for v in values if v is not None]
        if not values:
            out.rows.append(dict(row, value=None, values=[]))
            continue
        out.rows.append(
            {
                "table": row["table"],
                "setting": row["setting"],
                "metric": row["metric"],
                "value": round(statistics.fmean(values), 4),
                "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "values": values,
            }
        )
    out.timing = {f"seed {r.seed}": r.timing for r in per_seed}
    for r in per_seed:
        out.notes += [f"seed {r.seed}: {n}" for n in r.notes]
    return out
