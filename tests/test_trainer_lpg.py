"""The LPG trainer: the bi-level EM and its deployment on tiny data, class-agnosticism, resume in the middle of a
stage, the box windows, the real-data class split and bad settings."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import boxloss
from boxloss.data import SyntheticConfig, collate_samples, export_coco, export_voc, generate_sample
from boxloss.trainers import lpg
from boxloss.trainers.__main__ import run_trainer
from boxloss.trainers.engine import checkpoint
from boxloss.trainers.engine.config import ConfigError
from boxloss.trainers.engine.data import load_splits
from boxloss.trainers.engine.evaluate import label_miou
from boxloss.trainers.engine.models import SmallUNet

#: a whole pipeline of two stages in seconds: 48-pixel images, a few steps per job, tiny networks
TINY = [
    "image_size=48",
    "train_images=16",
    "val_images=8",
    "aux_images=16",
    "pretrained=none",
    "widths=8,8,8,8",
    "batch_size=4",
    "seg_steps=3",
    "generator_steps=4",
    "generator_batch=4",
    "generator_width=8",
    "generator_depth=2",
    "crop_size=16",
    "stages=2",
    "checkpoint_every=2",
    "figures=2",
    "threads=1",
]


def tiny_config(*extra):
    return lpg.Config.from_preset("quick", TINY + list(extra))


def _run(cfg, out, **kw):
    return run_trainer(lpg, cfg, out, settings=list(lpg.SETTINGS), progress=False, log=kw.pop("log", None), **kw)


def test_rows_of_the_paper_tables():
    rows = lpg.table_rows(list(lpg.SETTINGS), 3)
    assert rows == [
        "box",
        "stage-1",
        "stage-2",
        "stage-3",
        "fixed-stage-1",
        "fixed-stage-2",
        "fixed-stage-3",
        "lpg-stage-1",
        "lpg-stage-2",
        "lpg-stage-3",
        "densecrf",
    ]
    assert lpg.table_rows(["stage-3", "box"], 4) == ["stage-3", "stage-4", "box"]
    assert lpg.table_rows(["stage-3", "lpg-stage-1"], 2) == ["lpg-stage-1"]


def test_em_pipeline_on_tiny_data(tmp_path):
    out = tmp_path / "run"
    results = _run(tiny_config(), out)
    got = {(r["table"], r["setting"], r["metric"]) for r in results.rows}
    want = {("II", s, "miou") for s in ("box", "stage-1", "stage-2", "fixed-stage-1", "fixed-stage-2")}
    want |= {("III", s, "miou") for s in ("lpg-stage-1", "lpg-stage-2", "densecrf")}
    assert got == want and len(results.rows) == len(want)
    assert all(0 <= r["value"] <= 100 for r in results.rows)
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == results.rows
    for s in (1, 2):  # every stage's generator, loadable into the architecture it names
        state = checkpoint.load(out / "generators" / f"lpg-stage-{s}.pt")
        assert state["stage"] == s and state["architecture"]["generator"] == "hourglass"
        lpg.build_generator(tiny_config()).load_state_dict(state["model"])
    jobs = {p.stem for p in (out / "checkpoints").glob("*.pt")}
    assert {
        "aux__f__stage-1",
        "aux__g__stage-1",
        "aux__f__stage-2",
        "aux__g__stage-2",
        "target__f__box",
        "target__f__stage-1",
        "target__f__stage-2",
        "target__f__fixed-stage-1",
        "target__f__fixed-stage-2",
    } <= jobs
    for name in (
        "fig3_target_pseudo_masks.png",
        "fig3_aux_pseudo_masks.png",
        "target_predictions.png",
        "loss_curves.png",
    ):
        assert (out / "figures" / name).stat().st_size > 0
    times = json.loads((out / "stage_times.json").read_text())
    assert {"aux stage 1", "aux stage 2", "target stage 1", "target stage 2 (fixed)"} <= set(times)
    # the saved generators deploy on their own: the second run skips the auxiliary EM
    again = _run(tiny_config(f"generators={out / 'generators'}"), tmp_path / "deployed")
    assert not (tmp_path / "deployed" / "checkpoints" / "aux__g__stage-1.pt").exists()
    assert again.value("III", "lpg-stage-1", "miou") == results.value("III", "lpg-stage-1", "miou")


class _Killed(Exception):
    pass


@pytest.mark.parametrize("job", ["aux/g/stage-2", "target/f/stage-2"])
def test_resume_continues_an_interrupted_stage(tmp_path, monkeypatch, job):
    cfg = tiny_config("seg_steps=4")
    full = _run(cfg, tmp_path / "full")
    save = checkpoint.atomic_save

    def killing_save(obj, path):  # a kill right after the job's first checkpoint
        save(obj, path)
        if isinstance(obj, dict) and obj.get("job") == job and not obj["done"]:
            raise _Killed(job)

    monkeypatch.setattr(checkpoint, "atomic_save", killing_save)
    with pytest.raises(_Killed):
        _run(cfg, tmp_path / "cut")
    monkeypatch.setattr(checkpoint, "atomic_save", save)
    state = checkpoint.load(tmp_path / "cut" / "checkpoints" / (job.replace("/", "__") + ".pt"))
    assert not state["done"] and state["step"] == 2
    log = []
    resumed = _run(cfg, tmp_path / "cut", resume=True, log=log.append)
    text = "\n".join(log)
    assert f"[{job}] resuming at step 2 of 4" in text
    assert "[aux/g/stage-1] finished earlier" in text
    assert resumed.rows == full.rows
    a = checkpoint.load(tmp_path / "full" / "generators" / "lpg-stage-2.pt")["model"]
    b = checkpoint.load(tmp_path / "cut" / "generators" / "lpg-stage-2.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _target_batch(n=6):
    cfg = SyntheticConfig(seed=3, num_classes=6, image_size=48, class_ids=(4, 5, 6))
    return [generate_sample(cfg, "train", i) for i in range(n)]


class _Copy(torch.nn.Module):
    """A generator whose object channel is its probability input: the pseudo masks are f's per-class masks."""

    def forward(self, x):
        p = x[:, 4:5]
        return [torch.cat([1 - p, p], 1) * 10]


