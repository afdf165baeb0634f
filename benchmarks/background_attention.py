"""Benchmark of BANA's background attention + background-aware pooling (Eq. 1-4):
forward + backward of the fused ops against the loop-over-images/cells/boxes
reference (boxloss.reference.background_attention).

Sizes:

* B = 20, D = 1024, 41 x 41 features (VGG-16 at stride 8 on 321 x 321 crops),
  1, 4 and 16 boxes per image;
* B = 20, D = 256, 128 x 128 features, 16 boxes per image.

Grid 4 x 4, pooling output 1 x 1 (Eq. 4), float32; loss = sum of the pooled
features and the queries.  Medians of the wall time (time_fn) and the peak extra
resident memory of one step in a fresh child process per cell.

    python -m benchmarks.background_attention [--quick] [--sides fused,reference] [--boxes 1,4,16] [--json PATH]

The fused side is ``BackgroundAwarePooling`` (one fused op for attention and pooling).
"""

from __future__ import annotations

import sys

import torch

from benchmarks import cli, common

MODULE = "benchmarks.background_attention"
# (B, D, h, w, boxes per image)
DEFAULT_CELLS = [(20, 1024, 41, 41, 1), (20, 1024, 41, 41, 4), (20, 1024, 41, 41, 16), (20, 256, 128, 128, 16)]
QUICK_CELLS = [(2, 32, 17, 17, 4)]
SIDES = ("fused", "reference")
GRID, OUTPUT = 4, 1


def make_inputs(cell, seed=0):
    from tests.bana_inputs import make_bana_boxes, make_features

    B, D, h, w, per_image = cell
    stride = 8
    f = make_features(B, D, h, w, dtype=torch.float32, seed=seed).requires_grad_()
    boxes, batch = make_bana_boxes(B, h * stride, w * stride, per_image, seed=seed, dtype=torch.float32)
    return f, boxes, batch, 1.0 / stride


def make_step(side, f, boxes, batch, scale):
    import boxloss
    from boxloss.reference.background_attention import (
        background_attention_reference,
        background_aware_pool_reference,
    )

    module = boxloss.BackgroundAwarePooling(grid_size=GRID, output_size=OUTPUT, spatial_scale=scale)

    def step():
        if side == "fused":
            pooled, att = module(f, boxes, batch)
            queries = att.queries
        else:
            attention, queries, _, _ = background_attention_reference(
                f, boxes, batch, grid_size=GRID, spatial_scale=scale
            )
            pooled = background_aware_pool_reference(
                f, attention, boxes, batch, output_size=OUTPUT, spatial_scale=scale
            )
        (pooled.sum() + queries.sum()).backward()

    def clear():
        f.grad = None

    return step, clear


def _child(payload: dict) -> dict:
    torch.set_num_threads(int(payload["threads"]))
    f, boxes, batch, scale = make_inputs(tuple(payload["cell"]), seed=payload["seed"])
    step, clear = make_step(payload["side"], f, boxes, batch, scale)
    return common.cpu_peak_extra_bytes(step, cleanup=clear)


def add_arguments(p) -> None:
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of: " + ", ".join(SIDES))
    p.add_argument("--boxes", default=None, help="comma-separated boxes per image to keep (default: all cells)")


def run(args, device, info) -> cli.Result:
    sides = tuple(s for s in SIDES if s in args.sides.split(","))
    cells = QUICK_CELLS if args.quick else DEFAULT_CELLS
    if args.boxes:
        cells = [c for c in cells if c[4] in common.parse_int_list(args.boxes)]
    threads = torch.get_num_threads()
    keys = [(c, side) for c in cells for side in sides]
    mem = {}
    if not args.no_memory:
        mem = dict(
            zip(
                keys,
                common.run_children(
                    MODULE,
                    [{"cell": list(c), "side": s, "seed": args.seed, "threads": threads} for c, s in keys],
                    workers=1,
                ),
            )
        )
    rows = []
    for c in cells:
        f, boxes, batch, scale = make_inputs(c, seed=args.seed)
        medians = {}
        for side in sides:
            step, clear = make_step(side, f, boxes, batch, scale)
            timing = common.time_fn(
                step, repeats=args.repeats, warmup=args.warmup, setup=clear, max_seconds=args.max_seconds
            )
            medians[side] = timing["median_s"]
            m = mem.get((c, side), {"reason": "--no-memory"})
            rows.append(
                {
                    "B": c[0],
                    "D": c[1],
                    "size": f"{c[2]}x{c[3]}",
                    "boxes_per_image": c[4],
                    "side": side,
                    "median_s": timing["median_s"],
                    "min_s": timing["min_s"],
                    "repeats": timing["repeats"],
                    "peak_extra_bytes": m.get("peak_extra") if m.get("ok") else None,
                    "memory_note": None if m.get("ok") else m.get("reason"),
                }
            )
        if len(sides) == 2:
            rows[-1]["speedup"] = None
            rows[-2]["speedup"] = medians["reference"] / medians["fused"]
    body = [
        [
            r["B"],
            r["D"],
            r["size"],
            r["boxes_per_image"],
            r["side"],
            f"{r['median_s'] * 1e3:.1f}",
            "" if r.get("speedup") is None else f"{r['speedup']:.1f}x",
            common.mib(r["peak_extra_bytes"]),
        ]
        for r in rows
    ]
    title = (
        f"Background attention (grid {GRID}x{GRID}) + background-aware pooling ({OUTPUT}x{OUTPUT}) forward + "
        f"backward, float32, {threads} threads"
    )
    table = cli.Table(
        title, ["B", "D", "h x w", "boxes/img", "side", "fwd+bwd ms (median)", "speed-up", "peak extra MiB"], body
    )
    return cli.Result([table], [], {"rows": rows})


BENCHMARK = cli.Benchmark(
    name="background_attention",
    doc=__doc__,
    run=run,
    child=_child,
    add_arguments=add_arguments,
    devices=("cpu",),
    defaults={"repeats": (5, 3), "warmup": (1, 1), "max_seconds": (30.0, 30.0)},
)


def main(argv=None) -> int:
    return cli.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
