"""Benchmark of the permutohedral lattice (boxloss.bilateral_filter) and the DenseCRF
loss (boxloss.dense_crf_loss): accuracy against the exact Gaussian, time per
megapixel of a lattice build plus a 21-channel filter on one core, one pass over
all channels against 21 single-channel passes of the same lattice, and
forward + backward of the loss at the sizes of Tang et al.'s training (B=12,
C=21, 513 x 513, scale 0.5 and 1.0).

Run from the repository root:

    python -m benchmarks.dense_crf            # default sizes, CPU
    python -m benchmarks.dense_crf --quick    # smoke test
    python -m benchmarks.dense_crf --device cuda
    python -m benchmarks.dense_crf --worst-case-memory   # peak memory of one 2048 x 2048 image only

Images are natural-looking: the package's synthetic benchmark (textured objects
and backgrounds, blur, noise; colours in [0, 255]); the loss gets smooth logits
that follow the objects, through a softmax.  Timings are medians after a
warm-up (the one-pass filter and the 21 single passes alternate call by call,
3 x --repeats rounds, so that both see the same load); CPU peak memory comes
from fresh child processes (as in
benchmarks/sparse_crf.py).  Checked at the end: build + 21-channel filter under
0.3 s per megapixel on one core, and one pass over 21 channels at least 5x
faster than 21 single-channel passes.

``--worst-case-memory`` measures, instead of the tables above, the peak extra
memory of the loss (forward, and forward + backward) on one 3-class 2048 x 2048
float32 image of uniform noise (the most lattice points per pixel), a natural
image and colour ramps, each in a fresh child process, with the lattice's
points per pixel (docs/dense_crf.md relates them).

Accuracy: the brute-force Gaussian is O(N^2), so it is measured on 64 x 64
images, sigma_xy scaled to the image as at 513 x 513 (80 * 64 / 513 = 10),
plus smaller and larger sigmas.  Columns: the raw filter's relative L2 error,
the best single scale of the lattice's output against the exact sum and the
error left after it, the error of the normalised filter filter(v) / filter(1)
that CRF inference uses, the same raw error for Krähenbühl's original lattice
(pydensecrf, when installed), and the loss value and gradient (w.r.t. the
logits) against the brute-force loss.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import cli, common

MODULE = "benchmarks.dense_crf"
SIGMA_XY = 80.0
SIGMA_RGB = 15.0
CHANNELS = 21
FILTER_SIZE = 513
LOSS_CELLS = [(12, 21, 513, 513, 0.5), (12, 21, 513, 513, 1.0)]
QUICK_FILTER_SIZE = 129
QUICK_LOSS_CELLS = [(2, 21, 129, 129, 0.5)]
ACCURACY_SIZE = 64
ACCURACY_SIGMAS = [(10.0, 15.0), (5.0, 15.0), (30.0, 15.0), (10.0, 5.0), (10.0, 40.0)]
ACCURACY_SEEDS = (1, 3)
PER_MP_TARGET_S = 0.3
ONE_PASS_TARGET = 5.0


# --------------------------------------------------------------------------- inputs


@functools.lru_cache(maxsize=16)
def _sample(size: int, seed: int):
    from boxloss.data import SyntheticConfig, generate_sample

    s = generate_sample(SyntheticConfig(image_size=size), "train", seed)
    return s.image, s.mask


def make_inputs(B, C, H, W, device="cpu", dtype=torch.float32, seed=0):
    """(logits (B, C, H, W), image (B, 3, H, W) in [0, 255]); four distinct images, flipped and rolled to make B."""
    assert H == W, "square images"
    images, logits = [], []
    g = torch.Generator().manual_seed(seed)
    for b in range(B):
        image, mask = _sample(H, seed + b % 4)
        im = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32)
        labels = torch.from_numpy(mask.astype(np.int64))
        labels = torch.where(labels == 255, torch.zeros_like(labels), labels) % C
        lg = 4 * F.avg_pool2d(F.one_hot(labels, C).permute(2, 0, 1).float()[None], 7, 1, 3)[0]
        lg = lg + torch.randn(C, H, W, generator=g)
        if b // 4 % 2:
            im, lg = im.flip(2), lg.flip(2)
        if b // 8:
            im, lg = im.roll(H // 3, 1), lg.roll(H // 3, 1)
        images.append(im)
        logits.append(lg)
    return (
        torch.stack(logits).to(device=device, dtype=dtype).contiguous(),
        torch.stack(images).to(device=device, dtype=dtype).contiguous(),
    )


# --------------------------------------------------------------------------- accuracy


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def _original_filter(values, image, sigma_xy, sigma_rgb):
    """Krähenbühl's lattice through pydensecrf (boxloss.reference.bilateral.original_lattice_filter).

    None where pydensecrf is not installed; an installed build that does not run raises.
    """
    from boxloss._pydensecrf import PyDenseCRFUnavailable
    from boxloss.reference.bilateral import original_lattice_filter

    try:
        return original_lattice_filter(values, image, sigma_xy, sigma_rgb)
    except PyDenseCRFUnavailable as exc:
        if exc.installed:
            raise
        return None


def measure_accuracy(size: int, sigmas, seeds) -> list[dict]:
    import boxloss
    from boxloss.reference import dense_crf_loss_reference
    from boxloss.reference.bilateral import bilateral_filter_brute_force

    rows = []
    for sigma_xy, sigma_rgb in sigmas:
        cells = []
        for seed in seeds:
            logits, image = make_inputs(1, 4, size, size, dtype=torch.float64, seed=seed)
            values = torch.cat(
                [
                    torch.rand(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)),
                    torch.ones(1, 1, size, size, dtype=torch.float64),
                ],
                1,
            )
            lattice = boxloss.bilateral_filter(values, image, sigma_xy, sigma_rgb)
            exact = bilateral_filter_brute_force(values, image, sigma_xy, sigma_rgb)
            scale = float((lattice * exact).sum() / (exact * exact).sum())
            original = _original_filter(values[0] + 0.05, image[0], sigma_xy, sigma_rgb)
            exact_shifted = bilateral_filter_brute_force(values + 0.05, image, sigma_xy, sigma_rgb)[0]
            cell = {
                "raw": _relative(lattice, exact),
                "scale": scale,
                "after_scale": _relative(lattice / scale, exact),
                "normalised": _relative(lattice[:, :3] / lattice[:, 3:], exact[:, :3] / exact[:, 3:]),
                "original_raw": None if original is None else _relative(original, exact_shifted),
            }
            x = logits.clone().requires_grad_()
            ours = boxloss.dense_crf_loss(x.softmax(1), image, sigma_xy=sigma_xy, sigma_rgb=sigma_rgb)
            ours.backward()
            y = logits.clone().requires_grad_()
            truth = dense_crf_loss_reference(y.softmax(1), image, sigma_xy=sigma_xy, sigma_rgb=sigma_rgb)
            truth.backward()
            cell["loss"] = abs(ours.item() - truth.item()) / truth.item()
            cell["gradient"] = _relative(x.grad, y.grad)
            cell["cosine"] = float(F.cosine_similarity(x.grad.flatten(), y.grad.flatten(), dim=0))
            cells.append(cell)
        worst = {
            k: (max(c[k] for c in cells) if k != "cosine" else min(c[k] for c in cells))
            for k in ("raw", "after_scale", "normalised", "loss", "gradient", "cosine")
        }
        worst["scale"] = [round(c["scale"], 3) for c in cells]
        originals = [c["original_raw"] for c in cells if c["original_raw"] is not None]
        worst["original_raw"] = max(originals) if originals else None
        rows.append({"sigma_xy": sigma_xy, "sigma_rgb": sigma_rgb, "size": size, "images": len(seeds), **worst})
    return rows


def render_accuracy(rows):
    headers = [
        "sigma_xy",
        "sigma_rgb",
        "filter raw",
        "lattice scale",
        "after scale",
        "normalised",
        "original raw",
        "loss value",
        "loss grad",
        "grad cosine",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r["sigma_xy"],
                r["sigma_rgb"],
                f"{r['raw']:.3f}",
                "-".join(f"{s:.2f}" for s in r["scale"]),
                f"{r['after_scale']:.3f}",
                f"{r['normalised']:.4f}",
                "n/a" if r["original_raw"] is None else f"{r['original_raw']:.3f}",
                f"{r['loss']:.4f}",
                f"{r['gradient']:.3f}",
                f"{r['cosine']:.4f}",
            ]
        )
    return headers, body


# --------------------------------------------------------------------------- filter timing


def time_filter(size: int, device, repeats: int, warmup: int, max_seconds: float, threads: int) -> dict:
    import boxloss

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, image = make_inputs(1, 1, size, size, device=device)
        values = torch.rand(1, CHANNELS, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        single = [values[:, c : c + 1] for c in range(CHANNELS)]
        lattice = boxloss.PermutohedralLattice(image, SIGMA_XY * size / 513, SIGMA_RGB)
        kw = dict(device=device, repeats=repeats, warmup=warmup, max_seconds=max_seconds)
        monitor = common.OtherCpuUse().start()
        build = common.time_fn(lambda: boxloss.PermutohedralLattice(image, SIGMA_XY * size / 513, SIGMA_RGB), **kw)
        # The one pass and the 21 single passes alternate call by call, so
        # that both see the same load on a shared machine.
        nothing = lambda: None  # noqa: E731
        sides = common.time_interleaved(
            {
                "one": (lambda: lattice.filter(values), nothing),
                "single": (lambda: [lattice.filter(v) for v in single], nothing),
            },
            device=device,
            repeats=3 * repeats,
            warmup=warmup,
            max_seconds=max_seconds,
        )
        one_pass, passes = sides["one"], sides["single"]
        other = monitor.stop()
    finally:
        torch.set_num_threads(previous)
    megapixels = size * size / 1e6
    return {
        "size": size,
        "threads": threads,
        "sigma_xy": SIGMA_XY * size / 513,
        "sigma_rgb": SIGMA_RGB,
        "vertices": lattice.num_vertices[0],
        "build": build,
        "filter_21": one_pass,
        "single_passes_21": passes,
        "per_megapixel_s": (build["median_s"] + one_pass["median_s"]) / megapixels,
        "one_pass_speedup": passes["median_s"] / one_pass["median_s"],
        "other_cpu_use": other,
    }


def render_filter(rows):
    headers = [
        "image",
        "threads",
        "sigma_xy",
        "lattice points",
        "build ms",
        "21-ch filter ms",
        "21 x 1-ch ms",
        "one-pass speed-up",
        "build+21ch s/MP",
        "other CPU use",
    ]
    body = []
    for r in rows:
        body.append(
            [
                f"{r['size']}x{r['size']}",
                r["threads"],
                f"{r['sigma_xy']:.1f}",
                r["vertices"],
                f"{r['build']['median_s'] * 1e3:.1f}",
                f"{r['filter_21']['median_s'] * 1e3:.1f}",
                f"{r['single_passes_21']['median_s'] * 1e3:.1f}",
                f"{r['one_pass_speedup']:.1f}x",
                f"{r['per_megapixel_s']:.3f}",
                "n/a" if r["other_cpu_use"] is None else f"{r['other_cpu_use']:.0%}",
            ]
        )
    return headers, body


# --------------------------------------------------------------------------- loss timing


def make_step(cell, device, dtype=torch.float32, seed=0):
    import boxloss

    B, C, H, W, scale = cell
    logits, image = make_inputs(B, C, H, W, device=device, dtype=dtype, seed=seed)
    probs = logits.softmax(1).detach().requires_grad_()

    def step():
        boxloss.dense_crf_loss(probs, image, sigma_rgb=SIGMA_RGB, sigma_xy=SIGMA_XY, scale_factor=scale).backward()

    def clear():
        probs.grad = None

    return step, clear, probs


def worst_case_image(kind: str, size: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, size, size) colours in [0, 255]: "noise" (uniform, every pixel its own colour: the most lattice
    points), "smooth" (colour ramps: few lattice points) or "natural" (the synthetic benchmark's image)."""
    if kind == "noise":
        return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255
    if kind == "smooth":
        ramp = torch.linspace(0, 255, size)
        return torch.stack(
            [ramp[None, :].expand(size, size), ramp[:, None].expand(size, size), 255 - ramp[None, :].expand(size, size)]
        )[None].contiguous()
    image, _ = _sample(size, seed)
    return torch.from_numpy(image).permute(2, 0, 1)[None].to(torch.float32).contiguous()


