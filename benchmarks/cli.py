"""The command line shared by every benchmark, and the results file.

A benchmark module declares a :class:`Benchmark`: its name, its own options
(``add_arguments``), the per-benchmark defaults of the shared options, the
function that measures (``run``) and, where it measures CPU memory in fresh
processes, the child entry point (``child``).  :func:`main` does the rest:

* the shared options ``--quick --device --repeats --warmup --max-seconds --seed
  --json --no-memory``;
* the memory child protocol (``python -m <module> --memory-child '<json>'``);
* the machine line, warnings about a busy machine or a missing extension;
* printing the tables the run returns, writing its JSON (atomically).

``python -m benchmarks --write-results`` runs every benchmark and writes
``benchmarks/RESULTS.md`` from the numbers measured in that run
(:func:`write_results`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import common

RESULTS_PATH = common.REPO_ROOT / "benchmarks" / "RESULTS.md"


@dataclass
class Table:
    """A table of measured values: printed as plain text, written to RESULTS.md as Markdown."""

    title: str
    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]

    def text(self) -> str:
        return f"{self.title}\n{common.format_table(self.headers, self.rows)}"

    def markdown(self) -> str:
        def cell(value: Any) -> str:
            return str(value).replace("|", "\\|")

        lines = [
            self.title,
            "",
            "| " + " | ".join(cell(h) for h in self.headers) + " |",
            "|" + "---|" * len(self.headers),
        ]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Result:
    """What a benchmark's ``run`` returns: its tables, the lines printed under them (settings and checks), and
    the JSON payload (the harness adds the machine information and the settings)."""

    tables: list[Table]
    lines: list[str] = field(default_factory=list)
    payload: dict = field(default_factory=dict)


@dataclass
class Report:
    """One benchmark's run, as the harness saw it."""

    name: str
    description: str
    result: Result
    info: dict
    settings: dict
    seconds: float
    json_path: Path


@dataclass
class Benchmark:
    """A benchmark's declaration.

    ``run(args, device, info)`` measures and returns a :class:`Result`; ``child(payload)`` (optional) runs in a
    fresh process and returns the dict that :func:`common.cpu_peak_extra_bytes` gives; ``add_arguments(parser)``
    adds the benchmark's own options; ``check(args, parser)`` validates them after parsing.  ``defaults`` maps
    a shared option to its (full, quick) default: ``repeats``, ``warmup``, ``max_seconds``.
    """

    name: str
    doc: str
    run: Callable[[argparse.Namespace, torch.device, dict], Result]
    child: Callable[[dict], dict] | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    check: Callable[[argparse.Namespace, argparse.ArgumentParser], None] | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    defaults: dict = field(default_factory=dict)

    @property
    def module(self) -> str:
        return f"benchmarks.{self.name}"

    @property
    def description(self) -> str:
        """The first paragraph of the module docstring."""
        return " ".join(self.doc.strip().split("\n\n")[0].split())


_DEFAULTS = {"repeats": (15, 3), "warmup": (2, 1), "max_seconds": (20.0, 2.0)}


