"""Benchmark of boxloss.sparse_crf_loss (fused) against the pure-PyTorch
reference (boxloss.reference.pairwise.sparse_crf_loss_reference).

Times forward + backward, measures the peak extra memory of one forward +
backward, and the fraction of the machine's copy bandwidth the fused op
reaches.  Run from the repository root:

    python -m benchmarks.sparse_crf            # default sizes, CPU
    python -m benchmarks.sparse_crf --quick    # smoke test, a few seconds
    python -m benchmarks.sparse_crf --device cuda --json /tmp/crf.json

Checked at the end: the fused op is >= 5x faster than the reference at every
size, and its workspace (peak extra memory minus the gradient that backward
must return) is at most the size of ``probs``.

CPU peak memory comes from a fresh child process per (side, size,
neighbourhood), started with MALLOC_MMAP_THRESHOLD_=65536 so that large
buffers are returned to the kernel on free and VmRSS tracks live memory:
VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before.
"""

from __future__ import annotations

import sys

import torch

from benchmarks import cli, common

MODULE = "benchmarks.sparse_crf"
DEFAULT_SIZES = "8x21x128,16x2x256,2x21x512"
QUICK_SIZES = "2x4x128"
REFERENCE_BANDWIDTH_GBPS = 40.0  # a nominal CPU copy bandwidth, printed beside the measured one
SPEEDUP_TARGET = 5.0
SIGMA = 0.15
KIND = "l1"
REDUCTION = "mean"
SIDES = ("fused", "reference")
OTHER_CPU_USE_LIMIT = 0.05  # warn when other processes used more of the CPUs during a row's timings