def make_worst_case_step(kind: str, size: int, channels: int, backward: bool, seed: int = 0):
    """The worst-case memory measurement: one image, float32, softmax probabilities, default sigmas, scale 1."""
    import boxloss

    image = worst_case_image(kind, size, seed)
    logits = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed + 1))
    probs = logits.softmax(1).requires_grad_(backward)

    def step():
        loss = boxloss.dense_crf_loss(probs, image, sigma_rgb=SIGMA_RGB, sigma_xy=SIGMA_XY)
        if backward:
            loss.backward()

    def clear():
        probs.grad = None

    return step, clear, probs, image


def _memory_child(payload: dict) -> dict:
    torch.set_num_threads(int(payload["threads"]))
    if "worst_case" in payload:
        import boxloss

        case = payload["worst_case"]
        step, clear, probs, image = make_worst_case_step(
            case["image"], case["size"], case["channels"], case["backward"]
        )
        result = common.cpu_peak_extra_bytes(step, cleanup=clear)
        lattice = boxloss.PermutohedralLattice(image, SIGMA_XY, SIGMA_RGB)
        result["lattice_points"] = int(lattice.num_vertices[0])
        result["input_bytes"] = probs.numel() * probs.element_size() + image.numel() * image.element_size()
        return result
    step, clear, _ = make_step(tuple(payload["cell"]), "cpu", seed=payload["seed"])
    return common.cpu_peak_extra_bytes(step, cleanup=clear)


