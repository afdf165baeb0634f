"""Benchmark of boxloss.uncertainty_ce_loss (fused, noise drawn in the kernel)
against the materialising reference
(boxloss.reference.uncertainty.uncertainty_ce_loss_reference with
noise="torch": T x B x C x H x W samples from torch.randn, kept for backward,
the way public PyTorch code does it).

Times forward + backward (median and min; the two sides alternate call by
call, so that both see the same load on a shared machine), and measures the peak extra memory
of one forward + backward in a fresh child process per cell (as
benchmarks/sparse_crf.py does), at T = 20 and, for the first size, along
T = 1, 5, 20, 50 (the memory curve).  Every pixel carries the uncertainty term
(no box mask: the worst case), with bootstrapping and the default routing.
Run from the repository root:

    python -m benchmarks.uncertainty            # default sizes, CPU
    python -m benchmarks.uncertainty --quick    # smoke test
    python -m benchmarks.uncertainty --device cuda

Checked at the end: the fused loss is >= 5x faster than the reference at each
size, its peak extra memory does not grow with T, and it is >= 10x below the
reference's at T = 20.
"""

from __future__ import annotations

import sys

import torch

from benchmarks import cli, common

MODULE = "benchmarks.uncertainty"
DEFAULT_SIZES = "8x21x128x128,4x3x512x1024"
QUICK_SIZES = "2x4x32x32"
SAMPLES = 20
T_CURVE = (1, 5, 20, 50)
QUICK_T_CURVE = (1, 5)
SIDES = ("fused", "reference")
SPEEDUP_TARGET = 5.0
MEMORY_RATIO_TARGET = 10.0
FLAT_TOLERANCE = 0.05  # fused peak over the T curve: (max - min) / max at most this (page-level noise)


