"""The training loop every trainer shares: :func:`fit`.

One call trains one model for one stage of a pipeline (a "job", named like ``table1/ours/class-3``) and owns the
loop, the progress bar, JSON-lines metrics, checkpoints and resume, data-parallel wrapping and the timing split.
The trainer supplies the step: ``step_fn(model, batch, clock) -> (loss, terms)``, where ``terms`` is a dict of
floats or scalar tensors to log.

Checkpoints (``<run>/checkpoints/<job>.pt``) hold the model, optimizer, scheduler, RNG states, step and timing,
every ``checkpoint_every`` steps and at the end (marked done). A job whose checkpoint is done is not trained again:
its weights are loaded. A job with an unfinished checkpoint continues from it, and because batches depend only on
(seed, step) (:class:`~boxloss.trainers.engine.data.Batches`) the resumed job ends where an uninterrupted one ends.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from boxloss.trainers.engine import checkpoint, distributed
from boxloss.trainers.engine.timing import StepClock


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the message names the job, the step and the loss terms."""


@dataclass
class FitResult:
    """What a job did: its steps, its wall time (this process, resumed parts included) and the timing split."""

    job: str
    steps: int
    seconds: float
    timing: dict
    last_terms: dict = field(default_factory=dict)
    trained: bool = True  # False when the finished job was loaded from its checkpoint


def _value(v) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def fit(
    run,
    job: str,
    model: nn.Module,
    step_fn: Callable,
    batches,
    *,
    steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    grad_clip: float | None = None,
    log_every: int = 25,
    checkpoint_every: int = 200,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> FitResult:
    """Trains ``model`` for ``steps`` steps of ``step_fn`` on ``batches`` (see the module docstring).

    ``run`` is a :class:`~boxloss.trainers.engine.run.Run` (checkpoints, metrics) or ``None`` (neither).
    ``batches`` has ``iterate(start, stop)`` yielding one batch per step. The model is wrapped in
    DistributedDataParallel when several processes train; ``step_fn`` receives the wrapped model.
    """
    if steps < 0:
        raise ValueError(f"fit: steps must be >= 0, got {steps}")
    path = run.checkpoint_path(job) if run is not None else None
    clock = StepClock(device)
    start, seconds, last = 0, 0.0, {}
    if path is not None and path.is_file():
        state = checkpoint.load(path)
        model.load_state_dict(state["model"])
        if state.get("done"):
            run.info(f"[{job}] finished earlier: loaded {path}")
            return FitResult(
                job, state["step"], state["seconds"], state["timing"], state.get("last_terms", {}), trained=False
            )
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        clock.load_state_dict(state["clock"])
        start, seconds, last = int(state["step"]), float(state["seconds"]), state.get("last_terms", {})
        if run is not None:
            run.info(f"[{job}] resuming at step {start} of {steps} from {path}")

    train_model = distributed.wrap(model)

    def save(step: int, done: bool) -> None:
        if path is None or not distributed.is_main():
            return
        checkpoint.atomic_save(
            {
                "job": job,
                "step": step,
                "done": done,
                "seconds": seconds,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "rng": checkpoint.rng_state(),
                "clock": clock.state_dict(),
                "timing": clock.summary(),
                "last_terms": last,
            },
            path,
        )

    bar = None
    if progress and distributed.is_main() and steps > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=job, dynamic_ncols=True, mininterval=1.0, leave=False)
    images = getattr(batches, "global_batch", None)
    train_model.train()
    window_start, window_steps = time.perf_counter(), 0
    source = batches.iterate(start, steps)
    for step in range(start, steps):
        t0 = time.perf_counter()
        batch = next(source)
        clock.totals["data"] += time.perf_counter() - t0
        t_step = time.perf_counter()
        loss, terms = step_fn(train_model, batch, clock)
        if not torch.isfinite(loss.detach()).all():
            detail = ", ".join(f"{k}={_value(v):.4g}" for k, v in terms.items())
            raise TrainingDiverged(f"[{job}] the loss is {float(loss.detach())} at step {step} ({detail})")
        optimizer.zero_grad(set_to_none=True)
        clock.backward(loss)
        with clock.section("optimizer"):
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        elapsed = time.perf_counter() - t_step
        clock.add_step(elapsed)
        seconds += time.perf_counter() - t0
        window_steps += 1
        last = {"loss": _value(loss), **{k: _value(v) for k, v in terms.items()}}
        done_steps = step + 1
        if done_steps % log_every == 0 or done_steps == steps:
            now = time.perf_counter()
            rate = window_steps * (images or 0) / max(now - window_start, 1e-9)
            window_start, window_steps = now, 0
            record = {
                "job": job,
                "step": done_steps,
                **{k: round(v, 6) for k, v in last.items()},
                "lr": optimizer.param_groups[0]["lr"],
            }
            if images:
                record["images_per_s"] = round(rate, 2)
            if run is not None:
                run.log_metrics(record)
            if bar is not None:
                bar.set_postfix(
                    {k: f"{v:.3g}" for k, v in list(last.items())[:5]} | ({"img/s": f"{rate:.1f}"} if images else {}),
                    refresh=False,
                )
        if bar is not None:
            bar.update(1)
        if checkpoint_every and done_steps % checkpoint_every == 0 and done_steps < steps:
            save(done_steps, done=False)
    if bar is not None:
        bar.close()
    save(steps, done=True)
    distributed.barrier()
    return FitResult(job, steps, seconds, clock.summary(), last)


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 0):
    """Linear warm-up then cosine decay to zero over ``steps`` (a LambdaLR, so it checkpoints)."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def poly_schedule(optimizer: torch.optim.Optimizer, steps: int, power: float = 0.9):
    """DeepLab's "poly" decay (1 - step / steps) ** power."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / max(1, steps)) ** power)
