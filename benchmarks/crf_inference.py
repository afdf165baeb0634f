"""Benchmark of DenseCRF mean-field inference (boxloss.dense_crf_inference) beside Krähenbühl's code through
pydensecrf, in one run: 513 x 513, 21 classes, 10 iterations, BANA's settings (bilateral weight 4, sigma_xy 55,
sigma_rgb 3; Gaussian weight 3, sigma_xy 3), on one core and on all cores, with the two sides' agreement and peak
memory.

Run from the repository root:

    python -m benchmarks.crf_inference            # 513 x 513, CPU
    python -m benchmarks.crf_inference --quick    # smoke test (129 x 129)
    python -m benchmarks.crf_inference --device cuda

Inputs are natural-looking: the package's synthetic benchmark images (uint8 colours) and smooth logits that follow
their objects (benchmarks.dense_crf's make_inputs), unary = -log_softmax(logits), float32.  Each call is the whole
inference from unaries and image to Q, lattice builds included, on both sides.  The two sides alternate call by
call (common.time_interleaved), so that both see the same load on a shared machine; the table gives medians and
the range, and the median of the per-round ratios.  pydensecrf runs on one core whatever the thread count.  The
agreement columns compare the two sides' Q on the timed input.  Peak memory (CPU) is the resident-set high-water
mark above the inputs of one call in a fresh process, per side.  Checked at the end: at least 3x faster than
pydensecrf on one core, and per-pixel argmax agreement of at least 99 %.

The smoothness-kernel table measures the choice the op makes for that kernel: its 2-d permutohedral lattice (the
one pydensecrf uses) against a separable Gaussian (PyTorch's grouped convolutions, radius 4 sigma), per mean-field
step of 21 channels on one core, and how close each is to pydensecrf's marginals.
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

from benchmarks import cli, common
from benchmarks.dense_crf import make_inputs

MODULE = "benchmarks.crf_inference"
SIZE = 513
QUICK_SIZE = 129
CHANNELS = 21
ITERATIONS = 10
BILATERAL = (4.0, 55.0, 3.0)
GAUSSIAN = (3.0, 3.0)
ONE_CORE_TARGET = 3.0
ARGMAX_TARGET = 0.99
SMOOTHNESS_ACCURACY_SIZE = 129
QUICK_SMOOTHNESS_ACCURACY_SIZE = 33


def make_problem(size: int, device, seed: int = 0):
    """(unary (1, C, H, W) float32, image (1, 3, H, W) uint8) on ``device``."""
    logits, image = make_inputs(1, CHANNELS, size, size, seed=seed)
    unary = (-logits.log_softmax(1)).contiguous()
    return unary.to(device), image.round().clamp(0, 255).to(torch.uint8).to(device)


def _settings():
    return dict(bilateral=BILATERAL, gaussian=GAUSSIAN, iterations=ITERATIONS)


def _pydensecrf_or_none():
    """pydensecrf's inference (boxloss.reference.crf_inference), or None where pydensecrf is not installed; an
    installed build that does not run raises, with the reason."""
    from boxloss._pydensecrf import PyDenseCRFUnavailable
    from boxloss.reference.crf_inference import pydensecrf_inference

    try:
        pydensecrf_inference(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2, dtype=torch.uint8), iterations=1)
    except PyDenseCRFUnavailable as exc:
        if exc.installed:
            raise
        return None
    return pydensecrf_inference


# --------------------------------------------------------------------------- the two sides


def time_sides(size: int, device, threads: int, repeats: int, warmup: int, max_seconds: float, seed: int) -> dict:
    import boxloss

    pydensecrf_inference = _pydensecrf_or_none()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        unary, image = make_problem(size, device, seed)
        outputs = {}

        def ours():
            outputs["boxloss"] = boxloss.dense_crf_inference(unary, image, **_settings())

        def theirs():
            outputs["pydensecrf"] = pydensecrf_inference(unary.cpu(), image.cpu(), **_settings())

        def nothing():
            pass

        steps = {"boxloss": (ours, nothing)}
        if pydensecrf_inference is not None:
            steps["pydensecrf"] = (theirs, nothing)
        monitor = common.OtherCpuUse().start()
        timing = common.time_interleaved(steps, device=device, repeats=repeats, warmup=warmup, max_seconds=max_seconds)
        other = monitor.stop()
    finally:
        torch.set_num_threads(previous)
    row = {"size": size, "threads": threads, "device": str(device), "timing": timing, "other_cpu_use": other}
    if "pydensecrf" in timing:
        ours_t, theirs_t = timing["boxloss"]["times_s"], timing["pydensecrf"]["times_s"]
        ratios = [b / a for a, b in zip(ours_t, theirs_t)]
        row["speedup_of_medians"] = timing["pydensecrf"]["median_s"] / timing["boxloss"]["median_s"]
        row["paired_speedup"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        q, expected = outputs["boxloss"].float().cpu(), outputs["pydensecrf"]
        row["agreement"] = {
            "argmax": float((q.argmax(1) == expected.argmax(1)).float().mean()),
            "max_abs_dq": float((q - expected).abs().max()),
            "mean_abs_dq": float((q - expected).abs().mean()),
        }
    return row


def render_sides(rows, memory: dict):
    headers = [
        "image",
        "threads",
        "boxloss s med (min-max)",
        "pydensecrf s med (min-max)",
        "speed-up (medians)",
        "speed-up per round med (min-max)",
        "argmax agree",
        "max |dQ|",
        "mean |dQ|",
        "peak MiB boxloss / pydensecrf",
        "other CPU use",
    ]
    body = []
    for r in rows:
        t = r["timing"]

        def cell(side, t=t):
            if side not in t:
                return "n/a (not installed)"
            s = t[side]
            return f"{s['median_s']:.3f} ({s['min_s']:.3f}-{s['max_s']:.3f})"

        paired = r.get("paired_speedup")
        agreement = r.get("agreement")
        peaks = memory.get(r["threads"], {})
        body.append(
            [
                f"{r['size']}x{r['size']}",
                r["threads"],
                cell("boxloss"),
                cell("pydensecrf"),
                f"{r['speedup_of_medians']:.1f}x" if "speedup_of_medians" in r else "n/a",
                f"{paired['median']:.1f}x ({paired['min']:.1f}-{paired['max']:.1f})" if paired else "n/a",
                f"{agreement['argmax']:.5f}" if agreement else "n/a",
                f"{agreement['max_abs_dq']:.1e}" if agreement else "n/a",
                f"{agreement['mean_abs_dq']:.1e}" if agreement else "n/a",
                f"{common.mib(peaks.get('boxloss'), 1)} / {common.mib(peaks.get('pydensecrf'), 1)}",
                "n/a" if r["other_cpu_use"] is None else f"{r['other_cpu_use']:.0%}",
            ]
        )
    return headers, body


# --------------------------------------------------------------------------- peak memory (fresh processes)


def _memory_child(payload: dict) -> dict:
    torch.set_num_threads(int(payload["threads"]))
    unary, image = make_problem(int(payload["size"]), "cpu", int(payload["seed"]))
    if payload["side"] == "boxloss":
        import boxloss

        def step():
            return boxloss.dense_crf_inference(unary, image, **_settings())
    else:
        pydensecrf_inference = _pydensecrf_or_none()
        if pydensecrf_inference is None:
            return {"ok": False, "reason": "pydensecrf is not installed"}

        def step():
            return pydensecrf_inference(unary, image, **_settings())

    return common.cpu_peak_extra_bytes(step)


def measure_memory(size: int, seed: int, threads: list[int]) -> dict:
    """{threads: {side: peak extra bytes or None}}, each side in a fresh process."""
    cells = [(t, side) for t in threads for side in ("boxloss", "pydensecrf")]
    payloads = [{"size": size, "seed": seed, "threads": t, "side": side} for t, side in cells]
    results = common.run_children(MODULE, payloads, workers=1)
    memory: dict = {}
    for (t, side), result in zip(cells, results):
        memory.setdefault(t, {})[side] = result.get("peak_extra") if result.get("ok") else None
    return memory


# --------------------------------------------------------------------------- the smoothness kernel


def separable_gaussian_step(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """The filter of one mean-field step's smoothness kernel as a separable Gaussian (radius 4 sigma, zero
    padding) of every channel, in PyTorch's grouped convolutions (the normaliser, a filter of ones, is fixed)."""
    radius = max(1, int(round(4 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=values.dtype, device=values.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    C = values.shape[1]
    x = F.conv2d(values, g.view(1, 1, 1, -1).expand(C, 1, 1, -1), padding=(0, radius), groups=C)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(C, 1, -1, 1), padding=(radius, 0), groups=C)


def smoothness_kernel(
    size: int, device, repeats: int, warmup: int, max_seconds: float, seed: int, accuracy_size: int
) -> dict:
    import boxloss
    from boxloss.reference.crf_inference import (
        dense_crf_inference_reference,
        gaussian_filter_separable,
        lattice_filter_nd,
        permutohedral_lattice_nd,
        spatial_features,
    )

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unary, image = make_problem(size, device, seed)
        only_gaussian = dict(bilateral=(0.0, 1.0, 1.0), gaussian=GAUSSIAN)
        values = torch.softmax(-unary, 1).contiguous()
        kw = dict(device=device, repeats=repeats, warmup=warmup, max_seconds=max_seconds)
        many = common.time_fn(lambda: boxloss.dense_crf_inference(unary, image, iterations=11, **only_gaussian), **kw)
        one = common.time_fn(lambda: boxloss.dense_crf_inference(unary, image, iterations=1, **only_gaussian), **kw)
        separable = common.time_fn(lambda: separable_gaussian_step(values, GAUSSIAN[1]), **kw)
    finally:
        torch.set_num_threads(previous)
    lattice_step = max(0.0, (many["median_s"] - one["median_s"]) / 10)

    # Accuracy: the normalised lattice filter against the exact Gaussian, and both kernels' marginals
    # against pydensecrf's (whose smoothness kernel is this lattice).
    n = accuracy_size
    v = torch.rand(3, n * n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ones = torch.ones(1, n * n, dtype=torch.float64)
    lattice = permutohedral_lattice_nd(spatial_features(n, n, GAUSSIAN[1]))
    approx = lattice_filter_nd(torch.cat([v, ones]), lattice)
    exact = gaussian_filter_separable(torch.cat([v, ones]), n, n, GAUSSIAN[1])
    normalised_error = float(
        ((approx[:3] / approx[3:]) - (exact[:3] / exact[3:])).norm() / (exact[:3] / exact[3:]).norm()
    )
    result = {
        "size": size,
        "lattice_step_s": lattice_step,
        "separable_step_s": separable["median_s"],
        "accuracy_size": n,
        "normalised_filter_error": normalised_error,
    }
    pydensecrf_inference = _pydensecrf_or_none()
    if pydensecrf_inference is not None:
        u, im = make_problem(n, "cpu", seed)
        expected = pydensecrf_inference(u, im, **_settings())
        ours = boxloss.dense_crf_inference(u, im, **_settings())
        exact_q = dense_crf_inference_reference(u, im, kernels=("lattice", "exact"), **_settings())
        for name, q in (("lattice", ours), ("separable", exact_q)):
            result[f"{name}_argmax_agreement"] = float((q.argmax(1) == expected.argmax(1)).float().mean())
            result[f"{name}_max_abs_dq"] = float((q.float() - expected).abs().max())
    return result


def render_smoothness(r):
    headers = [
        "smoothness kernel",
        f"ms per step, {r['size']}x{r['size']}, 21 ch, 1 core",
        f"argmax agreement with pydensecrf ({r['accuracy_size']}x{r['accuracy_size']})",
        "max |dQ|",
    ]
    body = []
    for name, label in (("lattice", "2-d lattice (the op)"), ("separable", "separable Gaussian (PyTorch conv)")):
        body.append(
            [
                label,
                f"{r[f'{name}_step_s'] * 1e3:.1f}",
                f"{r[f'{name}_argmax_agreement']:.5f}" if f"{name}_argmax_agreement" in r else "n/a",
                f"{r[f'{name}_max_abs_dq']:.1e}" if f"{name}_max_abs_dq" in r else "n/a",
            ]
        )
    return headers, body


# --------------------------------------------------------------------------- run


def add_arguments(p) -> None:
    p.add_argument("--threads", type=int, default=None, help="threads of the all-cores row (default: torch's)")
    p.add_argument("--no-smoothness", action="store_true", help="skip the smoothness-kernel table")


def check(args, p) -> None:
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")


def run(args, device, info) -> cli.Result:
    size = QUICK_SIZE if args.quick else SIZE
    if _pydensecrf_or_none() is None:
        print("pydensecrf is not installed: the boxloss side alone is timed (pip install pydensecrf2).")
    all_cores = args.threads or torch.get_num_threads()
    threads = sorted({1, all_cores}) if device.type == "cpu" else [all_cores]
    memory = {}
    if not args.no_memory and device.type == "cpu":
        memory = measure_memory(size, args.seed, threads)
    rows = [time_sides(size, device, t, args.repeats, args.warmup, args.max_seconds, args.seed) for t in threads]
    tables = [
        cli.Table(
            f"DenseCRF inference, {CHANNELS} classes, {ITERATIONS} iterations, bilateral {BILATERAL} "
            f"(weight, sigma_xy, sigma_rgb), gaussian {GAUSSIAN} (weight, sigma_xy), float32 unaries, uint8 image; "
            "seconds per image, lattice builds included",
            *render_sides(rows, memory),
        )
    ]
    smoothness = None
    if not args.no_smoothness and device.type == "cpu":
        accuracy_size = QUICK_SMOOTHNESS_ACCURACY_SIZE if args.quick else SMOOTHNESS_ACCURACY_SIZE
        smoothness = smoothness_kernel(
            size, device, args.repeats, args.warmup, args.max_seconds, args.seed, accuracy_size
        )
        tables.append(
            cli.Table(
                f"The smoothness kernel, gaussian {GAUSSIAN}: the 2-d lattice's normalised filter is "
                f"{smoothness['normalised_filter_error']:.2%} (relative L2) from the exact Gaussian's "
                f"({accuracy_size}x{accuracy_size})",
                *render_smoothness(smoothness),
            )
        )

    lines, checks = [], {}
    one_core = [r for r in rows if r["threads"] == 1 and "speedup_of_medians" in r]
    if one_core:
        r = one_core[0]
        checks["one_core_speedup_met"] = r["speedup_of_medians"] >= ONE_CORE_TARGET
        lines.append(
            f"at least {ONE_CORE_TARGET:g}x faster than pydensecrf on one core: "
            f"{'yes' if checks['one_core_speedup_met'] else 'NO'} ({r['speedup_of_medians']:.1f}x of the medians, "
            f"{r['paired_speedup']['median']:.1f}x per round)"
        )
        checks["argmax_agreement_met"] = r["agreement"]["argmax"] >= ARGMAX_TARGET
        lines.append(
            f"argmax agreement with pydensecrf >= {ARGMAX_TARGET:.0%}: "
            f"{'yes' if checks['argmax_agreement_met'] else 'NO'} ({r['agreement']['argmax']:.3%})"
        )
    if args.quick:
        lines.append(f"(--quick size: the checks are set for {SIZE} x {SIZE})")
    if any((r.get("other_cpu_use") or 0.0) > 0.15 for r in rows):
        lines.append(
            "WARNING: other processes used the CPUs during some measurements (column 'other CPU use'); "
            "their timings are unreliable."
        )
    payload = {
        "rows": rows,
        "memory": {str(t): m for t, m in memory.items()},
        "smoothness": smoothness,
        "checks": checks,
        "constants": {
            "size": size,
            "channels": CHANNELS,
            "iterations": ITERATIONS,
            "bilateral": list(BILATERAL),
            "gaussian": list(GAUSSIAN),
            "dtype": "float32",
        },
    }
    return cli.Result(tables, lines, payload)


BENCHMARK = cli.Benchmark(
    name="crf_inference",
    doc=__doc__,
    run=run,
    child=_memory_child,
    add_arguments=add_arguments,
    check=check,
    defaults={"repeats": (9, 3), "warmup": (1, 1), "max_seconds": (120.0, 5.0)},
)


def main(argv=None) -> int:
    return cli.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
