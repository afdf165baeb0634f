"""Benchmark of DenseCRF mean-field inference (boxloss.dense_crf_inference) beside
Krähenbühl's code through pydensecrf, in one run: 513 x 513, 21 classes, 10
iterations, BANA's settings (bilateral weight 4, sigma_xy 55, sigma_rgb 3;
Gaussian weight 3, sigma_xy 3), on one core and on all cores.  Run from the
repository root:

    python -m benchmarks.crf_inference            # the issue's size, CPU
    python -m benchmarks.crf_inference --quick    # smoke test (129 x 129)
    python -m benchmarks.crf_inference --device cuda

Inputs are natural-looking: the package's synthetic benchmark images (uint8
colours) and smooth logits that follow their objects (benchmarks.dense_crf's
make_inputs), unary = -log_softmax(logits).  Each call is the whole inference
from unaries and image to Q, lattice builds included, on both sides.  The two
sides alternate call by call (common.time_interleaved), so that both see the
same load on a shared machine; the table gives medians and the range, and the
median of the per-round ratios.  pydensecrf runs on one core whatever the
thread count.  The agreement columns compare the two sides' Q on the timed input.

The smoothness-kernel table measures the choice the op makes for that kernel:
its 2-d permutohedral lattice (the one pydensecrf uses) against a separable
Gaussian (PyTorch's grouped convolutions, radius 4 sigma), per mean-field step
of 21 channels, and how close each is to pydensecrf's marginals.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.dense_crf import make_inputs

MODULE = "benchmarks.crf_inference"
SIZE = 513
QUICK_SIZE = 129
CHANNELS = 21
ITERATIONS = 10
BILATERAL = (4.0, 55.0, 3.0)
GAUSSIAN = (3.0, 3.0)
ONE_CORE_TARGET = 3.0
SMOOTHNESS_ACCURACY_SIZE = 129


def make_problem(size: int, device, seed: int = 0):
    """(unary (1, C, H, W) float32, image (1, 3, H, W) uint8) on `device`."""
    logits, image = make_inputs(1, CHANNELS, size, size, seed=seed)
    unary = (-logits.log_softmax(1)).contiguous()
    return unary.to(device), image.round().clamp(0, 255).to(torch.uint8).to(device)


def _have_pydensecrf() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def _settings():
    return dict(bilateral=BILATERAL, gaussian=GAUSSIAN, iterations=ITERATIONS)


# --------------------------------------------------------------------------- the two sides


def time_sides(size: int, device, threads: int, repeats: int, warmup: int, max_seconds: float, seed: int) -> dict:
    import boxloss
    from boxloss.reference.crf_inference import pydensecrf_inference

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        unary, image = make_problem(size, device, seed)
        outputs = {}

        def ours():
            outputs["boxloss"] = boxloss.dense_crf_inference(unary, image, **_settings())

        def theirs():
            outputs["pydensecrf"] = pydensecrf_inference(unary.cpu(), image.cpu(), **_settings())

        nothing = lambda: None  # noqa: E731
        steps = {"boxloss": (ours, nothing)}
        if _have_pydensecrf():
            steps["pydensecrf"] = (theirs, nothing)
        monitor = common.OtherCpuUse().start()
        timing = common.time_interleaved(steps, device=device, repeats=repeats, warmup=warmup,
                                         max_seconds=max_seconds)
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


def render_sides(rows) -> str:
    headers = ["image", "threads", "boxloss s med (min-max)", "pydensecrf s med (min-max)", "speed-up (medians)",
               "speed-up per round med (min-max)", "argmax agree", "max |dQ|", "mean |dQ|", "other CPU use"]
    body = []
    for r in rows:
        t = r["timing"]

        def cell(side):
            if side not in t:
                return "n/a (not installed)"
            s = t[side]
            return f"{s['median_s']:.3f} ({s['min_s']:.3f}-{s['max_s']:.3f})"

        paired = r.get("paired_speedup")
        agreement = r.get("agreement")
        body.append([
            f"{r['size']}x{r['size']}", r["threads"], cell("boxloss"), cell("pydensecrf"),
            f"{r['speedup_of_medians']:.1f}x" if "speedup_of_medians" in r else "n/a",
            f"{paired['median']:.1f}x ({paired['min']:.1f}-{paired['max']:.1f})" if paired else "n/a",
            f"{agreement['argmax']:.5f}" if agreement else "n/a",
            f"{agreement['max_abs_dq']:.1e}" if agreement else "n/a",
            f"{agreement['mean_abs_dq']:.1e}" if agreement else "n/a",
            "n/a" if r["other_cpu_use"] is None else f"{r['other_cpu_use']:.0%}",
        ])
    return common.format_table(headers, body)


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


def smoothness_kernel(size: int, device, repeats: int, warmup: int, max_seconds: float, seed: int,
                      accuracy_size: int) -> dict:
    import boxloss
    from boxloss.reference.crf_inference import (
        dense_crf_inference_reference,
        gaussian_filter_separable,
        lattice_filter_nd,
        permutohedral_lattice_nd,
        pydensecrf_inference,
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
    normalised_error = float(((approx[:3] / approx[3:]) - (exact[:3] / exact[3:])).norm()
                             / (exact[:3] / exact[3:]).norm())
    result = {"size": size, "lattice_step_s": lattice_step, "separable_step_s": separable["median_s"],
              "accuracy_size": n, "normalised_filter_error": normalised_error}
    if _have_pydensecrf():
        u, im = make_problem(n, "cpu", seed)
        expected = pydensecrf_inference(u, im, **_settings())
        ours = boxloss.dense_crf_inference(u, im, **_settings())
        exact_q = dense_crf_inference_reference(u, im, kernels=("lattice", "exact"), **_settings())
        for name, q in (("lattice", ours), ("separable", exact_q)):
            result[f"{name}_argmax_agreement"] = float((q.argmax(1) == expected.argmax(1)).float().mean())
            result[f"{name}_max_abs_dq"] = float((q.float() - expected).abs().max())
    return result


def render_smoothness(r) -> str:
    headers = ["smoothness kernel", f"ms per step, {r['size']}x{r['size']}, 21 ch, 1 core",
               f"argmax agreement with pydensecrf ({r['accuracy_size']}x{r['accuracy_size']})", "max |dQ|"]
    body = []
    for name, label in (("lattice", "2-d lattice (the op)"), ("separable", "separable Gaussian (PyTorch conv)")):
        body.append([label, f"{r[f'{name}_step_s'] * 1e3:.1f}",
                     f"{r[f'{name}_argmax_agreement']:.5f}" if f"{name}_argmax_agreement" in r else "n/a",
                     f"{r[f'{name}_max_abs_dq']:.1e}" if f"{name}_max_abs_dq" in r else "n/a"])
    return common.format_table(headers, body)


# --------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    p.add_argument("--max-seconds", type=float, default=None, help="timed seconds per row (default 120)")
    p.add_argument("--threads", type=int, default=None, help="threads of the all-cores row (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--no-smoothness", action="store_true", help="skip the smoothness-kernel table")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    args.size = QUICK_SIZE if args.quick else SIZE
    args.repeats = args.repeats or (3 if args.quick else 9)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.max_seconds = args.max_seconds or (5.0 if args.quick else 120.0)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    if device is None:
        return 0
    t0 = time.perf_counter()
    info = common.machine_info(device)
    print(common.format_machine_info(info))
    if info.get("boxloss_extension_loaded") is not True:
        print("WARNING: the boxloss extension is not loaded; the numbers are the PyTorch reference's.")
    if not _have_pydensecrf():
        print("pydensecrf is not installed: the boxloss side alone is timed (pip install pydensecrf2).")
    busy = common.busy_machine_warning(common.cpu_busy_fraction(), "before the benchmark")
    if busy:
        print(busy)

    all_cores = args.threads or torch.get_num_threads()
    threads = sorted({1, all_cores}) if device.type == "cpu" else [all_cores]
    rows = [time_sides(args.size, device, t, args.repeats, args.warmup, args.max_seconds, args.seed) for t in threads]
    print(f"\nDenseCRF inference, {CHANNELS} classes, {ITERATIONS} iterations, bilateral {BILATERAL} "
          f"(weight, sigma_xy, sigma_rgb), gaussian {GAUSSIAN} (weight, sigma_xy), float32; seconds per image, "
          f"lattice builds included:")
    print(render_sides(rows))

    smoothness = None
    if not args.no_smoothness and device.type == "cpu":
        accuracy_size = 33 if args.quick else SMOOTHNESS_ACCURACY_SIZE
        smoothness = smoothness_kernel(args.size, device, args.repeats, args.warmup, args.max_seconds, args.seed,
                                       accuracy_size)
        print(f"\nThe smoothness kernel, gaussian {GAUSSIAN}: the 2-d lattice's normalised filter is "
              f"{smoothness['normalised_filter_error']:.2%} (relative L2) from the exact Gaussian's "
              f"({smoothness['accuracy_size']}x{smoothness['accuracy_size']}):")
        print(render_smoothness(smoothness))

    lines, targets = [], {}
    one_core = [r for r in rows if r["threads"] == 1 and "speedup_of_medians" in r]
    if one_core:
        r = one_core[0]
        met = r["speedup_of_medians"] >= ONE_CORE_TARGET
        targets["one_core_speedup_met"] = met
        lines.append(f"at least {ONE_CORE_TARGET:g}x faster than pydensecrf on one core: {'MET' if met else 'NOT MET'}"
                     f" ({r['speedup_of_medians']:.1f}x of the medians, {r['paired_speedup']['median']:.1f}x per "
                     "round)")
        targets["argmax_agreement_met"] = r["agreement"]["argmax"] >= 0.99
        lines.append(f"argmax agreement with pydensecrf >= 99 %: "
                     f"{'MET' if targets['argmax_agreement_met'] else 'NOT MET'} ({r['agreement']['argmax']:.3%})")
    if args.quick:
        lines.append(f"(--quick size: the target is set for {SIZE} x {SIZE})")
    if any((r.get("other_cpu_use") or 0.0) > 0.15 for r in rows):
        lines.append("WARNING: other processes used the CPUs during some measurements (column 'other CPU use'); "
                     "their timings are unreliable.")
    print()
    for line in lines:
        print(line)
    print(f"(total benchmark time {time.perf_counter() - t0:.1f} s)")
    path = args.json or common.RESULTS_DIR / f"crf_inference_{device.type}{'_quick' if args.quick else ''}.json"
    written = common.write_json(path, {
        "benchmark": "crf_inference", "machine": info, "rows": rows, "smoothness": smoothness,
        "settings": {"size": args.size, "channels": CHANNELS, "iterations": ITERATIONS, "bilateral": BILATERAL,
                     "gaussian": GAUSSIAN, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
                     "dtype": "float32"},
        "targets": targets, "lines": lines,
    })
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
