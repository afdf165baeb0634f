"""Stand-in pretrained features, made offline.

Every paper starts from an ImageNet-pretrained backbone, and the weak losses lean on its features. Nothing is
downloaded here, so the trainers' default encoder is first trained the way ImageNet pre-training trains one: single-
label classification of object-centred images, here the box crops of synthetic classes that the segmentation
benchmark does not use (classes 7..20 of the 20-class synthetic benchmark, from a data seed of their own, while the
benchmark's default segmentation classes are 1..6). Multi-label presence on whole images was tried first and did
not learn within a CPU budget (validation loss stayed at the class prior after 1,000 steps): the objects are small
and their classes share colours and textures with the clutter. The result is cached under ``$BOXLOSS_CACHE``
(default ``~/.cache/boxloss``) ``/pretrained/<key>.pt`` by a hash of its settings, like the data.

``python -m boxloss.trainers pretrain`` builds it explicitly; every trainer's quick preset starts from it
(``--set pretrained=none`` trains from scratch, ``--weights PATH`` loads real weights instead).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
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
PRETRAIN_VERSION = 3


@dataclass(frozen=True)
class PretrainConfig:
    widths: tuple[int, ...] = (16, 32, 64, 96)
    classes: tuple[int, ...] = tuple(range(7, 21))  # of the 20-class synthetic benchmark
    image_size: int = 128  # the synthetic images the crops are cut from
    images: int = 2000
    crop_size: int = 48
    crop_min_side: int = 8
    data_seed: int = 1000
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def key(self) -> str:
        d = dataclasses.asdict(self)
        payload = json.dumps({"version": PRETRAIN_VERSION, **d}, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("BOXLOSS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "boxloss"
    )
    return Path(base) / "pretrained"


class Classifier(nn.Module):
    """The encoder, a 1 x 1 convolution with ReLU, global max and average pooling, and a linear classifier.
    Pooling the encoder's GroupNorm-ed output directly would give almost the same vector for every image (each
    group is normalised per image), so the head first mixes channels non-linearly."""

    def __init__(self, widths, num_classes):
        super().__init__()
        self.encoder = Encoder(3, widths)
        self.head = nn.Sequential(nn.Conv2d(widths[-1], 2 * widths[-1], 1), nn.ReLU(inplace=True))
        self.fc = nn.Linear(4 * widths[-1], num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        h = self.head(self.encoder((x - self.mean) / self.std)[-1])
        return self.fc(torch.cat([h.amax((2, 3)), h.mean((2, 3))], 1))


def _object_crops(dataset, config: PretrainConfig) -> list[tuple[torch.Tensor, int]]:
    """(crop (3, S, S), class index) for every box of the pre-training classes, with a 4-pixel margin."""
    from boxloss.data import crop_boxes

    items = []
    for i in range(len(dataset)):
        s = dataset[i]
        for c in sorted(set(s.labels.tolist())):
            for crop in crop_boxes(
                s.image,
                s.boxes,
                s.labels,
                c,
                border=4,
                min_side=config.crop_min_side,
                skip_other_classes=False,
                size=config.crop_size,
            ):
                items.append((crop.image, config.classes.index(c)))
    return items


def _collate(items):
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _flip(item, rng):
    x, y = item
    return (x.flip(-1), y) if rng.random() < 0.5 else item


def pretrain(config: PretrainConfig = PretrainConfig(), *, progress: bool = True, log=print) -> dict:
    """Trains the classifier of ``config`` and returns ``{"encoder": state_dict, "config", "val_accuracy"}``."""
    from boxloss.data import SyntheticBoxDataset, SyntheticConfig

    data = SyntheticConfig(
        seed=config.data_seed, num_classes=20, image_size=config.image_size, class_ids=config.classes
    )
    train = _object_crops(SyntheticBoxDataset("train", config.images, data, log=log), config)
    val = _object_crops(SyntheticBoxDataset("val", 300, data, log=log), config)
    torch.manual_seed(config.seed)
    model = Classifier(config.widths, len(config.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = cosine_schedule(opt, config.steps, warmup=min(100, config.steps // 10))

    def step(m, batch, clock):
        x, y = batch
        with clock.model_forward():
            logits = m(x)
        clock.watch(logits)
        with clock.loss_forward():
            loss = F.cross_entropy(logits, y)
        return loss, {}

    batches = Batches(train, config.batch_size, config.seed, collate=_collate, augment=_flip)
    result = fit(
        None, "pretrain", model, step, batches, steps=config.steps, optimizer=opt, scheduler=sched, progress=progress
    )
    model.eval()
    x, y = _collate(val)
    with torch.no_grad():
        acc = float((torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)]).argmax(1) == y).float().mean())
    log(
        f"pretrain: {len(train)} training crops; accuracy on {len(val)} held-out crops of {len(config.classes)} "
        f"classes: {acc:.3f} (chance {1 / len(config.classes):.3f}; {result.seconds:.0f} s)"
    )
    return {
        "encoder": model.encoder.state_dict(),
        "config": dataclasses.asdict(config),
        "val_accuracy": acc,
        "seconds": result.seconds,
    }


def pretrained_encoder(config: PretrainConfig = PretrainConfig(), *, progress: bool = True, log=print) -> dict:
    """The encoder state of ``config``, from the cache or trained now. One process trains it: the main process of a
    distributed run, and among separate runs the one that takes the lock file first; the others wait for it."""
    path = cache_dir() / f"{config.key()}.pt"
    if not path.is_file():
        if distributed.is_main():
            _train_once(config, path, log, progress)
        distributed.barrier()
    return checkpoint.load(path)["encoder"]


def _train_once(config: PretrainConfig, path: Path, log, progress: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_suffix(".lock")
    while not path.is_file():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = lock.read_text().strip() if lock.is_file() else ""
            if owner.isdigit() and not _alive(int(owner)):
                lock.unlink(missing_ok=True)  # left by a process that died
                continue
            time.sleep(2.0)
            continue
        try:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            if not path.is_file():
                log(
                    f"pre-training the encoder on object crops of synthetic classes {config.classes[0]}.."
                    f"{config.classes[-1]} (once; cached in {path})"
                )
                checkpoint.atomic_save(pretrain(config, progress=progress, log=log), path)
        finally:
            lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_initial_weights(model: nn.Module, spec: str, *, widths=None, progress: bool = True, log=print) -> str:
    """Initialises ``model`` as ``spec`` says and returns a sentence saying what was done.

    ``"none"``: left as initialised. ``"synthetic"``: the encoder of a :class:`SmallUNet`-like model from
    :func:`pretrained_encoder`. A path: a checkpoint holding a state dict (or ``{"model": state_dict}``), loaded
    where names and shapes match; it is an error when nothing matches."""
    if spec == "none":
        return "trained from scratch"
    if spec == "synthetic":
        encoder = getattr(model, "encoder", None)
        if encoder is None:
            raise ValueError(
                "pretrained=synthetic needs a model with an `encoder` (the small U-Net); use "
                "--set pretrained=none or --weights PATH for other models"
            )
        state = pretrained_encoder(PretrainConfig(widths=tuple(widths or encoder.widths)), progress=progress, log=log)
        if encoder.stages[0][0][0].in_channels != 3:
            state = {k: v for k, v in state.items() if not k.startswith("stages.0.0.")}
        missing, _ = encoder.load_state_dict(state, strict=False)
        return "encoder from the synthetic pre-training (classes 7..20)" + (
            f", first layer trained from scratch ({len(missing)} tensors)" if missing else ""
        )
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
