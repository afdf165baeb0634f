"""Stand-in pretrained features, made offline.

Every paper starts from an ImageNet-pretrained backbone, and the weak losses lean on its features. Nothing is
downloaded here, so the trainers' default encoder is first trained on image-level classification (which classes an
image contains, a multi-label task, like ImageNet pre-training a task other than segmentation) of synthetic classes
that the segmentation benchmark does not use: classes 7..20 of the 20-class synthetic benchmark, from a data seed of
their own, while the benchmark's default segmentation classes are 1..6. The result is cached under
``$BOXLOSS_CACHE`` (default ``~/.cache/boxloss``) ``/pretrained/<key>.pt`` by a hash of its settings, like the data.

``python -m boxloss.trainers pretrain`` builds it explicitly; every trainer's quick preset starts from it
(``--set pretrained=none`` trains from scratch, ``--weights PATH`` loads real weights instead).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from boxloss.trainers.engine import checkpoint, distributed
from boxloss.trainers.engine.data import Batches
from boxloss.trainers.engine.loop import cosine_schedule, fit
from boxloss.trainers.engine.models import IMAGENET_MEAN, IMAGENET_STD, Encoder

#: Changed whenever the pre-training procedure changes, so old caches are not reused.
PRETRAIN_VERSION = 1


@dataclass(frozen=True)
class PretrainConfig:
    widths: tuple[int, ...] = (16, 32, 64, 96)
    classes: tuple[int, ...] = tuple(range(7, 21))  # of the 20-class synthetic benchmark
    image_size: int = 96
    images: int = 3000
    data_seed: int = 1000
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def key(self) -> str:
        d = dataclasses.asdict(self)
        payload = json.dumps({"version": PRETRAIN_VERSION, **d}, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("BOXLOSS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "boxloss")
    return Path(base) / "pretrained"


class Classifier(nn.Module):
    """The encoder, global average pooling and a linear multi-label classifier."""

    def __init__(self, widths, num_classes):
        super().__init__()
        self.encoder = Encoder(3, widths)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return self.fc(self.encoder((x - self.mean) / self.std)[-1].mean((2, 3)))


def _presence(batch, classes) -> torch.Tensor:
    B = batch.images.shape[0]
    lut = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    target = torch.zeros(B, len(classes))
    target[batch.box_batch, lut[batch.box_labels]] = 1.0
    return target


def pretrain(config: PretrainConfig = PretrainConfig(), *, progress: bool = True, log=print) -> dict:
    """Trains the classifier of ``config`` and returns ``{"encoder": state_dict, "config", "val_accuracy"}``."""
    from boxloss.data import SyntheticBoxDataset, SyntheticConfig
    from boxloss.trainers.engine.data import InMemory, hflip_augment

    data = SyntheticConfig(seed=config.data_seed, num_classes=20, image_size=config.image_size,
                           class_ids=config.classes)
    train = InMemory(SyntheticBoxDataset("train", config.images, data, log=log))
    val = InMemory(SyntheticBoxDataset("val", 300, data, log=log))
    torch.manual_seed(config.seed)
    model = Classifier(config.widths, len(config.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = cosine_schedule(opt, config.steps, warmup=min(100, config.steps // 10))
    classes = list(config.classes)

    def step(m, batch, clock):
        with clock.model_forward():
            logits = m(batch.images)
        clock.watch(logits)
        with clock.loss_forward():
            loss = F.binary_cross_entropy_with_logits(logits, _presence(batch, classes))
        return loss, {}

    batches = Batches(train, config.batch_size, config.seed, augment=hflip_augment)
    result = fit(None, "pretrain", model, step, batches, steps=config.steps, optimizer=opt, scheduler=sched,
                 progress=progress)
    model.eval()
    correct = total = 0
    from boxloss.data import collate_samples

    with torch.no_grad():
        for i in range(0, len(val), 64):
            b = collate_samples([val[j] for j in range(i, min(i + 64, len(val)))])
            pred = model(b.images) > 0
            t = _presence(b, classes) > 0.5
            correct += int((pred == t).all(1).sum())
            total += pred.shape[0]
    acc = correct / max(total, 1)
    log(f"pretrain: exact-match accuracy of the {len(classes)}-class presence on 300 held-out images: {acc:.3f} "
        f"({result.seconds:.0f} s)")
    return {"encoder": model.encoder.state_dict(), "config": dataclasses.asdict(config), "val_accuracy": acc,
            "seconds": result.seconds}


def pretrained_encoder(config: PretrainConfig = PretrainConfig(), *, log=print) -> dict:
    """The encoder state of ``config``, from the cache or trained now (on the main process; others wait)."""
    path = cache_dir() / f"{config.key()}.pt"
    if not path.is_file():
        if distributed.is_main():
            log(f"pre-training the encoder on synthetic classes {config.classes[0]}..{config.classes[-1]} "
                f"(once; cached in {path})")
            checkpoint.atomic_save(pretrain(config, log=log), path)
        distributed.barrier()
    return checkpoint.load(path)["encoder"]


def load_initial_weights(model: nn.Module, spec: str, *, widths=None, log=print) -> str:
    """Initialises ``model`` as ``spec`` says and returns a sentence saying what was done.

    ``"none"``: left as initialised. ``"synthetic"``: the encoder of a :class:`SmallUNet`-like model from
    :func:`pretrained_encoder`. A path: a checkpoint holding a state dict (or ``{"model": state_dict}``), loaded
    where names and shapes match; it is an error when nothing matches."""
    if spec == "none":
        return "trained from scratch"
    if spec == "synthetic":
        encoder = getattr(model, "encoder", None)
        if encoder is None:
            raise ValueError("pretrained=synthetic needs a model with an `encoder` (the small U-Net); use "
                             "--set pretrained=none or --weights PATH for other models")
        state = pretrained_encoder(PretrainConfig(widths=tuple(widths or encoder.widths)), log=log)
        if encoder.stages[0][0][0].in_channels != 3:
            state = {k: v for k, v in state.items() if not k.startswith("stages.0.0.")}
        missing, _ = encoder.load_state_dict(state, strict=False)
        return "encoder from the synthetic pre-training (classes 7..20)" + (
            f", first layer trained from scratch ({len(missing)} tensors)" if missing else "")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {spec}: no such file (nothing is downloaded; give a local checkpoint)")
    state = checkpoint.load(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"--weights {spec}: none of its {len(state)} tensors matches the model's names and shapes")
    model.load_state_dict(usable, strict=False)
    return f"{len(usable)} of {len(own)} tensors from {spec}"
