"""Benchmark of the box priors on the fused row/column-max op (boxloss.tight_box_loss,
boxloss.mil_box_loss) against the loop-over-boxes references of
boxloss.reference.box_priors.

Times forward + backward (median and min), measures the peak extra memory of
one forward + backward in a fresh child process per cell (as
benchmarks/sparse_crf.py does), and the fraction of the machine's copy
bandwidth the fused op reaches.  Run from the repository root:

    python -m benchmarks.box_priors            # default sizes, CPU
    python -m benchmarks.box_priors --quick    # smoke test
    python -m benchmarks.box_priors --device cuda

Checked at the end: the fused losses are >= 10x faster than the reference at
64 boxes per image, and no slower at 1 box per image.

Bytes moved by the fused forward + backward, the bandwidth floor's numerator:
tight: the boxes' pixels read once + the zeroed gradient written once
(B*C*H*W); mil: every plane read once (the negative bags need whole-image
rows and columns) + the gradient written once.
"""

from __future__ import annotations

import sys

import torch

from benchmarks import cli, common

MODULE = "benchmarks.box_priors"
# (B, C, H, W, boxes per image)
DEFAULT_CELLS = [(8, 21, 128, 128, 1), (8, 21, 128, 128, 8), (8, 21, 128, 128, 64), (2, 21, 512, 512, 16)]
QUICK_CELLS = [(2, 4, 64, 64, 1), (2, 4, 64, 64, 8)]
LOSSES = ("tight", "mil")
SIDES = ("fused", "reference")
SPEEDUP_AT_64 = 10.0
REFERENCE_BANDWIDTH_GBPS = 40.0