class _Oracle(torch.nn.Module):
    """f that predicts the true masks of a fixed batch."""

    def __init__(self, masks, num_classes):
        super().__init__()
        self.masks, self.C = masks, num_classes + 1

    def forward(self, x):
        return torch.nn.functional.one_hot(self.masks.clamp_max(self.C - 1), self.C).permute(0, 3, 1, 2).float() * 9


def test_stage_3_alone(tmp_path):
    """``--settings stage-3``: the whole stage-wise chain runs (the EM's three generators, f from the boxes through
    stage 3) and only its row is written; neither the fixed-generator chain nor DenseCRF runs."""
    out = tmp_path / "run"
    results = run_trainer(lpg, tiny_config("stages=3"), out, settings=["stage-3"], progress=False, log=None)
    assert [(r["table"], r["setting"], r["metric"]) for r in results.rows] == [("II", "stage-3", "miou")]
    jobs = {p.stem for p in (out / "checkpoints").glob("*.pt")}
    assert jobs == {f"aux__{n}__stage-{s}" for n in "fg" for s in (1, 2, 3)} | {
        "target__f__box",
        "target__f__stage-1",
        "target__f__stage-2",
        "target__f__stage-3",
    }
    assert sorted(p.name for p in (out / "generators").iterdir()) == [f"lpg-stage-{s}.pt" for s in (1, 2, 3)]


def test_target_split_is_the_benchmark_every_trainer_uses():
    """The default target is the num_classes-class synthetic benchmark itself (the images every other trainer
    trains and scores on), and the auxiliary classes are a configuration: here 7..12, relabelled 1..6."""
    cfg = tiny_config("aux_classes=7,8,9,10,11,12", "aux_images=12")
    aux, names, target = lpg.load_datasets(cfg, log=None)
    plain = load_splits("synthetic", num_classes=6, image_size=48, train_images=16, val_images=8, log=None)
    assert target.class_names == plain.class_names and names == tuple(f"syn{c:02d}" for c in range(7, 13))
    for mine, theirs in ((target.train, plain.train), (target.val, plain.val)):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            assert a.image_id == b.image_id and np.array_equal(a.image, b.image)
            assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)
            assert np.array_equal(a.mask, b.mask)
    assert len(aux) == 12 and all(set(s.labels.tolist()) <= set(range(1, 7)) for s in aux)
    assert any(s.num_boxes for s in aux) and all(
        set(np.unique(s.mask).tolist()) <= {0, 1, 2, 3, 4, 5, 6, 255} for s in aux
    )
    default = lpg.load_datasets(tiny_config("aux_images=4"), log=None)[1]
    assert default == tuple(f"syn{c:02d}" for c in range(7, 21))  # every synthetic class the target lacks


