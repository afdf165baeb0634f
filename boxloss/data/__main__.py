"""Command line for the data module: generate the synthetic benchmark, report statistics, export to VOC or COCO.

python -m boxloss.data generate                      # default benchmark (6 classes, 256x256, 2000/500/500)
python -m boxloss.data stats                         # its statistics beside VOC 2012's
python -m boxloss.data stats --voc VOCdevkit/VOC2012 --voc-split val
python -m boxloss.data stats --coco annotations/instances_val2017.json --images val2017
python -m boxloss.data export --format voc --out synthetic_voc
python -m boxloss.data export --format coco --out synthetic_coco --image-format png

export refuses a folder that holds files unless --overwrite is given, and writes atomically (into a hidden staging
folder beside --out, moved into place at the end). Bad input (a missing or broken file, an output path that is a
file) prints one message naming the file and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from boxloss.data._output import check_output_folder
from boxloss.data.coco import COCOBoxDataset, export_coco
from boxloss.data.stats import compute_statistics, format_report
from boxloss.data.synthetic import DEFAULT_SPLIT_SIZES, SPLITS, SyntheticBoxDataset, SyntheticConfig
from boxloss.data.voc import VOCBoxDataset, export_voc


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be N or HxW, got {text!r}") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"--size must be N or HxW, got {text!r}")


def _splits(text: str) -> list[str]:
    names = [s for s in text.split(",") if s]
    bad = [s for s in names if s not in SPLITS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"--splits must be a comma-separated subset of {','.join(SPLITS)}, got {text!r}"
        )
    return names


def _add_synthetic(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("synthetic benchmark")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--classes", type=int, default=6, help="object classes L, 1..20 (default 6)")
    g.add_argument("--size", type=_size, default=(256, 256), help="image size N or HxW (default 256)")
    for split in SPLITS:
        g.add_argument(
            f"--{split}",
            type=int,
            default=DEFAULT_SPLIT_SIZES[split],
            metavar="N",
            help=f"{split} images (default {DEFAULT_SPLIT_SIZES[split]})",
        )
    g.add_argument(
        "--cache-dir", default=None, help="cache root (default $BOXLOSS_DATA_CACHE or ~/.cache/boxloss/synthetic)"
    )
    g.add_argument("--no-cache", action="store_true", help="generate in memory, write no cache")
    g.add_argument("--workers", type=int, default=None, help="generation processes (default: CPU count, up to 8)")


def _config(args) -> SyntheticConfig:
    return SyntheticConfig(seed=args.seed, num_classes=args.classes, image_size=tuple(args.size))


def _dataset(args, split: str) -> SyntheticBoxDataset:
    log = (lambda m: print(m, file=sys.stderr)) if not getattr(args, "json", False) else None
    return SyntheticBoxDataset(
        split,
        getattr(args, split),
        _config(args),
        cache_dir=args.cache_dir,
        cache=not args.no_cache,
        workers=args.workers,
        log=log,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m boxloss.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate (and cache) the synthetic benchmark, then print its statistics")
    _add_synthetic(g)
    g.add_argument("--splits", type=_splits, default=list(SPLITS), help="splits to generate (default all)")
    s = sub.add_parser("stats", help="statistics of a split beside VOC 2012's")
    _add_synthetic(s)
    s.add_argument("--split", choices=SPLITS, default="train", help="synthetic split (default train)")
    s.add_argument("--voc", metavar="ROOT", help="measure a VOC-layout folder instead")
    s.add_argument("--voc-split", default="train", help="VOC split name or id-list file (default train)")
    s.add_argument("--masks", default="SegmentationClass", help="VOC mask folder (SegmentationClassAug for SBD)")
    s.add_argument("--image-set-dir", default="ImageSets/Segmentation", help="VOC split-file folder")
    s.add_argument("--coco", metavar="JSON", help="measure a COCO instances file instead (with --images)")
    s.add_argument("--images", metavar="DIR", help="COCO image folder")
    s.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad input in VOC/COCO data")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON")
    e = sub.add_parser("export", help="write the synthetic benchmark in VOC or COCO layout")
    _add_synthetic(e)
    e.add_argument("--format", choices=("voc", "coco"), required=True)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--splits", type=_splits, default=list(SPLITS), help="splits to export (default all)")
    e.add_argument("--image-format", choices=("jpg", "png"), default="jpg", help="jpg (as VOC/COCO) or png (lossless)")
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder that already holds files, replacing the files the export writes (default: refuse)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except (OSError, ValueError) as e:
        # Bad input: the message names the file and what is wrong; a traceback would only bury it.
        print(f"python -m boxloss.data {args.command}: error: {e}", file=sys.stderr)
        return 2


def _warn_empty_boxes(st) -> None:
    if st.boxes_without_object_pixels:
        print(
            f"warning: {st.boxes_without_object_pixels} box(es) hold no pixel of their class in the mask (first: "
            f"{st.first_box_without_object_pixels}); their annotations may be wrong",
            file=sys.stderr,
        )


def _run(parser: argparse.ArgumentParser, args) -> int:
    if args.command == "generate":
        config = _config(args)
        for split in args.splits:
            t = time.perf_counter()
            ds = _dataset(args, split)
            print(
                f"{split}: {len(ds)} images in {time.perf_counter() - t:.1f} s"
                + ("" if ds.cache_path is None else f", cached in {ds.cache_path}")
            )
            if split == args.splits[0]:
                first = ds
        print()
        print(
            format_report(
                compute_statistics(first, config.num_classes, config.class_names), f"synthetic {args.splits[0]}"
            )
        )
        return 0
    if args.command == "stats":
        if args.voc and args.coco:
            parser.error("stats: give --voc or --coco, not both")
        if args.voc:
            ds = VOCBoxDataset(
                args.voc,
                args.voc_split,
                masks=args.masks or None,
                image_set_dir=args.image_set_dir,
                on_error=args.on_error,
            )
            title = f"VOC {args.voc_split}"
        elif args.coco:
            if not args.images:
                parser.error("stats: --coco needs --images DIR")
            ds = COCOBoxDataset(args.coco, args.images, on_error=args.on_error)
            title = "COCO"
        else:
            ds = _dataset(args, args.split)
            title = f"synthetic {args.split}"
        st = compute_statistics(ds, ds.num_classes, ds.class_names)
        print(json.dumps(st.to_dict(), indent=1) if args.json else format_report(st, title))
        _warn_empty_boxes(st)
        return 0
    config = _config(args)
    check_output_folder("", Path(args.out), args.overwrite)  # before generating anything
    splits = {split: _dataset(args, split) for split in args.splits}
    t = time.perf_counter()
    if args.format == "voc":
        counts = export_voc(
            splits, args.out, config.class_names, image_format=args.image_format, overwrite=args.overwrite
        )
        print(
            f"wrote VOC layout to {args.out}: "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f" images ({time.perf_counter() - t:.1f} s)"
        )
        print(f"load it with boxloss.data.VOCBoxDataset({args.out!r}, {args.splits[0]!r})")
    else:
        files = export_coco(
            splits, args.out, config.class_names, image_format=args.image_format, overwrite=args.overwrite
        )
        print(f"wrote COCO layout to {args.out} ({time.perf_counter() - t:.1f} s):")
        for split, f in files.items():
            print(
                f"  {split}: {f}, images in {f.parent.parent / split}; "
                f"load with boxloss.data.COCOBoxDataset({str(f)!r}, {str(f.parent.parent / split)!r})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
