"""``python -m boxloss.trainers <trainer> [options]``: run a paper's pipeline; see ``--help``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from boxloss.trainers import TRAINERS, trainer_module
from boxloss.trainers.engine import distributed
from boxloss.trainers.engine.checkpoint import CheckpointError, atomic_write_text
from boxloss.trainers.engine.config import ConfigError
from boxloss.trainers.engine.context import Context, process_settings
from boxloss.trainers.engine.data import DataSpecError
from boxloss.trainers.engine.results import Results, aggregate
from boxloss.trainers.engine.run import Run, RunDirectoryError

USER_ERRORS = (ConfigError, RunDirectoryError, DataSpecError, CheckpointError, FileNotFoundError, NotADirectoryError)


def _common(p: argparse.ArgumentParser, module) -> None:
    p.add_argument(
        "--preset",
        default="quick",
        choices=list(module.Config.PRESET_OVERRIDES),
        help="quick: small enough for a laptop CPU (default); paper: the paper's schedule and sizes",
    )
    p.add_argument("--data", help="synthetic (default), voc:PATH or coco:ANNOTATIONS:IMAGES")
    p.add_argument("--out", help=f"run directory (default runs/{module.NAME}-<preset>)")
    p.add_argument("--device", help="cpu (default) or cuda")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seed", type=int, help="training seed (default 0)")
    g.add_argument(
        "--seeds",
        help="several training seeds, e.g. 0,1,2: one run each in <out>/seed-N, and the "
        "mean and spread in <out>/results.json",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the config (repeatable); --print-config lists them",
    )
    p.add_argument("--settings", help="comma-separated subset of the ablation settings to run (default: all)")
    p.add_argument(
        "--weights", help="a local checkpoint to initialise the networks from (instead of the synthetic pre-training)"
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--print-config", action="store_true", help="print the resulting config and exit")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m boxloss.trainers", description="Reference trainers of the boxloss papers."
    )
    sub = p.add_subparsers(dest="trainer", required=True, metavar="TRAINER")
    for name in TRAINERS:
        module = trainer_module(name)
        settings = "\n".join(f"  {k:<20} {v}" for k, v in module.SETTINGS.items())
        sp = sub.add_parser(
            name,
            help=module.SUMMARY,
            description=module.SUMMARY,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"settings (rows of the paper's ablation):\n{settings}",
        )
        _common(sp, module)
    pre = sub.add_parser(
        "pretrain",
        help="build the cached stand-in for ImageNet features",
        description="Train (once, cached) the encoder every quick preset starts from.",
    )
    pre.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pre.add_argument("--threads", type=int)
    return p


def _config(module, args):
    values = {}
    for key in ("data", "device", "seed", "threads"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    if args.weights:
        values["pretrained"] = args.weights
    return module.Config.from_preset(args.preset, args.overrides, **values)


def _settings(module, text):
    if not text:
        return list(module.SETTINGS)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in module.SETTINGS]
    if unknown:
        raise ConfigError(f"--settings: unknown {', '.join(unknown)}; the settings are {', '.join(module.SETTINGS)}")
    return chosen


def run_trainer(
    module,
    config,
    out: Path,
    *,
    settings,
    resume=False,
    overwrite=False,
    progress=True,
    model_factory=None,
    log=print,
    on_fit=None,
) -> Results:
    """One run of ``module``'s pipeline with ``config`` into ``out``; writes results.json/md and returns them.
    The process's thread count and denormal flushing are set for the run and put back after it. ``on_fit(result,
    model)`` is called after every job of the pipeline (see :class:`Context`)."""
    with process_settings(config) as device:
        run = Run(out, module.NAME, config.to_dict(), resume=resume, overwrite=overwrite, log=log)
        run.info(f"{module.NAME}: {module.SUMMARY}\nrun directory {out}\nconfig:\n{config.describe()}")
        results = Results(module.NAME, config.preset, config.seed)
        ctx = Context(
            config, run, device, results, log=run.info, model_factory=model_factory, progress=progress, on_fit=on_fit
        )
        started = time.time()
        module.run(ctx, settings)
        results.timing = {"wall_s": round(time.time() - started, 1), **ctx.timing()}
        run.write_json("results.json", results.to_dict())
        run.write_text("results.md", results.markdown())
        run.info(results.markdown())
    return results


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.trainer == "pretrain":
            return _pretrain(args)
        module = trainer_module(args.trainer)
        config = _config(module, args)
        if args.print_config:
            print(config.describe())
            return 0
        settings = _settings(module, args.settings)
        out = Path(args.out or f"runs/{module.NAME}-{args.preset}")
        if args.seeds:
            try:
                seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
            per_seed = []
            for s in seeds:
                cfg = dataclasses.replace(config, seed=s)
                per_seed.append(
                    run_trainer(
                        module,
                        cfg,
                        out / f"seed-{s}",
                        settings=settings,
                        resume=args.resume,
                        overwrite=args.overwrite,
                        progress=not args.no_progress,
                    )
                )
            if distributed.is_main():
                agg = aggregate(per_seed)
                atomic_write_text(out / "results.json", json.dumps(agg.to_dict(), indent=1) + "\n")
                atomic_write_text(out / "results.md", agg.markdown())
                summarize = getattr(module, "summarize_seeds", None)
                if summarize is not None:  # a trainer's figures over all seeds (e.g. the compare trainer's spread)
                    summarize(out, agg, [out / f"seed-{s}" for s in seeds])
                print(agg.markdown())
        else:
            run_trainer(
                module,
                config,
                out,
                settings=settings,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


def _pretrain(args) -> int:
    import typing

    from boxloss.trainers.engine.config import _parse
    from boxloss.trainers.engine.pretrain import PretrainConfig, cache_dir, pretrained_encoder

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    hints = typing.get_type_hints(PretrainConfig)
    changes = {}
    for item in args.overrides:
        key, _, text = item.partition("=")
        if key not in hints:
            raise ConfigError(f"--set {key}: no such pre-training setting; they are {', '.join(hints)}")
        changes[key] = _parse(key, hints[key], text)
    cfg = dataclasses.replace(PretrainConfig(), **changes)
    pretrained_encoder(cfg)
    print(f"pretrained encoder: {cache_dir() / (cfg.key() + '.pt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