def _pydensecrf_inference(unary, image, *, bilateral, gaussian, iterations, valid_mask=None):
    """boxloss.dense_crf_inference's contract, run by pydensecrf (DenseCRF2D, one image at a time)."""
    from boxloss import _pydensecrf

    crf_module = _pydensecrf.load("test")
    B, C, H, W = unary.shape
    out = []
    for b in range(B):
        crf = crf_module.DenseCRF2D(W, H, C)
        crf.setUnaryEnergy(np.ascontiguousarray(unary[b].reshape(C, -1).numpy(), dtype=np.float32))
        crf.addPairwiseGaussian(sxy=gaussian[1], compat=gaussian[0])
        rgb = np.ascontiguousarray(image[b].permute(1, 2, 0).numpy())
        crf.addPairwiseBilateral(sxy=bilateral[1], srgb=bilateral[2], rgbim=rgb, compat=bilateral[0])
        out.append(torch.from_numpy(np.array(crf.inference(iterations)).reshape(C, H, W)))
    return torch.stack(out)


def test_densecrf_baseline_is_the_same_through_either_implementation(monkeypatch):
    """Table III's DenseCRF: the batched path (boxloss.dense_crf_inference) builds the unaries and kernels that
    boxloss.dense_crf_box_masks gives pydensecrf, so with the same CRF underneath both give the same labels."""
    pytest.importorskip("pydensecrf.densecrf")
    cfg = tiny_config()
    samples = _target_batch(10) + [
        dataclasses.replace(_target_batch(1)[0], boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64))
    ]
    monkeypatch.delattr(boxloss, "dense_crf_inference", raising=False)
    per_image = lpg.densecrf_pseudo_labels(samples, 6, cfg)
    monkeypatch.setattr(boxloss, "dense_crf_inference", _pydensecrf_inference, raising=False)
    batched = lpg.densecrf_pseudo_labels(samples, 6, cfg)
    assert all(torch.equal(a, b) for a, b in zip(per_image, batched)) and len(batched) == len(samples)
    assert not batched[-1].any()  # no box: all background
    truth = [torch.from_numpy(s.mask) for s in samples[:-1]]
    assert label_miou(batched[:-1], truth, 6) > label_miou(lpg.box_pseudo_labels(samples[:-1], 6), truth, 6) - 20


def test_generator_is_class_agnostic():
    """g sees no class: its input is five maps for any number of classes, each box reads f's probability of its
    own class, and relabelling the classes (f's channels with them) relabels the pseudo masks and nothing else."""
    cfg = tiny_config("crop_size=32")
    samples = _target_batch()
    b = collate_samples(samples)
    for L in (6, 20):
        probs = torch.rand(b.images.shape[0], L + 1, 48, 48)
        x = lpg.generator_inputs(b.images, probs, b.boxes, b.box_batch, b.box_labels, L, 32, 0.25)
        assert x.shape == (b.boxes.shape[0], 5, 32, 32)
        assert lpg.build_generator(cfg)(x)[-1].shape == (b.boxes.shape[0], 2, 32, 32)
    truth = [torch.from_numpy(s.mask) for s in samples]
    pseudo = lpg.lpg_pseudo_labels(_Copy(), _Oracle(b.masks, 6), samples, 6, cfg, "cpu", batch_size=len(samples))
    assert label_miou(pseudo, truth, 6) > 90
    swap = np.array([0, 1, 2, 3, 5, 4, 6])  # classes 4 and 5 trade channels
    swapped = [
        dataclasses.replace(
            s, labels=swap[s.labels], mask=np.where(s.mask == 255, 255, swap[np.minimum(s.mask, 6)]).astype(np.uint8)
        )
        for s in samples
    ]
    again = lpg.lpg_pseudo_labels(
        _Copy(), _Oracle(collate_samples(swapped).masks, 6), swapped, 6, cfg, "cpu", batch_size=len(samples)
    )
    for p, q in zip(pseudo, again):
        assert torch.equal(torch.from_numpy(swap)[p.long()], q.long())