def make_inputs(B: int, C: int, H: int, W: int, device="cpu", dtype=torch.float32, seed: int = 0):
    """(probs, image) for the Sparse-CRF loss.

    probs: softmax over C of uniform random logits, shape (B, C, H, W), a leaf
    tensor with requires_grad; image: colours in [0, 1], shape (B, 3, H, W).
    Both are drawn on the CPU from a seeded generator, so they are the same on
    every device, then moved to ``device`` and cast to ``dtype``.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.rand(B, C, H, W, generator=gen, dtype=torch.float32)
    image = torch.rand(B, 3, H, W, generator=gen, dtype=torch.float32)
    probs = logits.softmax(1).to(device=device, dtype=dtype).detach().requires_grad_()
    image = image.to(device=device, dtype=dtype)
    return probs, image


def loss_fn(side: str):
    if side == "fused":
        import boxloss

        return boxloss.sparse_crf_loss
    if side == "reference":
        from boxloss.reference.pairwise import sparse_crf_loss_reference

        return sparse_crf_loss_reference
    raise ValueError(f"unknown side {side!r}")


def make_step(side: str, probs: torch.Tensor, image: torch.Tensor, neighbourhood: int):
    """(step, clear_grad): one forward + backward, and the untimed reset."""
    f = loss_fn(side)

    def step():
        loss = f(probs, image, sigma=SIGMA, neighbourhood=neighbourhood, kind=KIND, reduction=REDUCTION)
        loss.backward()

    def clear_grad():
        probs.grad = None

    return step, clear_grad


# --------------------------------------------------------------------------- memory


def _memory_child(payload: dict) -> dict:
    """In a fresh process: peak extra RSS of one fwd + bwd."""
    torch.set_num_threads(int(payload["threads"]))
    dtype = common.DTYPES[payload["dtype"]]
    probs, image = make_inputs(payload["B"], payload["C"], payload["H"], payload["W"], "cpu", dtype, payload["seed"])
    step, clear_grad = make_step(payload["side"], probs, image, payload["neighbourhood"])
    result = common.cpu_peak_extra_bytes(step, cleanup=clear_grad)
    if result.get("ok") and probs.grad is None:
        result = {"ok": False, "reason": "backward produced no gradient"}
    return result


def measure_cpu_memory(cells, dtype_name: str, seed: int) -> dict:
    """{(side, size, nb): child result} for every cell, in fresh processes."""
    keys, payloads = [], []
    for (B, C, H, W), nb in cells:
        for side in SIDES:
            keys.append((side, (B, C, H, W), nb))
            payloads.append(
                {
                    "side": side,
                    "B": B,
                    "C": C,
                    "H": H,
                    "W": W,
                    "neighbourhood": nb,
                    "dtype": dtype_name,
                    "seed": seed,
                    "threads": torch.get_num_threads(),
                }
            )
    results = common.run_children(MODULE, payloads)
    return dict(zip(keys, results))


def _memory_summary(result: dict | None, grad_bytes: int) -> dict:
    if not result or not result.get("ok"):
        return {
            "peak_extra_bytes": None,
            "workspace_bytes": None,
            "reason": (result or {}).get("reason", "not measured"),
        }
    peak = int(result["peak_extra"])
    out = {"peak_extra_bytes": peak, "workspace_bytes": peak - grad_bytes}
    out.update({k: v for k, v in result.items() if k not in ("ok", "peak_extra")})
    return out


# --------------------------------------------------------------------------- run


def add_arguments(p) -> None:
    p.add_argument("--sizes", default=None, help=f"comma-separated BxCxS or BxCxHxW (default {DEFAULT_SIZES})")
    p.add_argument("--neighbourhoods", default="4,8", help="comma-separated, from 4 and 8 (default 4,8)")
    p.add_argument("--dtype", default="float32", choices=sorted(common.DTYPES), help="default float32")
    p.add_argument(
        "--bandwidth-mib",
        type=int,
        default=None,
        help="size of each copy-bandwidth buffer in MiB (default 256; 32 with --quick)",
    )


def check(args, p) -> None:
    args.sizes = common.parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    args.neighbourhoods = common.parse_int_list(args.neighbourhoods)
    bad = [nb for nb in args.neighbourhoods if nb not in (4, 8)]
    if bad:
        p.error(f"neighbourhoods must be 4 or 8, got {bad}")
    args.bandwidth_mib = args.bandwidth_mib if args.bandwidth_mib is not None else (32 if args.quick else 256)


def run(args, device, info) -> cli.Result:
    dtype = common.DTYPES[args.dtype]
    monitor = common.OtherCpuUse().start()
    bw = common.copy_bandwidth(device, mib=args.bandwidth_mib)
    bw["other_cpu_use"] = monitor.stop()
    lines = [
        f"copy bandwidth ({device.type}, dst.copy_(src), 2 x {bw['buffer_mib']} MiB float32, read + write): "
        f"{bw['gbps']:.1f} GB/s measured (median of {bw['repeats']}); nominal figure "
        f"{REFERENCE_BANDWIDTH_GBPS:.0f} GB/s",
        f"settings: dtype {args.dtype}, sigma {SIGMA}, kind {KIND!r}, reduction {REDUCTION!r}, "
        f"repeats {args.repeats} (capped at {args.max_seconds:g} s per cell, min 3), warm-up {args.warmup}",
    ]

    cells = [(size, nb) for size in args.sizes for nb in args.neighbourhoods]

    # CPU memory first, in child processes, so they do not disturb the timings.
    cpu_memory = {}
    if not args.no_memory and device.type == "cpu":
        cpu_memory = measure_cpu_memory(cells, args.dtype, args.seed)

    rows = []
    for (B, C, H, W), nb in cells:
        probs, image = make_inputs(B, C, H, W, device, dtype, args.seed)
        elem = probs.element_size()
        probs_bytes = probs.numel() * elem
        image_bytes = image.numel() * elem
        moved = 2 * (probs_bytes + image_bytes) + probs_bytes
        row = {
            "size": common.size_label(B, C, H, W),
            "B": B,
            "C": C,
            "H": H,
            "W": W,
            "neighbourhood": nb,
            "dtype": args.dtype,
            "device": str(device),
            "probs_bytes": probs_bytes,
            "image_bytes": image_bytes,
            "bytes_moved": moved,
        }
        monitor = common.OtherCpuUse().start()
        for side in SIDES:
            step, clear_grad = make_step(side, probs, image, nb)
            timing = common.time_fn(
                step,
                device=device,
                repeats=args.repeats,
                warmup=args.warmup,
                setup=clear_grad,
                max_seconds=args.max_seconds,
            )
            clear_grad()
            if device.type == "cuda" and not args.no_memory:
                mem = common.cuda_peak_extra_bytes(step, device, cleanup=clear_grad)
                clear_grad()
            else:
                mem = cpu_memory.get((side, (B, C, H, W), nb))
            row[side] = {
                "timing": timing,
                "memory": _memory_summary(mem, probs_bytes)
                if not args.no_memory
                else {"peak_extra_bytes": None, "workspace_bytes": None, "reason": "--no-memory"},
            }
        row["other_cpu_use_during_timing"] = monitor.stop()
        fused_t = row["fused"]["timing"]["median_s"]
        ref_t = row["reference"]["timing"]["median_s"]
        row["speedup"] = ref_t / fused_t
        row["bandwidth_fraction"] = (moved / bw["bytes_per_s"]) / fused_t
        row["bandwidth_fraction_vs_reference_figure"] = (moved / (REFERENCE_BANDWIDTH_GBPS * 1e9)) / fused_t
        ws = row["fused"]["memory"]["workspace_bytes"]
        row["fused_workspace_over_probs"] = None if ws is None else ws / probs_bytes
        rows.append(row)
        del probs, image

    noisy = [r for r in rows if (r["other_cpu_use_during_timing"] or 0.0) > OTHER_CPU_USE_LIMIT]
    if noisy:
        lines.append(
            "WARNING: other processes used the CPUs while these rows were timed, so their timings are "
            "unreliable (run again on an idle machine): "
            + ", ".join(f"{r['size']} nb{r['neighbourhood']} ({r['other_cpu_use_during_timing']:.0%})" for r in noisy)
        )
    checks = evaluate_checks(rows)
    checks["default_sizes"] = args.sizes == common.parse_sizes(DEFAULT_SIZES)
    if not checks["default_sizes"]:
        lines.append(f"(the checks are set for the default sizes {DEFAULT_SIZES}; these sizes are informative only)")
    lines += checks["lines"]
    payload = {
        "copy_bandwidth": bw,
        "reference_bandwidth_gbps": REFERENCE_BANDWIDTH_GBPS,
        "method": {
            "memory": (
                "cuda max_memory_allocated"
                if device.type == "cuda"
                else "fresh child process, MALLOC_MMAP_THRESHOLD_=65536, VmHWM after clear_refs=5 minus VmRSS before"
            ),
            "bytes_moved_formula": "2*(probs_bytes + image_bytes) + probs_bytes",
            "sigma": SIGMA,
            "kind": KIND,
            "reduction": REDUCTION,
        },
        "rows": rows,
        "checks": checks,
    }
    title = (
        f"Sparse-CRF loss forward + backward, {args.dtype}, sigma {SIGMA}, {KIND}; workspace = peak extra "
        "memory minus the returned gradient"
    )
    return cli.Result([cli.Table(title, *render_table(rows))], lines, payload)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _mem_pair(mem: dict) -> str:
    return f"{common.mib(mem['peak_extra_bytes'])} / {common.mib(mem['workspace_bytes'])}"


def render_table(rows):
    headers = [
        "size (BxCxHxW)",
        "nb",
        "fused ms med (min)",
        "ref ms med (min)",
        "speed-up",
        "fused peak MiB incl.grad / ws",
        "ref peak MiB incl.grad / ws",
        "probs MiB",
        "fused ws/probs",
        "BW frac",
        "other CPU use",
    ]
    body = []
    for r in rows:
        ft, rt = r["fused"]["timing"], r["reference"]["timing"]
        ratio = r["fused_workspace_over_probs"]
        body.append(
            [
                r["size"],
                r["neighbourhood"],
                f"{_ms(ft['median_s'])} ({_ms(ft['min_s'])})",
                f"{_ms(rt['median_s'])} ({_ms(rt['min_s'])})",
                f"{r['speedup']:.1f}x",
                _mem_pair(r["fused"]["memory"]),
                _mem_pair(r["reference"]["memory"]),
                common.mib(r["probs_bytes"]),
                "n/a" if ratio is None else f"{ratio:.3f}",
                f"{r['bandwidth_fraction']:.2f}",
                "n/a" if r.get("other_cpu_use_during_timing") is None else f"{r['other_cpu_use_during_timing']:.0%}",
            ]
        )
    return headers, body


def evaluate_checks(rows) -> dict:
    min_speedup = min(r["speedup"] for r in rows)
    speed_met = min_speedup >= SPEEDUP_TARGET
    lines = [f"speed-up >= {SPEEDUP_TARGET:g}x at every size: {'yes' if speed_met else 'NO'} (min {min_speedup:.1f}x)"]
    ratios = [r["fused_workspace_over_probs"] for r in rows]
    if any(x is None for x in ratios):
        mem_met = None
        reasons = sorted(
            {r["fused"]["memory"].get("reason", "?") for r in rows if r["fused_workspace_over_probs"] is None}
        )
        lines.append(f"fused workspace <= size of probs at every size: n/a (memory not measured: {'; '.join(reasons)})")
    else:
        mem_met = all(x <= 1.0 for x in ratios)
        lines.append(
            f"fused workspace <= size of probs at every size: {'yes' if mem_met else 'NO'} "
            f"(max workspace/probs {max(ratios):.3f})"
        )
    return {
        "speedup_wanted": SPEEDUP_TARGET,
        "speedup_met": speed_met,
        "min_speedup": min_speedup,
        "workspace_met": mem_met,
        "max_workspace_over_probs": None if mem_met is None else max(ratios),
        "lines": lines,
    }


BENCHMARK = cli.Benchmark(
    name="sparse_crf",
    doc=__doc__,
    run=run,
    child=_memory_child,
    add_arguments=add_arguments,
    check=check,
    defaults={"repeats": (15, 3), "warmup": (3, 1), "max_seconds": (20.0, 2.0)},
)


def main(argv=None) -> int:
    return cli.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