def make_inputs(B, C, H, W, n, device="cpu", dtype=torch.float32, seed=0):
    """Softmax probabilities (leaf, requires_grad) and n random boxes per image
    (side 10-60 % of the image, labels 1..C-1)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(B, C, H, W, generator=g).mul(4).softmax(1).to(device=device, dtype=dtype).requires_grad_()
    K = B * n
    wh = (0.1 + 0.5 * torch.rand(K, 2, generator=g)) * torch.tensor([W, H])
    xy = torch.rand(K, 2, generator=g) * (torch.tensor([W, H]) - wh)
    boxes = torch.cat([xy, xy + wh], 1).to(device=device, dtype=dtype)
    batch = torch.arange(B).repeat_interleave(n).to(device)
    labels = torch.randint(1, C, (K,), generator=g).to(device)
    return probs, boxes, batch, labels


def loss_fn(loss: str, side: str):
    import boxloss
    from boxloss.reference import box_priors as ref

    table = {
        ("tight", "fused"): boxloss.tight_box_loss,
        ("tight", "reference"): ref.tight_box_loss_reference,
        ("mil", "fused"): boxloss.mil_box_loss,
        ("mil", "reference"): ref.mil_box_loss_reference,
    }
    return table[(loss, side)]


def make_step(loss, side, probs, boxes, batch, labels):
    f = loss_fn(loss, side)

    def step():
        f(probs, boxes, batch, labels).backward()

    def clear_grad():
        probs.grad = None

    return step, clear_grad


def moved_bytes(loss, probs, boxes, batch, labels) -> int:
    B, C, H, W = probs.shape
    elem = probs.element_size()
    if loss == "mil":
        return 2 * probs.numel() * elem
    import boxloss

    r = boxloss.box_row_col_max(probs.detach(), boxes, batch, labels, layout="dense").ranges
    pixels = int(((r[:, 1] - r[:, 0]) * (r[:, 3] - r[:, 2])).sum())
    return pixels * elem + probs.numel() * elem


def _memory_child(payload: dict) -> dict:
    torch.set_num_threads(int(payload["threads"]))
    probs, boxes, batch, labels = make_inputs(*payload["cell"], seed=payload["seed"])
    step, clear = make_step(payload["loss"], payload["side"], probs, boxes, batch, labels)
    return common.cpu_peak_extra_bytes(step, cleanup=clear)


def run(args, device, info) -> cli.Result:
    cells = QUICK_CELLS if args.quick else DEFAULT_CELLS
    bw = common.copy_bandwidth(device, mib=32 if args.quick else 256)
    lines = [
        f"copy bandwidth ({device.type}): {bw['gbps']:.1f} GB/s measured; nominal figure "
        f"{REFERENCE_BANDWIDTH_GBPS:.0f} GB/s"
    ]

    memory = {}
    if not args.no_memory and device.type == "cpu":
        keys, payloads = [], []
        for cell in cells:
            for loss in LOSSES:
                for side in SIDES:
                    keys.append((cell, loss, side))
                    payloads.append(
                        {
                            "cell": list(cell),
                            "loss": loss,
                            "side": side,
                            "seed": args.seed,
                            "threads": torch.get_num_threads(),
                        }
                    )
        memory = dict(zip(keys, common.run_children(MODULE, payloads)))

    rows = []
    for cell in cells:
        B, C, H, W, n = cell
        probs, boxes, batch, labels = make_inputs(B, C, H, W, n, device, seed=args.seed)
        for loss in LOSSES:
            row = {
                "size": f"{B}x{C}x{H}x{W}",
                "boxes_per_image": n,
                "loss": loss,
                "device": str(device),
                "probs_bytes": probs.numel() * probs.element_size(),
                "bytes_moved": moved_bytes(loss, probs, boxes, batch, labels),
            }
            for side in SIDES:
                step, clear = make_step(loss, side, probs, boxes, batch, labels)
                timing = common.time_fn(
                    step,
                    device=device,
                    repeats=args.repeats,
                    warmup=args.warmup,
                    setup=clear,
                    max_seconds=args.max_seconds,
                )
                clear()
                if device.type == "cuda" and not args.no_memory:
                    mem = common.cuda_peak_extra_bytes(step, device, cleanup=clear)
                    clear()
                else:
                    mem = memory.get((cell, loss, side))
                row[side] = {
                    "timing": timing,
                    "peak_extra_bytes": mem.get("peak_extra") if mem and mem.get("ok") else None,
                }
            row["speedup"] = row["reference"]["timing"]["median_s"] / row["fused"]["timing"]["median_s"]
            row["bandwidth_fraction"] = row["bytes_moved"] / bw["bytes_per_s"] / row["fused"]["timing"]["median_s"]
            rows.append(row)
        del probs, boxes

    headers = [
        "loss",
        "size (BxCxHxW)",
        "boxes/img",
        "fused ms med (min)",
        "ref ms med (min)",
        "speed-up",
        "fused peak MiB",
        "ref peak MiB",
        "probs MiB",
        "BW frac",
    ]
    body = []
    for r in rows:
        ft, rt = r["fused"]["timing"], r["reference"]["timing"]
        body.append(
            [
                r["loss"],
                r["size"],
                r["boxes_per_image"],
                f"{ft['median_s'] * 1e3:.2f} ({ft['min_s'] * 1e3:.2f})",
                f"{rt['median_s'] * 1e3:.2f} ({rt['min_s'] * 1e3:.2f})",
                f"{r['speedup']:.1f}x",
                common.mib(r["fused"]["peak_extra_bytes"]),
                common.mib(r["reference"]["peak_extra_bytes"]),
                common.mib(r["probs_bytes"]),
                f"{r['bandwidth_fraction']:.2f}",
            ]
        )
    checks = {}
    at64 = [r["speedup"] for r in rows if r["boxes_per_image"] == 64]
    at1 = [r["speedup"] for r in rows if r["boxes_per_image"] == 1]
    if at64:
        checks["speedup_at_64_met"] = min(at64) >= SPEEDUP_AT_64
        lines.append(
            f">= {SPEEDUP_AT_64:g}x at 64 boxes per image: {'yes' if checks['speedup_at_64_met'] else 'NO'}"
            f" (min {min(at64):.1f}x)"
        )
    if at1:
        checks["no_slower_at_1_met"] = min(at1) >= 1.0
        lines.append(
            f"no slower at 1 box per image: {'yes' if checks['no_slower_at_1_met'] else 'NO'} (min {min(at1):.1f}x)"
        )
    if args.quick:
        lines.append("(--quick sizes: the checks are set for the default sizes)")
    title = (
        "tight_box_loss and mil_box_loss forward + backward, float32, softmax probabilities, random boxes "
        "10-60 % of the image"
    )
    payload = {"copy_bandwidth": bw, "cells": [list(c) for c in cells], "rows": rows, "checks": checks}
    return cli.Result([cli.Table(title, headers, body)], lines, payload)


BENCHMARK = cli.Benchmark(
    name="box_priors",
    doc=__doc__,
    run=run,
    child=_memory_child,
    defaults={"repeats": (15, 3), "warmup": (2, 1), "max_seconds": (15.0, 2.0)},
)


def main(argv=None) -> int:
    return cli.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