def test_unseen_classes_get_masks(tmp_path):
    """The EM on classes 1..3 deployed on classes 4..6: every target class gets object pixels in its boxes."""
    cfg = tiny_config(
        "generator_steps=30",
        "generator_lr=3e-3",
        "seg_steps=10",
        "stages=1",
        "aux_classes=1,2,3",
        "target_classes=4,5,6",
    )
    out = tmp_path / "run"
    run_trainer(lpg, cfg, out, settings=["lpg-stage-1"], progress=False, log=None)
    aux, names, target = lpg.load_datasets(cfg, log=None)
    assert set(names).isdisjoint(target.class_names) and len(target.class_names) == 3
    g = lpg.build_generator(cfg)
    g.load_state_dict(checkpoint.load(out / "generators" / "lpg-stage-1.pt")["model"])
    f = SmallUNet({"logits": 4}, widths=cfg.widths)
    f.load_state_dict(checkpoint.load(out / "checkpoints" / "target__f__box.pt")["model"])
    pseudo = lpg.lpg_pseudo_labels(g, f, target.train, 3, cfg, "cpu")
    boxes = lpg.box_pseudo_labels(target.train, 3)
    for c in (1, 2, 3):  # target channels 1..3 are the synthetic classes 4..6
        in_boxes = sum(int((q == c).sum()) for q in boxes)
        kept = sum(int(((p == c) & (q == c)).sum()) for p, q in zip(pseudo, boxes))
        assert in_boxes > 0 and kept > 0.2 * in_boxes, (c, kept, in_boxes)


def test_box_windows_round_trip():
    """Cropping every box's window and pasting the true object mask back reproduces the masks (the pipeline with
    a perfect generator), and a window past the image edge samples zeros there."""
    samples = _target_batch(8)
    b = collate_samples(samples)
    B, _, H, W = b.images.shape
    masks = b.masks.masked_fill(~b.valid, 255)
    y = lpg.generator_targets(masks, b.boxes, b.box_batch, b.box_labels, 32, 0.25)
    assert y.shape == (b.boxes.shape[0], 32, 32) and set(y.unique().tolist()) <= {0, 1, 255}
    pasted = lpg.paste_windows((y == 1).float(), lpg.box_windows(b.boxes, 0.25), b.box_batch, H, W) > 0.5
    merged = boxloss.merge_box_masks(
        pasted, b.boxes, b.box_batch, b.box_labels, (B, H, W), strategy="overlap-rate", num_classes=6
    )
    assert label_miou(list(merged), [torch.from_numpy(s.mask) for s in samples], 6) > 95
    ones = torch.ones(1, 1, 8, 8)
    crop = lpg.sample_windows(ones, torch.tensor([[-8.0, 0.0, 8.0, 8.0]]), torch.tensor([0]), 4)
    assert torch.equal(crop[0, 0, :, :2], torch.zeros(4, 2)) and torch.equal(crop[0, 0, :, 2:], torch.ones(4, 2))
    big = lpg.sample_windows(
        ones.expand(2, 1, 8, 8), torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 4.0, 4.0]]), torch.tensor([1, 0]), 2
    )
    assert torch.allclose(big, torch.ones_like(big))
    assert lpg.sample_windows(ones, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 4).shape == (0, 1, 4, 4)