WORST_CASE_SIZE = 2048
WORST_CASE_CHANNELS = 3
QUICK_WORST_CASE_SIZE = 256


def measure_worst_case_memory(size: int, channels: int, threads: int) -> list[dict]:
    """Peak extra memory of dense_crf_loss (forward, and forward + backward) on noise, natural and smooth images of
    size x size, each in a fresh child process; with the lattice size, per pixel and per lattice point."""
    cases = [
        {"image": kind, "size": size, "channels": channels, "backward": backward}
        for kind in ("noise", "natural", "smooth")
        for backward in (False, True)
    ]
    results = common.run_children(MODULE, [{"worst_case": c, "threads": threads} for c in cases], workers=1)
    rows = []
    for case, result in zip(cases, results):
        row = dict(case)
        if result.get("ok"):
            row.update(
                peak_extra_bytes=result["peak_extra"],
                input_bytes=result["input_bytes"],
                lattice_points=result["lattice_points"],
            )
        else:
            row["error"] = result.get("reason")
        rows.append(row)
    return rows


def render_worst_case(rows):
    headers = ["image", "pass", "lattice points / pixel", "peak extra MiB", "x inputs", "bytes / pixel"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["image"], "fwd+bwd" if r["backward"] else "fwd", "-", r["error"], "-", "-"])
            continue
        pixels = r["size"] * r["size"]
        body.append(
            [
                r["image"],
                "fwd+bwd" if r["backward"] else "fwd",
                f"{r['lattice_points'] / pixels:.3f}",
                common.mib(r["peak_extra_bytes"], 1),
                f"{r['peak_extra_bytes'] / r['input_bytes']:.2f}",
                f"{r['peak_extra_bytes'] / pixels:.1f}",
            ]
        )
    return headers, body


