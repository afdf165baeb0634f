"""The BANA trainer: a smoke run of the whole pipeline on tiny data, its rows, resume, its CRF and its bad inputs."""

import json

import numpy as np
import pytest
import torch

import boxloss
from boxloss.trainers import bana
from boxloss.trainers.__main__ import main, run_trainer
from boxloss.trainers.engine.config import ConfigError

TINY = [
    "pretrained=none",
    "train_images=10",
    "val_images=4",
    "image_size=48",
    "widths=8,8,16,16",
    "batch_size=4",
    "feature_dim=8",
    "seg_feature_dim=8",
    "stage1_steps=3",
    "seg_steps=2",
    "crf_iterations=2",
    "figures=2",
    "log_every=1",
]
TABLE1 = ["box", "grabcut", "gap", "bap-crf-no-u0", "bap-crf", "bap-ret"]
TABLE3 = ["baseline", "baseline-crf", "entropy", "entropy-crf", "bootstrap", "bootstrap-crf", "nal", "nal-crf"]


def _config(*extra):
    return bana.Config.from_preset("quick", TINY + list(extra), threads=1)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bana") / "run"
    results = run_trainer(bana, _config(), out, settings=list(bana.SETTINGS), progress=False, log=lambda s: None)
    return out, results


def test_smoke_run_writes_exactly_the_rows_figures_and_checkpoints(smoke_run):
    out, results = smoke_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["table"], r["setting"], r["metric"]) for r in rows] == (
        [("1", s, "miou") for s in TABLE1] + [("3", s, "miou") for s in TABLE3]
    )
    assert all(0.0 <= r["value"] <= 100.0 for r in rows)
    for name in ("attention_and_cams", "pseudo_labels", "confidence", "predictions", "loss_curves"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 0
    for job in (
        "stage1__gap",
        "stage1__bap",
        "stage2__baseline",
        "stage2__entropy",
        "stage2__bootstrap",
        "stage2__nal",
    ):
        assert torch.load(out / "checkpoints" / f"{job}.pt", weights_only=True)["done"]
    # The confidence map of Fig. 5 at 0, 1/4, ..., all of training (steps 0, 0, 1, 2, 2 of 2 -> 0, 1, 2).
    maps = torch.load(out / "cache" / "stage2__nal-confidence.pt", weights_only=True)
    assert sorted(maps) == [0, 1, 2] and all(((m >= 0) & (m <= 1)).all() for m in maps.values())
    jobs = results.timing["jobs"]
    assert jobs["stage1/bap"]["steps"] == 3 and jobs["stage2/nal"]["steps"] == 2


def test_box_row_is_the_filled_boxes(smoke_run):
    """Table 1's box row recomputed independently: each box filled, the smaller box in front."""
    out, results = smoke_run
    cfg = _config()
    from boxloss.trainers.engine.data import load_splits
    from boxloss.trainers.engine.evaluate import label_miou

    train = load_splits(
        "synthetic",
        num_classes=cfg.num_classes,
        image_size=cfg.image_size,
        train_images=cfg.train_images,
        val_images=cfg.val_images,
    ).train
    preds = []
    for s in train:
        p = np.zeros(s.mask.shape, np.int64)
        area = (s.boxes[:, 2] - s.boxes[:, 0]) * (s.boxes[:, 3] - s.boxes[:, 1])
        # painted largest first; of equal boxes the lower index ends in front
        for k in np.lexsort((-np.arange(s.num_boxes), -area)):
            x0, y0, x1, y1 = s.boxes[k]
            # a box covers the pixels whose centres lie in [lo, hi) (the convention of boxloss.boxes)
            ys, xs = np.arange(s.height) + 0.5, np.arange(s.width) + 0.5
            inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None]
            p[inside] = s.labels[k]
        preds.append(torch.from_numpy(p))
    expected = label_miou(preds, [torch.from_numpy(s.mask) for s in train], cfg.num_classes)
    assert results.value("1", "box", "miou") == pytest.approx(expected, abs=0.01)


