"""Shared helpers for the boxloss kernel benchmarks.

Everything here is independent of any particular op:

* parsing helpers for the benchmarks' own options (``parse_sizes``, ``parse_int_list``,
  ``resolve_device``; the shared command line is :mod:`benchmarks.cli`);
* wall-clock timing with warm-up, median and min (``time_fn``);
* copy bandwidth of the device (``copy_bandwidth``);
* machine information (``machine_info``, ``format_machine_info``) and checks
  that nothing else loaded the CPUs (``cpu_busy_fraction``, ``OtherCpuUse``);
* peak memory: on CUDA from the caching allocator (``cuda_peak_extra_bytes``);
  on the CPU, where torch keeps no allocator statistics, from the kernel's
  resident-set high-water mark of a fresh child process
  (``cpu_peak_extra_bytes`` in the child, ``run_children`` in the parent);
  resolution is a page (4 KiB), and below ~1 MiB the kernel's RSS counters
  can lag, so tiny sizes read low;
* plain-text tables and JSON output (``format_table``, ``write_json``).
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable

import torch

MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Protocol between a benchmark module and the child processes it starts for
# CPU memory measurements: the parent runs
#     python -m <module> --memory-child '<json payload>'
# and the child prints one line  RESULT_MARKER + json  on stdout.
CHILD_FLAG = "--memory-child"
RESULT_MARKER = "@@BENCH_RESULT@@ "

# glibc serves allocations at or above this size with mmap and returns them to
# the kernel on free, so the resident set size tracks live memory.  It must be
# in the environment before the child's python starts (glibc reads it once).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


# --------------------------------------------------------------------------- parsing


def parse_int_list(text: str) -> list[int]:
    """ "4,8" -> [4, 8]."""
    return [int(part) for part in text.split(",") if part.strip()]


def parse_sizes(text: str) -> list[tuple[int, int, int, int]]:
    """ "8x21x128,16x2x256x128" -> [(8, 21, 128, 128), (16, 2, 256, 128)].

    Each size is BxCxS (square S x S) or BxCxHxW.
    """
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        dims = [int(d) for d in part.split("x")]
        if len(dims) == 3:
            dims.append(dims[2])
        if len(dims) != 4 or min(dims) <= 0:
            raise ValueError(f"bad size {part!r}: expected BxCxS or BxCxHxW with positive integers")
        sizes.append(tuple(dims))
    if not sizes:
        raise ValueError("no sizes given")
    return sizes


def size_label(B: int, C: int, H: int, W: int) -> str:
    return f"{B}x{C}x{H}x{W}"


def resolve_device(name: str) -> torch.device | None:
    """The torch.device for ``name``, or None (after printing why) when it is
    unavailable, so that a benchmark can skip cleanly."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"CUDA is not available (torch {torch.__version__}); skipping the --device {name} benchmark.")
        return None
    if device.type not in ("cpu", "cuda"):
        print(f"device {name!r} is not supported by this benchmark (use cpu or cuda); skipping.")
        return None
    return device


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 15,
    warmup: int = 3,
    setup: Callable[[], Any] | None = None,
    max_seconds: float | None = None,
    min_repeats: int = 3,
) -> dict:
    """Times ``fn()`` with time.perf_counter.

    ``setup()`` (not timed) runs before every call, e.g. to clear gradients.
    After ``warmup`` untimed calls, up to ``repeats`` timed calls run; when
    ``max_seconds`` is given, timing stops early once the timed calls have
    taken that long in total (but never before ``min_repeats`` calls).
    The device is synchronised before and after each timed call.

    Returns ``{"median_s", "min_s", "max_s", "repeats", "times_s"}``.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times: list[float] = []
    for i in range(max(repeats, 1)):
        if setup is not None:
            setup()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if max_seconds is not None and i + 1 >= min_repeats and sum(times) >= max_seconds:
            break
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "times_s": times,
    }


def time_interleaved(steps: dict, *, device, repeats: int, warmup: int, max_seconds: float) -> dict:
    """Times each side's step alternately (a, b, a, b, ...), so that both see
    the same load on a shared machine; ``steps`` maps a side to ``(step,
    clear)``, ``clear()`` (not timed) running before every call.  Stops once
    the timed calls took ``max_seconds`` (after at least 3 rounds).  Returns
    {side: time_fn-style dict}, each with ``times_s`` in round order, so
    that round i of two sides can be paired."""
    for _ in range(warmup):
        for step, clear in steps.values():
            clear()
            step()
    times = {side: [] for side in steps}
    for i in range(max(repeats, 1)):
        for side, (step, clear) in steps.items():
            clear()
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[side].append(time.perf_counter() - start)
        if i + 1 >= 3 and sum(sum(t) for t in times.values()) >= max_seconds:
            break
    for _, clear in steps.values():
        clear()
    return {
        side: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "repeats": len(t), "times_s": t}
        for side, t in times.items()
    }


def copy_bandwidth(device: torch.device | str = "cpu", mib: int = 256, repeats: int = 10, warmup: int = 2) -> dict:
    """Copy bandwidth: median time of ``dst.copy_(src)`` on two preallocated
    float32 tensors of ``mib`` MiB each; bytes moved = 2 * size (read + write).

    Returns ``{"gbps", "bytes_per_s", "median_s", "min_s", "buffer_mib", "repeats"}``
    (GB = 1e9 bytes).
    """
    device = torch.device(device)
    n = mib * MiB // 4
    src = torch.rand(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.fill_(0.0)  # touch the pages before timing
    timing = time_fn(lambda: dst.copy_(src), device=device, repeats=repeats, warmup=warmup)
    moved = 2 * n * 4
    bytes_per_s = moved / timing["median_s"]
    return {
        "gbps": bytes_per_s / 1e9,
        "bytes_per_s": bytes_per_s,
        "median_s": timing["median_s"],
        "min_s": timing["min_s"],
        "buffer_mib": mib,
        "repeats": timing["repeats"],
    }


# --------------------------------------------------------------------------- machine info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def load_average() -> list[float] | None:
    """1-, 5- and 15-minute load averages, or None where unavailable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_busy_fraction(interval: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat),
    while this process sleeps: i.e. how much other processes use the machine.
    None where /proc/stat is unavailable."""

    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return None if total <= 0 else 1.0 - (idle1 - idle0) / total


class OtherCpuUse:
    """Measures how much of the machine's CPU time *other* processes used
    between ``start()`` and ``stop()``: busy time from /proc/stat minus this
    process's own CPU time (os.times), over the total CPU time available.
    Timings taken while this is high are unreliable.  ``stop()`` returns the
    fraction in [0, 1], or None where /proc/stat is unavailable."""

    def __init__(self) -> None:
        self._start = None

    @staticmethod
    def _sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        t = os.times()
        return sum(fields), sum(fields) - idle, t.user + t.system

    def start(self) -> OtherCpuUse:
        try:
            self._start = self._sample()
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def stop(self) -> float | None:
        if self._start is None:
            return None
        try:
            total1, busy1, own1 = self._sample()
        except (OSError, ValueError, IndexError):
            return None
        total0, busy0, own0 = self._start
        total = total1 - total0
        if total <= 0:
            return None
        own = (own1 - own0) * os.sysconf("SC_CLK_TCK")
        return min(max((busy1 - busy0 - own) / total, 0.0), 1.0)


def busy_machine_warning(busy: float | None, when: str, threshold: float = 0.15) -> str | None:
    """A warning when other processes used more than ``threshold`` of the CPUs,
    which distorts timings."""
    if busy is not None and busy > threshold:
        return (
            f"WARNING: other processes kept {busy:.0%} of the CPUs busy {when}; "
            "the timings may be unreliable (run again on an idle machine)."
        )
    return None


def machine_info(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cpu_model": _cpu_model(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "git": _git_revision(),
        "load_average_at_start": load_average(),
    }
    try:
        from boxloss._extension import extension_loaded

        info["boxloss_extension_loaded"] = bool(extension_loaded())
    except Exception as exc:  # pragma: no cover - informational only
        info["boxloss_extension_loaded"] = f"unknown ({exc})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_name"] = props.name
        info["gpu_memory_gib"] = props.total_memory / (1 << 30)
        info["cuda_version"] = torch.version.cuda
    return info


def format_machine_info(info: dict) -> str:
    line = (
        f"machine: {info['cpu_count']} cores, torch threads {info['torch_threads']}, "
        f"torch {info['torch_version']}, CPU {info['cpu_model']}"
    )
    if "gpu_name" in info:
        line += f", GPU {info['gpu_name']} (CUDA {info['cuda_version']})"
    line += f", boxloss extension loaded: {info.get('boxloss_extension_loaded')}"
    git = info.get("git") or {}
    if git.get("commit"):
        line += f", git {git['commit'][:10]}{' (dirty)' if git.get('dirty') else ''}"
    return line


# --------------------------------------------------------------------------- memory


def read_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (e.g. VmRSS, VmHWM) in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current VmRSS (writes 5 to /proc/self/clear_refs).
    Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def cpu_peak_extra_bytes(step: Callable[[], Any], cleanup: Callable[[], Any] | None = None) -> dict:
    """Peak extra resident memory of ``step()`` in this process.

    Meant for a fresh child process started with ``CHILD_ENV``: runs
    ``step()`` once as a warm-up, then ``cleanup()`` (e.g. drop the gradient),
    reads VmRSS, resets the high-water mark, runs ``step()`` again and reads
    VmHWM.  Returns ``{"ok": True, "rss_before", "hwm", "peak_extra"}`` in
    bytes, or ``{"ok": False, "reason"}`` where the kernel does not allow it.
    """
    step()
    if cleanup is not None:
        cleanup()
    gc.collect()
    rss_before = read_status_bytes("VmRSS")
    if rss_before is None:
        return {"ok": False, "reason": "/proc/self/status has no VmRSS"}
    if not reset_peak_rss():
        return {"ok": False, "reason": "/proc/self/clear_refs is not writable"}
    hwm_reset = read_status_bytes("VmHWM")
    if hwm_reset is None or hwm_reset > rss_before + 4 * MiB:
        return {"ok": False, "reason": "VmHWM was not reset by /proc/self/clear_refs"}
    step()
    hwm = read_status_bytes("VmHWM")
    if hwm is None:
        return {"ok": False, "reason": "/proc/self/status has no VmHWM"}
    return {
        "ok": True,
        "rss_before": rss_before,
        "hwm": hwm,
        "peak_extra": hwm - rss_before,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def cuda_peak_extra_bytes(
    step: Callable[[], Any], device: torch.device | str, cleanup: Callable[[], Any] | None = None
) -> dict:
    """Peak extra allocated CUDA memory of ``step()`` (after one warm-up call),
    from torch.cuda.max_memory_allocated."""
    device = torch.device(device)
    step()
    if cleanup is not None:
        cleanup()
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"ok": True, "allocated_before": before, "peak": peak, "peak_extra": peak - before}


def child_report(result: dict) -> None:
    """Used in a child process: prints the result for the parent to parse."""
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_child(module: str, payload: dict, *, timeout: float = 600.0, env_extra: dict | None = None) -> dict:
    """Runs ``python -m module --memory-child '<payload json>'`` in a fresh
    process from the repository root, with ``CHILD_ENV`` (plus ``env_extra``)
    in its environment, and returns the dict it reported (``{"ok": False,
    "reason"}`` when it failed)."""
    env = dict(os.environ)
    env.update(CHILD_ENV)
    if env_extra:
        env.update(env_extra)
    cmd = [sys.executable, "-m", module, CHILD_FLAG, json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"child timed out after {timeout:.0f} s"}
    except OSError as exc:
        return {"ok": False, "reason": f"could not start child: {exc}"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                return json.loads(line[len(RESULT_MARKER) :])
            except json.JSONDecodeError:
                break
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"ok": False, "reason": f"child exited with {proc.returncode}: {' | '.join(tail)}"}


def run_children(module: str, payloads: Sequence[dict], *, workers: int | None = None, **kwargs) -> list[dict]:
    """``run_child`` for each payload, ``workers`` at a time (default: the
    number of cores).  Peak RSS is per process, so children may run side by
    side; do not time anything while they run."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(payloads) or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_child(module, p, **kwargs), payloads))


# --------------------------------------------------------------------------- output


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    sep = "-+-".join("-" * w for w in widths)
    lines = [" | ".join(h.rjust(w) for h, w in zip(headers, widths)), sep]
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def mib(nbytes: float | None, digits: int = 2) -> str:
    return "n/a" if nbytes is None else f"{nbytes / MiB:.{digits}f}"


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Writes ``payload`` as JSON atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