def parser(spec: Benchmark) -> argparse.ArgumentParser:
    """The shared options plus the benchmark's own."""
    defaults = {**_DEFAULTS, **spec.defaults}
    p = argparse.ArgumentParser(prog=f"python -m {spec.module}", description=spec.description)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke test")
    p.add_argument(
        "--device",
        default="cpu",
        help=f"{' or '.join(spec.devices)} (default cpu)" if len(spec.devices) > 1 else "cpu only",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per measurement (default {}; {} with --quick)".format(*defaults["repeats"]),
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls before timing (default {}; {} with --quick)".format(*defaults["warmup"]),
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="cap on the timed seconds per measurement, at least 3 repeats (default {:g}; {:g} with --quick)".format(
            *defaults["max_seconds"]
        ),
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    p.add_argument(
        "--json", default=None, help=f"output path (default benchmarks/results/{spec.name}_<device>[_quick].json)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    if spec.add_arguments is not None:
        spec.add_arguments(p)
    return p


def parse_args(spec: Benchmark, argv: Sequence[str], *, known_only: bool = False) -> argparse.Namespace:
    """The options in ``argv``; with ``known_only`` the options of other benchmarks are ignored (``python -m
    benchmarks`` passes its arguments to every benchmark)."""
    p = parser(spec)
    args = p.parse_known_args(list(argv))[0] if known_only else p.parse_args(list(argv))
    defaults = {**_DEFAULTS, **spec.defaults}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.repeats < 1 or args.warmup < 0 or args.max_seconds <= 0:
        p.error("--repeats must be >= 1, --warmup >= 0 and --max-seconds > 0")
    if spec.check is not None:
        spec.check(args, p)
    return args


def _settings(args: argparse.Namespace) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "json"}


def unknown_options(spec: Benchmark, argv: Sequence[str]) -> set[str]:
    """The options in ``argv`` that this benchmark does not take."""
    return {a for a in parser(spec).parse_known_args(list(argv))[1] if a.startswith("-")}


def run(spec: Benchmark, argv: Sequence[str], *, known_only: bool = False) -> Report | None:
    """Parses ``argv``, measures, prints and writes the JSON; None when the device is unavailable."""
    args = parse_args(spec, argv, known_only=known_only)
    device = common.resolve_device(args.device)
    if device is None:
        return None
    if device.type not in spec.devices:
        print(f"benchmarks.{spec.name} runs on {' and '.join(spec.devices)} only; skipping --device {args.device}.")
        return None
    start = time.perf_counter()
    info = common.machine_info(device)
    info["date_utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(common.format_machine_info(info))
    info["cpu_busy_before"] = common.cpu_busy_fraction()
    busy = common.busy_machine_warning(info["cpu_busy_before"], "before the benchmark")
    if busy:
        print(busy)
    if info.get("boxloss_extension_loaded") is not True:
        print("WARNING: the boxloss extension is not loaded; the fused side runs the PyTorch reference fallback.")
    result = spec.run(args, device, info)
    for table in result.tables:
        print()
        print(table.text())
    if result.lines:
        print()
        for line in result.lines:
            print(line)
    seconds = time.perf_counter() - start
    print(f"(total benchmark time {seconds:.1f} s)")
    path = (
        Path(args.json)
        if args.json
        else (common.RESULTS_DIR / f"{spec.name}_{device.type}{'_quick' if args.quick else ''}.json")
    )
    payload = {
        "benchmark": spec.name,
        "machine": info,
        "settings": _settings(args),
        **result.payload,
        "lines": result.lines,
    }
    print(f"wrote {common.write_json(path, payload)}")
    return Report(spec.name, spec.description, result, info, _settings(args), seconds, path)


def main(spec: Benchmark, argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == common.CHILD_FLAG:
        if spec.child is None:
            raise SystemExit(f"benchmarks.{spec.name} has no memory child")
        try:
            outcome = spec.child(json.loads(argv[1]))
        except Exception as exc:  # reported to the parent, which prints n/a
            outcome = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
        common.child_report(outcome)
        return 0
    run(spec, argv)
    return 0


# --------------------------------------------------------------------------- RESULTS.md


def _git_line(info: dict) -> str:
    git = info.get("git") or {}
    if not git.get("commit"):
        return "unknown (not a git checkout)"
    return git["commit"] + (" (with uncommitted changes)" if git.get("dirty") else "")


def render_results(reports: Sequence[Report], argv: Sequence[str]) -> str:
    """RESULTS.md from the reports of one run of ``python -m benchmarks``."""
    first = reports[0].info
    quick = any(r.settings.get("quick") for r in reports)
    command = " ".join(["python -m benchmarks --write-results", *argv])
    lines = [
        "# Benchmark results",
        "",
        f"Written by `{command}` from the numbers measured in that run; do not edit by hand, run it again.",
        "",
    ]
    if quick:
        lines += [
            "**These are the `--quick` sizes: a smoke test of the benchmarks, not measurements to quote.** "
            "Run `python -m benchmarks --write-results` on a quiet machine for the real tables.",
            "",
        ]
    lines += [
        f"- machine: {first['cpu_model']}, {first['cpu_count']} cores, {first['torch_threads']} torch threads"
        + (f", GPU {first['gpu_name']} (CUDA {first['cuda_version']})" if "gpu_name" in first else ""),
        f"- torch {first['torch_version']}, Python {first['python_version']}, {first['platform']}",
        f"- boxloss extension loaded: {first.get('boxloss_extension_loaded')}",
        f"- date: {first.get('date_utc')}",
        f"- git commit: {_git_line(first)}",
        f"- load average at the start: {first.get('load_average_at_start')}",
        "",
        "Timings are medians (minimum in brackets where shown) of wall-clock time after warm-up calls; peak memory "
        "is measured in fresh processes on the CPU. How each benchmark measures is described in its module "
        "docstring (`python -m benchmarks.<name> --help`).",
    ]
    for report in reports:
        lines += ["", f"## {report.name}", "", report.description, ""]
        busy = report.info.get("cpu_busy_before")
        if busy is not None and busy > 0.15:
            lines += [
                f"Other processes kept {busy:.0%} of the CPUs busy when this benchmark started; its timings "
                "are unreliable.",
                "",
            ]
        for table in report.result.tables:
            lines += [table.markdown(), ""]
        if report.result.lines:
            lines += [f"- {line}" for line in report.result.lines]
            lines.append("")
        lines.append(
            f"({report.seconds:.0f} s; raw numbers in `{os.path.relpath(report.json_path, common.REPO_ROOT)}`)"
        )
    return "\n".join(lines).rstrip() + "\n"


def write_results(reports: Sequence[Report], argv: Sequence[str], path: Path = RESULTS_PATH) -> Path:
    """Writes the results file atomically: a temporary file in the same folder, then a rename."""
    text = render_results(reports, argv)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