def test_real_data_split_drops_the_target_classes(tmp_path):
    """--set aux=coco:... with data=voc:...: the auxiliary classes are COCO's minus those the target names (COCO's
    spellings of VOC's classes included), relabelled 1..L; their objects become background."""
    cfg = SyntheticConfig(seed=5, num_classes=4, image_size=48)
    coco_names = ["person", "dining table", "giraffe", "zebra"]
    voc_names = ["person", "diningtable", "cat"]
    aux_samples = [generate_sample(cfg, "train", i) for i in range(10)]
    files = export_coco({"train": aux_samples}, tmp_path / "coco", coco_names, image_format="png")
    tcfg = SyntheticConfig(seed=6, num_classes=3, image_size=48)
    export_voc(
        {
            "train": [generate_sample(tcfg, "train", i) for i in range(6)],
            "val": [generate_sample(tcfg, "val", i) for i in range(3)],
        },
        tmp_path / "voc",
        voc_names,
        image_format="png",
    )
    config = tiny_config(f"aux=coco:{files['train']}:{tmp_path / 'coco' / 'train'}", f"data=voc:{tmp_path / 'voc'}")
    aux, names, target = lpg.load_datasets(config, log=None)
    assert names == ("giraffe", "zebra") and target.class_names == tuple(voc_names)
    kept = [s for s in (aux_samples[i] for i in range(10)) if s is not None]
    for i in range(len(aux)):
        a = aux[i]
        original = next(s for s in kept if s.image_id == a.image_id)
        assert set(a.labels.tolist()) <= {1, 2}
        assert (a.labels == original.labels[np.isin(original.labels, [3, 4])] - 2).all()
        expect = np.where(
            np.isin(original.mask, [1, 2]),
            0,
            np.where(original.mask == 255, 255, np.maximum(original.mask.astype(int) - 2, 0)),
        )
        assert (a.mask == expect).all()
    with pytest.raises(ConfigError, match="must not intersect.*person"):
        lpg.load_datasets(dataclasses.replace(config, aux_classes=(1, 3)), log=None)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"aux_classes": (1, 2), "target_classes": (2, 3)}, "class-disjoint"),
        ({"aux_classes": (0,)}, "aux_classes must be distinct class channels"),
        ({"stages": 0}, "stages must be >= 1"),
        ({"generator": "unet"}, "generator must be one of"),
        ({"crop_size": 20}, "crop_size .20. must be a multiple"),
        ({"seg_optimizer": "lbfgs"}, "seg_optimizer must be"),
        ({"crf_box_confidence": 1.5}, "crf_box_confidence must be a probability"),
        ({"crf_gaussian_sxy": float("nan")}, "crf_gaussian_sxy must be a positive finite number"),
        ({"num_classes": 20}, "none is left for the auxiliary set"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path, change, words):
    cfg = dataclasses.replace(tiny_config(), **change)
    with pytest.raises(ConfigError, match=words):
        _run(cfg, tmp_path / "run")


def test_generators_folder_is_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="lpg-stage-1.pt is missing"):
        _run(tiny_config(f"generators={tmp_path}"), tmp_path / "run")
    g = lpg.build_generator(tiny_config("generator_width=16"))
    for s in (1, 2):
        checkpoint.atomic_save(
            {
                "stage": s,
                "model": g.state_dict(),
                "architecture": {
                    "generator": "hourglass",
                    "generator_width": 16,
                    "generator_depth": 2,
                    "generator_stacks": 1,
                    "generator_stride": 2,
                    "crop_size": 16,
                    "crop_context": 0.25,
                },
            },
            tmp_path / "g" / f"lpg-stage-{s}.pt",
        )
    with pytest.raises(ConfigError, match="generator_width=16"):
        _run(tiny_config(f"generators={tmp_path / 'g'}"), tmp_path / "run2")


def test_class_box_maps_match_the_library_union():
    b = collate_samples(_target_batch(8))
    union = boxloss.boxes_to_masks(b.boxes, b.box_batch, b.box_labels, (8, 48, 48), 6, form="union")
    assert torch.equal(lpg.class_box_maps(b.boxes, b.box_batch, b.box_labels, 48, 48), union[b.box_batch, b.box_labels])
    boxes = torch.tensor([[0.3, 0.6, 4.5, 5.49], [1.0, 1.0, 2.0, 2.0], [6.2, 6.0, 6.7, 7.0]])  # fractional edges
    batch, labels = torch.tensor([0, 0, 0]), torch.tensor([1, 1, 2])
    union = boxloss.boxes_to_masks(boxes, batch, labels, (1, 8, 8), 2, form="union")
    assert torch.equal(lpg.class_box_maps(boxes, batch, labels, 8, 8), union[batch, labels])
