"""What a trainer's pipeline works with: its config, run directory, device, data, a model factory, :func:`fit` with
the run's settings, and the results it fills in."""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import boxloss
from boxloss.trainers.engine import distributed
from boxloss.trainers.engine.config import TrainerConfig
from boxloss.trainers.engine.loop import FitResult, fit
from boxloss.trainers.engine.models import build_model
from boxloss.trainers.engine.pretrain import load_initial_weights
from boxloss.trainers.engine.results import Results
from boxloss.trainers.engine.run import Run


def job_seed(seed: int, job: str) -> int:
    """A seed for one job of a run: the run's seed mixed with the job's name (stable across processes)."""
    return (int(seed) * 2_654_435_761 + zlib.crc32(job.encode())) % (2**63 - 1)


def setup_process(config: TrainerConfig) -> torch.device:
    """Threads, denormal flushing and the process group of a training process; returns its device.

    Denormal floats: when a network's outputs collapse (a common failure of weak supervision), gradients and
    activations decay into the subnormal range, where CPU arithmetic runs tens of times slower (a convolution over
    subnormal inputs: 55 ms flushed against 6.2 s not, one thread). Flushing them to zero changes no value above
    1e-38. ``torch.set_flush_denormal`` sets only the calling thread, so the pool's threads are set too (after the
    thread count is fixed)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    set_flush_denormal(True)
    return distributed.init_from_env(config.device)


@contextlib.contextmanager
def process_settings(config: TrainerConfig):
    """:func:`setup_process` for the length of a ``with`` block, yielding the device: the thread count and the
    denormal flushing are put back afterwards, so a trainer run from Python (a notebook, a test) leaves the
    process's floating-point state as it found it."""
    threads, flushing = torch.get_num_threads(), flushing_denormals()
    try:
        yield setup_process(config)
    finally:
        torch.set_num_threads(threads)
        set_flush_denormal(flushing)


def flushing_denormals() -> bool:
    """Whether the calling thread flushes subnormal floats to zero (a one-element product runs on it)."""
    return float(torch.tensor([1e-39], dtype=torch.float32).mul(1.0)) == 0.0


def set_flush_denormal(on: bool) -> bool:
    """Flush subnormal floats to zero on the calling thread and every thread of ATen's CPU pool."""
    op = getattr(torch.ops.boxloss, "_set_flush_denormal", None) if boxloss.extension_loaded() else None
    try:
        return bool(op(on)) if op is not None else torch.set_flush_denormal(on)
    except (RuntimeError, AttributeError):
        return torch.set_flush_denormal(on)


@dataclass
class Context:
    config: TrainerConfig
    run: Run
    device: torch.device
    results: Results
    log: Callable[[str], None] = print
    model_factory: Callable[..., nn.Module] | None = None
    progress: bool = True
    #: called as ``on_fit(result, model)`` after every job (trained or loaded), e.g. to keep a pipeline's final network
    on_fit: Callable[[FitResult, nn.Module], None] | None = None
    fits: list[FitResult] = field(default_factory=list)

    def seed(self, job: str) -> None:
        torch.manual_seed(job_seed(self.config.seed, job))

    def new_model(
        self, job: str, heads: dict[str, int], *, in_channels: int = 3, initial: str | None = None
    ) -> nn.Module:
        """A network for ``job`` with ``heads``: the user's ``model_factory(heads, in_channels)`` if given, else
        ``config.model``; initialised from ``config.pretrained`` (or ``initial``) and seeded by the job."""
        self.seed(job)
        if self.model_factory is not None:
            model = self.model_factory(heads=heads, in_channels=in_channels)
            how = "the user's model"
        else:
            spec = initial or self.config.pretrained
            model = build_model(
                self.config.model,
                heads,
                in_channels=in_channels,
                widths=self.config.widths,
                imagenet_backbone=spec == "torchvision",
            )
            how = (
                "torchvision's ImageNet backbone"
                if spec == "torchvision"
                else load_initial_weights(
                    model, spec, widths=self.config.widths, progress=self.progress, log=self.run.info
                )
            )
        self.run.info(f"[{job}] {type(model).__name__} with heads {heads}: {how}")
        return model.to(self.device)

    def fit(
        self,
        job: str,
        model: nn.Module,
        step_fn,
        batches,
        *,
        steps: int,
        optimizer,
        scheduler=None,
        grad_clip: float | None = None,
    ) -> FitResult:
        result = fit(
            self.run,
            job,
            model,
            step_fn,
            batches,
            steps=steps,
            optimizer=optimizer,
            scheduler=scheduler,
            grad_clip=grad_clip,
            log_every=self.config.log_every,
            checkpoint_every=self.config.checkpoint_every,
            device=self.device,
            progress=self.progress,
        )
        self.fits.append(result)
        if self.on_fit is not None:
            self.on_fit(result, model)
        return result

    def timing(self) -> dict:
        """The step timing of every job trained in this process (loaded jobs included), and their totals."""
        jobs = {r.job: r.timing for r in self.fits}
        total = sum(r.seconds for r in self.fits)
        loss = sum(
            (t.get("loss_forward_ms", 0) + t.get("loss_backward_ms", 0)) * t.get("steps", 0) for t in jobs.values()
        )
        step = sum((t.get("step_ms") or 0) * t.get("steps", 0) for t in jobs.values())
        return {"train_s": round(total, 1), "loss_share": round(loss / step, 4) if step else None, "jobs": jobs}