def render_loss(rows):
    headers = [
        "B x C x H x W",
        "scale",
        "lattice size",
        "fwd+bwd ms med (min)",
        "ms / image",
        "MP/s (loss res.)",
        "peak extra MiB",
        "probs MiB",
        "other CPU use",
    ]
    body = []
    for r in rows:
        t = r["timing"]
        body.append(
            [
                r["size"],
                r["scale"],
                f"{r['loss_h']}x{r['loss_w']}",
                f"{t['median_s'] * 1e3:.1f} ({t['min_s'] * 1e3:.1f})",
                f"{t['median_s'] * 1e3 / r['B']:.1f}",
                f"{r['megapixels_per_s']:.2f}",
                common.mib(r["peak_extra_bytes"]),
                common.mib(r["probs_bytes"]),
                "n/a" if r["other_cpu_use"] is None else f"{r['other_cpu_use']:.0%}",
            ]
        )
    return headers, body


# --------------------------------------------------------------------------- run


def add_arguments(p) -> None:
    p.add_argument("--no-accuracy", action="store_true", help="skip the brute-force accuracy table")
    p.add_argument(
        "--worst-case-memory",
        action="store_true",
        help=f"instead of the tables above, measure the peak memory of the loss on one {WORST_CASE_SIZE} x "
        f"{WORST_CASE_SIZE} image (uniform noise, natural, smooth; forward and forward + backward; "
        f"{QUICK_WORST_CASE_SIZE} x {QUICK_WORST_CASE_SIZE} with --quick) in fresh processes",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the loss timings and the second filter row (default: torch's)",
    )


def check(args, p) -> None:
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    args.filter_size = QUICK_FILTER_SIZE if args.quick else FILTER_SIZE
    args.loss_cells = QUICK_LOSS_CELLS if args.quick else LOSS_CELLS


def run(args, device, info) -> cli.Result:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tables = []
    if args.worst_case_memory:
        size = QUICK_WORST_CASE_SIZE if args.quick else WORST_CASE_SIZE
        worst = measure_worst_case_memory(size, WORST_CASE_CHANNELS, torch.get_num_threads())
        tables.append(
            cli.Table(
                f"DenseCRF loss peak extra memory (CPU, fresh process), 1 x {WORST_CASE_CHANNELS} x {size} x {size} "
                f"float32, sigma_xy {SIGMA_XY}, sigma_rgb {SIGMA_RGB}, scale 1",
                *render_worst_case(worst),
            )
        )
        return cli.Result(tables, [], {"worst_case_memory": worst})
    accuracy = []
    if not args.no_accuracy:
        sigmas = ACCURACY_SIGMAS[:1] if args.quick else ACCURACY_SIGMAS
        seeds = ACCURACY_SEEDS[:1] if args.quick else ACCURACY_SEEDS
        size = 32 if args.quick else ACCURACY_SIZE
        accuracy = measure_accuracy(size, sigmas, seeds)
        tables.append(
            cli.Table(
                f"Lattice against the exact Gaussian (brute force), {size}x{size} natural images, worst of {len(seeds)} "
                "(relative L2 errors; loss value: relative error)",
                *render_accuracy(accuracy),
            )
        )

    threads = sorted({1, torch.get_num_threads()})
    filter_rows = [
        time_filter(args.filter_size, device, args.repeats, args.warmup, args.max_seconds, t)
        for t in (threads if device.type == "cpu" else [torch.get_num_threads()])
    ]
    tables.append(
        cli.Table(
            f"Lattice build and filter, {CHANNELS} channels, float32, sigma_xy {SIGMA_XY} x size/513, "
            f"sigma_rgb {SIGMA_RGB}",
            *render_filter(filter_rows),
        )
    )

    memory = {}
    if not args.no_memory and device.type == "cpu":
        payloads = [{"cell": list(c), "seed": args.seed, "threads": torch.get_num_threads()} for c in args.loss_cells]
        memory = dict(zip(args.loss_cells, common.run_children(MODULE, payloads, workers=1)))
    loss_rows = []
    for cell in args.loss_cells:
        B, C, H, W, scale = cell
        step, clear, probs = make_step(cell, device, seed=args.seed)
        monitor = common.OtherCpuUse().start()
        timing = common.time_fn(
            step, device=device, repeats=args.repeats, warmup=args.warmup, setup=clear, max_seconds=args.max_seconds
        )
        other = monitor.stop()
        clear()
        if device.type == "cuda" and not args.no_memory:
            mem = common.cuda_peak_extra_bytes(step, device, cleanup=clear)
            clear()
        else:
            mem = memory.get(cell)
        lh, lw = int(H * scale), int(W * scale)
        loss_rows.append(
            {
                "size": common.size_label(B, C, H, W),
                "B": B,
                "C": C,
                "H": H,
                "W": W,
                "scale": scale,
                "loss_h": lh,
                "loss_w": lw,
                "timing": timing,
                "threads": torch.get_num_threads(),
                "megapixels_per_s": B * lh * lw / 1e6 / timing["median_s"],
                "peak_extra_bytes": mem.get("peak_extra") if mem and mem.get("ok") else None,
                "probs_bytes": probs.numel() * probs.element_size(),
                "other_cpu_use": other,
            }
        )
        del step, probs
    tables.append(
        cli.Table(
            f"DenseCRF loss forward + backward (float32, softmax probabilities, sigma_rgb {SIGMA_RGB}, "
            f"sigma_xy {SIGMA_XY} at full resolution, {torch.get_num_threads()} threads)",
            *render_loss(loss_rows),
        )
    )

    one_core = [r for r in filter_rows if r["threads"] == 1]
    lines, checks = [], {}
    if one_core:
        r = one_core[0]
        checks["per_megapixel_met"] = r["per_megapixel_s"] < PER_MP_TARGET_S
        lines.append(
            f"build + 21-channel filter < {PER_MP_TARGET_S} s per megapixel on one core: "
            f"{'yes' if checks['per_megapixel_met'] else 'NO'} ({r['per_megapixel_s']:.3f} s/MP)"
        )
    for r in filter_rows:
        met = r["one_pass_speedup"] >= ONE_PASS_TARGET
        checks[f"one_pass_met_{r['threads']}_threads"] = met
        lines.append(
            f"one pass over 21 channels >= {ONE_PASS_TARGET:g}x faster than 21 single-channel passes "
            f"({r['threads']} thread{'s' if r['threads'] > 1 else ''}): {'yes' if met else 'NO'} "
            f"({r['one_pass_speedup']:.1f}x)"
        )
    if args.quick:
        lines.append("(--quick sizes: the checks are set for 513 x 513)")
    noisy = [r for r in filter_rows + loss_rows if (r.get("other_cpu_use") or 0.0) > 0.15]
    if noisy:
        lines.append(
            "WARNING: other processes used the CPUs during some measurements (column 'other CPU use'); "
            "their timings are unreliable."
        )
    payload = {
        "accuracy": accuracy,
        "filter": filter_rows,
        "loss": loss_rows,
        "checks": checks,
        "constants": {
            "sigma_xy": SIGMA_XY,
            "sigma_rgb": SIGMA_RGB,
            "channels": CHANNELS,
            "filter_size": args.filter_size,
            "loss_cells": [list(c) for c in args.loss_cells],
        },
    }
    return cli.Result(tables, lines, payload)


BENCHMARK = cli.Benchmark(
    name="dense_crf",
    doc=__doc__,
    run=run,
    child=_memory_child,
    add_arguments=add_arguments,
    check=check,
    defaults={"repeats": (7, 3), "warmup": (2, 1), "max_seconds": (20.0, 2.0)},
)


def main(argv=None) -> int:
    return cli.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
