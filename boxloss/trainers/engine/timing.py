"""Where the time of a training step goes: data, model forward, loss forward, loss backward, model backward and
the optimizer.

A step function marks its model and loss calls with :meth:`StepClock.model_forward` and
:meth:`StepClock.loss_forward` and hands the model's outputs to :meth:`StepClock.watch`. Backward runs the loss's
nodes first (they were recorded last) and reaches the model's outputs when the loss's backward is done: a hook on
each watched output marks that moment, which splits the backward into the loss's part and the model's part.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

PARTS = ("data", "model_forward", "loss_forward", "loss_backward", "model_backward", "optimizer")


class StepClock:
    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.totals = defaultdict(float)
        self.steps = 0
        self.step_times: list[float] = []
        self._boundary: float | None = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def section(self, name: str):
        t0 = self._now()
        try:
            yield
        finally:
            self.totals[name] += self._now() - t0

    def model_forward(self):
        return self.section("model_forward")

    def loss_forward(self):
        return self.section("loss_forward")

    def watch(self, *outputs) -> None:
        """Marks the model's outputs (tensors, or dicts/lists of them) whose gradients end the loss's backward."""
        for out in outputs:
            if isinstance(out, dict):
                self.watch(*out.values())
            elif isinstance(out, (list, tuple)):
                self.watch(*out)
            elif isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(self._mark)

    def _mark(self, grad):
        self._boundary = self._now()
        return grad

    def backward(self, loss: torch.Tensor) -> None:
        self._boundary = None
        t0 = self._now()
        loss.backward()
        t1 = self._now()
        if self._boundary is None:  # nothing watched: all of it is counted as the model's
            self.totals["model_backward"] += t1 - t0
        else:
            self.totals["loss_backward"] += self._boundary - t0
            self.totals["model_backward"] += t1 - self._boundary

    def add_step(self, seconds: float) -> None:
        self.steps += 1
        self.step_times.append(seconds)

    def summary(self) -> dict:
        """Milliseconds per step: the median step, the mean of each part, and the losses' share of a step."""
        n = max(self.steps, 1)
        out = {
            "steps": self.steps,
            "step_ms": round(1000 * statistics.median(self.step_times), 2) if self.step_times else None,
        }
        for part in PARTS:
            out[f"{part}_ms"] = round(1000 * self.totals[part] / n, 2)
        mean_step = sum(self.step_times) / n if self.step_times else 0.0
        loss = self.totals["loss_forward"] + self.totals["loss_backward"]
        out["loss_share"] = round(loss / n / mean_step, 4) if mean_step else None
        return out

    def state_dict(self) -> dict:
        return {"totals": dict(self.totals), "steps": self.steps, "step_times": list(self.step_times)}

    def load_state_dict(self, state: dict) -> None:
        self.totals = defaultdict(float, state["totals"])
        self.steps = int(state["steps"])
        self.step_times = list(state["step_times"])
