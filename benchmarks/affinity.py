"""Benchmark of Box2Seg's affinity loss (Eq. 9-10): the exact all-pairs form
through Gram matrices, the paper's class-balanced sampling, and the brute force
with its m x m matrices (boxloss.reference.box2seg.affinity_brute_force).

Forward + backward medians and the peak extra memory of one step, measured in
a fresh child process per cell.  The brute force is run only where its m x m
matrices fit (128x128: m = 16384, 1 GiB per float32 matrix); at 512x512 it would
need about 256 GiB per matrix and is reported as not run.

    python -m benchmarks.affinity [--quick] [--json PATH]
"""

from __future__ import annotations

import sys

import torch

from benchmarks import cli, common

MODULE = "benchmarks.affinity"
D, C = 32, 21
DEFAULT_SIZES = [128, 512]
QUICK_SIZES = [32]
BRUTE_FORCE_MAX_PIXELS = 128 * 128
SIDES = ("exact", "sampled", "brute-force")


def make_inputs(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, D, size, size, generator=g).requires_grad_()
    probs = torch.rand(1, C, size, size, generator=g).mul(4).softmax(1).detach().requires_grad_()
    return emb, probs


def make_step(side, emb, probs):
    import boxloss
    from boxloss.reference.box2seg import affinity_brute_force

    gen = torch.Generator().manual_seed(0)

    def step():
        if side == "brute-force":
            loss = affinity_brute_force(emb[0], probs[0])
        else:
            loss = boxloss.affinity_loss(emb, probs, mode=side, sample_fraction=0.1, generator=gen)
        loss.backward()

    def clear():
        emb.grad = None
        probs.grad = None

    return step, clear


def _child(payload: dict) -> dict:
    torch.set_num_threads(int(payload["threads"]))
    emb, probs = make_inputs(payload["size"], seed=payload["seed"])
    step, clear = make_step(payload["side"], emb, probs)
    return common.cpu_peak_extra_bytes(step, cleanup=clear)


def run(args, device, info) -> cli.Result:
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    cells = [(s, side) for s in sizes for side in SIDES if side != "brute-force" or s * s <= BRUTE_FORCE_MAX_PIXELS]
    mem = {}
    if not args.no_memory:
        payloads = [
            {"size": s, "side": side, "seed": args.seed, "threads": torch.get_num_threads()} for s, side in cells
        ]
        mem = dict(zip(cells, common.run_children(MODULE, payloads, workers=1)))
    rows = []
    for s in sizes:
        emb, probs = make_inputs(s, seed=args.seed)
        for side in SIDES:
            row = {"size": f"{s}x{s}", "pixels": s * s, "side": side}
            if (s, side) not in cells:
                row.update(median_s=None, peak_extra_bytes=None, note="not run: m x m matrices do not fit")
            else:
                step, clear = make_step(side, emb, probs)
                timing = common.time_fn(
                    step, repeats=args.repeats, warmup=args.warmup, setup=clear, max_seconds=args.max_seconds
                )
                m = mem.get((s, side), {})
                row.update(
                    median_s=timing["median_s"],
                    min_s=timing["min_s"],
                    peak_extra_bytes=m.get("peak_extra") if m.get("ok") else None,
                )
            rows.append(row)
    body = [
        [
            r["size"],
            r["side"],
            "n/a" if r["median_s"] is None else f"{r['median_s'] * 1e3:.1f}",
            common.mib(r["peak_extra_bytes"]),
            r.get("note", ""),
        ]
        for r in rows
    ]
    title = f"affinity_loss forward + backward, embeddings d = {D}, classes C = {C}, batch 1, float32"
    table = cli.Table(title, ["size", "mode", "fwd+bwd ms (median)", "peak extra MiB", "note"], body)
    return cli.Result([table], [], {"rows": rows, "d": D, "C": C})


BENCHMARK = cli.Benchmark(
    name="affinity",
    doc=__doc__,
    run=run,
    child=_child,
    devices=("cpu",),
    defaults={"repeats": (7, 3), "warmup": (1, 1), "max_seconds": (20.0, 20.0)},
)


def main(argv=None) -> int:
    return cli.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