def test_resume_loads_every_stage_and_gives_the_same_rows(smoke_run, tmp_path):
    out, results = smoke_run
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = run_trainer(
        bana, _config(), copy, settings=list(bana.SETTINGS), resume=True, progress=False, log=lambda s: None
    )
    assert again.rows == results.rows


def test_table3_alone_trains_only_what_it_needs(tmp_path):
    out = tmp_path / "nal"
    res = run_trainer(bana, _config(), out, settings=["nal"], progress=False, log=lambda s: None)
    assert [(r["table"], r["setting"]) for r in res.rows] == [("3", "nal"), ("3", "nal-crf")]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["stage1__bap.pt", "stage2__nal.pt"]


def test_crf_inference_is_the_unaries_without_pairwise_terms_and_smooths_with_them():
    g = torch.Generator().manual_seed(0)
    unary = -torch.log_softmax(torch.randn(2, 3, 12, 10, generator=g), 1)
    image = torch.rand(2, 3, 12, 10, generator=g) * 255
    q = bana.crf_inference(
        unary, image, backend="pydensecrf", bilateral=(0.0, 5.0, 10.0), gaussian=(0.0, 3.0), iterations=3
    )
    torch.testing.assert_close(q, torch.softmax(-unary, 1), atol=1e-5, rtol=1e-4)
    # A flat image and strong smoothing pull a noisy label map towards its majority.
    truth = torch.zeros(1, 12, 10, dtype=torch.long)
    noisy = torch.where(torch.rand(1, 12, 10, generator=g) < 0.2, 1, truth)
    unary = -torch.log(torch.nn.functional.one_hot(noisy, 2).permute(0, 3, 1, 2).float() * 0.5 + 0.25)
    q = bana.crf_inference(
        unary,
        torch.full((1, 3, 12, 10), 128.0),
        backend="pydensecrf",
        bilateral=(5.0, 10.0, 10.0),
        gaussian=(3.0, 2.0),
        iterations=5,
    )
    assert (q.argmax(1) != truth).float().mean() < (noisy != truth).float().mean() / 2
    assert torch.allclose(q.sum(1), torch.ones(1, 12, 10), atol=1e-4)


@pytest.mark.parametrize(
    "item, words",
    [
        ("crf_backend=densecrf", "crf_backend must be one of"),
        ("classifier=dot", "classifier must be one of"),
        ("stage1_optimizer=adam", "stage1_optimizer must be one of"),
        ("bg_threshold=1.5", "bg_threshold must lie in"),
        ("grid_size=0", "grid_size must be >= 1"),
        ("crf_bilateral=4,0,3", "sigmas must be > 0"),
        ("crf_gaussian=3", "crf_gaussian"),
        ("tau=0", "tau must be > 0"),
        ("seg_steps=-1", "seg_steps must be >= 0"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_made(item, words):
    with pytest.raises(ConfigError, match=words):
        _config(item)


@pytest.mark.skipif(hasattr(boxloss, "dense_crf_inference"), reason="boxloss has its own DenseCRF inference")
def test_boxloss_backend_without_the_op_is_a_clear_error():
    with pytest.raises(ConfigError, match="dense_crf_inference"):
        bana.check_backend(_config("crf_backend=boxloss"))


def test_command_line_names_bad_input(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["bana", "--out", out, "--settings", "box,nal2", "--threads", "1"]) == 2
    assert "unknown nal2" in capsys.readouterr().err
    args = ["bana", "--out", out, "--threads", "1", "--no-progress", "--settings", "box"]
    for item in TINY:
        args += ["--set", item]
    assert main(args + ["--set", "crf_backend=nope"]) == 2
    assert "crf_backend must be one of" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before a run directory was made
    assert main(args) == 0
    assert main(args) == 2  # the run is there: never overwritten unasked
    assert "already holds files" in capsys.readouterr().err
