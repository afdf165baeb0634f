"""A run directory: the config printed and saved beside the results, metrics as JSON lines, checkpoints per
training stage, cached intermediate results, figures, and the final ``results.json`` / ``results.md``.

An existing run directory is never overwritten: it is refused unless ``resume`` (continue it: finished stages are
loaded, an interrupted one continues from its last checkpoint) or ``overwrite`` (delete it first) is given. Only
the main process of a distributed run writes."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from boxloss.trainers.engine import checkpoint, distributed


class RunDirectoryError(RuntimeError):
    """The run directory exists and neither resume nor overwrite was asked, or a resume does not match it."""


class Run:
    """The run directory ``path`` of ``trainer`` with ``config`` (a dict, saved as ``config.json``)."""

    def __init__(
        self,
        path: str | os.PathLike,
        trainer: str,
        config: dict,
        *,
        resume: bool = False,
        overwrite: bool = False,
        log: Callable[[str], None] | None = print,
    ):
        self.path = Path(path)
        self.trainer = trainer
        self.config = dict(config)
        self.resume = resume
        self.main = distributed.is_main()
        self._log = log if self.main else None
        self.started = time.time()
        if resume and overwrite:
            raise RunDirectoryError(
                "--resume and --overwrite exclude each other: resume continues the run in "
                f"{self.path}, overwrite deletes it"
            )
        exists = self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir()))
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"{self.path} is a file, not a run directory")
        saved = self.path / "config.json"
        if resume:
            if not saved.is_file():
                raise RunDirectoryError(f"--resume: {self.path} holds no run to resume (no config.json)")
            old = json.loads(saved.read_text())
            if old.get("trainer") != trainer:
                raise RunDirectoryError(f"--resume: {self.path} is a {old.get('trainer')!r} run, not {trainer!r}")
            diff = {
                k: (old["config"].get(k), v)
                for k, v in _jsonable(self.config).items()
                if old["config"].get(k) != v and k not in RESUMABLE_CHANGES
            }
            if diff:
                detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                raise RunDirectoryError(
                    f"--resume: the settings differ from the run in {self.path} ({detail}); "
                    "resume with the same settings or start a new run"
                )
        elif exists:
            if not overwrite:
                raise RunDirectoryError(
                    f"{self.path} already holds files; pass --resume to continue that run or "
                    "--overwrite to delete it, or choose another --out"
                )
            if self.main:
                shutil.rmtree(self.path)
        distributed.barrier()
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_text(
                saved, json.dumps({"trainer": trainer, "config": _jsonable(self.config)}, indent=1, sort_keys=True)
            )
        distributed.barrier()

    # ---------------------------------------------------------------------------------------------- paths
    def file(self, *parts: str) -> Path:
        p = self.path.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def checkpoint_path(self, job: str) -> Path:
        return self.path / "checkpoints" / (_slug(job) + ".pt")

    # ---------------------------------------------------------------------------------------------- logging
    def info(self, text: str) -> None:
        if self._log is not None:
            self._log(text)

    def log_metrics(self, record: dict) -> None:
        """Appends one JSON line to ``metrics.jsonl`` (main process only)."""
        if not self.main:
            return
        record = {"time": round(time.time() - self.started, 3), **record}
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def write_json(self, name: str, obj) -> None:
        if self.main:
            checkpoint.atomic_write_text(self.file(name), json.dumps(_jsonable(obj), indent=1) + "\n")

    def write_text(self, name: str, text: str) -> None:
        if self.main:
            checkpoint.atomic_write_text(self.file(name), text)

    # ---------------------------------------------------------------------------------------------- caching
    def cached(self, name: str, compute: Callable[[], object]):
        """The result of ``compute()`` kept in ``cache/<name>.pt``: computed once, loaded on resume. The value must
        be what ``torch.load(weights_only=True)`` reads back (tensors, numbers, strings, lists, dicts)."""
        path = self.path / "cache" / (_slug(name) + ".pt")
        if path.is_file():
            return checkpoint.load(path)
        value = compute()
        if self.main:
            checkpoint.atomic_save(value, path)
        return value


#: settings that may change on --resume without changing the results (where the run runs, how much it logs)
RESUMABLE_CHANGES = {"device", "threads", "workers", "log_every", "checkpoint_every"}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace("/", "__"))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