def make_inputs(B, C, H, W, device="cpu", dtype=torch.float32, seed=0):
    """mu ~ N(0, 4), log_var ~ N(-1, 1) (leaves with requires_grad) and uniform targets."""
    g = torch.Generator().manual_seed(seed)
    mu = (2 * torch.randn(B, C, H, W, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    log_var = (torch.randn(B, C, H, W, generator=g) - 1).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, C, (B, H, W), generator=g).to(device)
    return mu, log_var, target


def make_step(side, mu, log_var, target, samples, seed=0):
    """(step, clear_grad): one forward + backward at T = samples, and the untimed reset."""
    if side == "fused":
        import boxloss

        def loss():
            return boxloss.uncertainty_ce_loss(mu, log_var, target, samples=samples, seed=seed)
    else:
        from boxloss.reference.uncertainty import uncertainty_ce_loss_reference

        generator = torch.Generator(device=mu.device).manual_seed(seed)

        def loss():
            return uncertainty_ce_loss_reference(
                mu, log_var, target, samples=samples, noise="torch", generator=generator
            )

    def step():
        loss().backward()

    def clear_grad():
        mu.grad = None
        log_var.grad = None

    return step, clear_grad


def _memory_child(payload: dict) -> dict:
    torch.set_num_threads(int(payload["threads"]))
    mu, log_var, target = make_inputs(*payload["size"], seed=payload["seed"])
    step, clear = make_step(payload["side"], mu, log_var, target, payload["samples"], payload["seed"])
    return common.cpu_peak_extra_bytes(step, cleanup=clear)


def add_arguments(p) -> None:
    p.add_argument("--sizes", default=None, help=f"comma-separated BxCxS or BxCxHxW (default {DEFAULT_SIZES})")
    p.add_argument("--samples", type=int, default=SAMPLES, help="T of the timed rows (default 20)")


def check(args, p) -> None:
    args.sizes = common.parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    args.t_curve = QUICK_T_CURVE if args.quick else T_CURVE
    if args.samples < 1:
        p.error("--samples must be >= 1")


def measure_cpu_memory(cells, seed):
    """{(side, size, T): child result}, one fresh process at a time (the
    reference's children need gigabytes; side by side they would compete)."""
    keys, payloads = [], []
    for size, samples in cells:
        for side in SIDES:
            keys.append((side, size, samples))
            payloads.append(
                {"side": side, "size": list(size), "samples": samples, "seed": seed, "threads": torch.get_num_threads()}
            )
    return dict(zip(keys, common.run_children(MODULE, payloads, workers=1)))


def _peak(mem):
    return int(mem["peak_extra"]) if mem and mem.get("ok") else None


def run(args, device, info) -> cli.Result:
    lines = [
        f"settings: float32, T = {args.samples} (memory curve T = {', '.join(map(str, args.t_curve))}), every "
        f"pixel uncertain, bootstrapping with routed gradients, repeats {args.repeats} (fused and reference "
        f"alternating, capped at {args.max_seconds:g} s per row), warm-up {args.warmup}"
    ]
    cells = [(size, args.samples) for size in args.sizes]
    curve_size = args.sizes[0]
    cells += [(curve_size, t) for t in args.t_curve if (curve_size, t) not in cells]
    memory = {}
    if not args.no_memory and device.type == "cpu":
        memory = measure_cpu_memory(cells, args.seed)

    rows = []
    for size in args.sizes:
        B, C, H, W = size
        mu, log_var, target = make_inputs(B, C, H, W, device, seed=args.seed)
        row = {
            "size": common.size_label(*size),
            "samples": args.samples,
            "device": str(device),
            "mu_bytes": mu.numel() * mu.element_size(),
        }
        monitor = common.OtherCpuUse().start()
        steps = {side: make_step(side, mu, log_var, target, args.samples, args.seed) for side in SIDES}
        timings = common.time_interleaved(
            steps, device=device, repeats=args.repeats, warmup=args.warmup, max_seconds=args.max_seconds
        )
        for side in SIDES:
            step, clear = steps[side]
            timing = timings[side]
            if device.type == "cuda" and not args.no_memory:
                mem = common.cuda_peak_extra_bytes(step, device, cleanup=clear)
                clear()
            else:
                mem = memory.get((side, size, args.samples))
            row[side] = {
                "timing": timing,
                "peak_extra_bytes": _peak(mem),
                "memory_note": None if _peak(mem) is not None else (mem or {}).get("reason", "not measured"),
            }
        row["other_cpu_use_during_timing"] = monitor.stop()
        row["speedup"] = row["reference"]["timing"]["median_s"] / row["fused"]["timing"]["median_s"]
        fp, rp = row["fused"]["peak_extra_bytes"], row["reference"]["peak_extra_bytes"]
        row["memory_ratio"] = None if not fp or rp is None else rp / fp
        rows.append(row)
        del mu, log_var, target

    curve = []
    for t in args.t_curve:
        point = {"samples": t}
        for side in SIDES:
            if device.type == "cuda" and not args.no_memory:
                mu, log_var, target = make_inputs(*curve_size, device, seed=args.seed)
                step, clear = make_step(side, mu, log_var, target, t, args.seed)
                point[side] = _peak(common.cuda_peak_extra_bytes(step, device, cleanup=clear))
                del mu, log_var, target
            else:
                point[side] = _peak(memory.get((side, curve_size, t)))
        curve.append(point)

    headers = [
        "size (BxCxHxW)",
        "T",
        "fused ms med (min)",
        "ref ms med (min)",
        "speed-up",
        "fused peak MiB",
        "ref peak MiB",
        "ref/fused mem",
        "mu MiB",
        "other CPU use",
    ]
    body = []
    for r in rows:
        ft, rt = r["fused"]["timing"], r["reference"]["timing"]
        body.append(
            [
                r["size"],
                r["samples"],
                f"{ft['median_s'] * 1e3:.1f} ({ft['min_s'] * 1e3:.1f})",
                f"{rt['median_s'] * 1e3:.1f} ({rt['min_s'] * 1e3:.1f})",
                f"{r['speedup']:.1f}x",
                common.mib(r["fused"]["peak_extra_bytes"], 1),
                common.mib(r["reference"]["peak_extra_bytes"], 1),
                "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.0f}x",
                common.mib(r["mu_bytes"], 1),
                "n/a" if r["other_cpu_use_during_timing"] is None else f"{r['other_cpu_use_during_timing']:.0%}",
            ]
        )
    tables = [
        cli.Table(f"uncertainty_ce_loss forward + backward, float32, T = {args.samples}", headers, body),
        cli.Table(
            f"Peak extra memory (MiB) of one forward + backward against T at {common.size_label(*curve_size)}",
            ["T", "fused", "reference"],
            [[p["samples"], common.mib(p["fused"], 1), common.mib(p["reference"], 1)] for p in curve],
        ),
    ]
    targets = {"speedup_target": SPEEDUP_TARGET, "memory_ratio_target": MEMORY_RATIO_TARGET}
    min_speedup = min(r["speedup"] for r in rows)
    targets["speedup_met"] = min_speedup >= SPEEDUP_TARGET
    lines.append(
        f"speed-up >= {SPEEDUP_TARGET:g}x at every size: {'yes' if targets['speedup_met'] else 'NO'} "
        f"(min {min_speedup:.1f}x)"
    )
    fused_curve = [p["fused"] for p in curve]
    if all(v is not None for v in fused_curve):
        spread = (max(fused_curve) - min(fused_curve)) / max(max(fused_curve), 1)
        targets["flat_in_T_met"] = spread <= FLAT_TOLERANCE
        targets["fused_curve_spread"] = spread
        lines.append(
            f"fused peak memory independent of T ({', '.join(map(str, args.t_curve))}): "
            f"{'yes' if targets['flat_in_T_met'] else 'NO'} (spread {spread:.1%} of the largest)"
        )
    else:
        targets["flat_in_T_met"] = None
        lines.append("fused peak memory independent of T: n/a (memory not measured)")
    ratios = [r["memory_ratio"] for r in rows]
    if all(x is not None for x in ratios):
        targets["memory_ratio_met"] = min(ratios) >= MEMORY_RATIO_TARGET
        lines.append(
            f"reference / fused peak memory >= {MEMORY_RATIO_TARGET:g}x at T = {args.samples}: "
            f"{'yes' if targets['memory_ratio_met'] else 'NO'} (min {min(ratios):.0f}x)"
        )
    else:
        targets["memory_ratio_met"] = None
        lines.append("reference / fused peak memory: n/a (memory not measured)")
    if args.quick or [tuple(s) for s in args.sizes] != common.parse_sizes(DEFAULT_SIZES):
        lines.append(f"(the checks are set for the default sizes {DEFAULT_SIZES}; these sizes are informative only)")
    payload = {
        "rows": rows,
        "t_curve": curve,
        "checks": targets,
        "memory_method": (
            "cuda max_memory_allocated"
            if device.type == "cuda"
            else "fresh child process, one at a time, MALLOC_MMAP_THRESHOLD_=65536, VmHWM after clear_refs=5 minus VmRSS "
            "before"
        ),
    }
    return cli.Result(tables, lines, payload)


BENCHMARK = cli.Benchmark(
    name="uncertainty",
    doc=__doc__,
    run=run,
    child=_memory_child,
    add_arguments=add_arguments,
    check=check,
    defaults={"repeats": (10, 3), "warmup": (1, 1), "max_seconds": (40.0, 4.0)},
)


def main(argv=None) -> int:
    return cli.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
