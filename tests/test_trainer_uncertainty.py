"""The label-uncertainty trainer on tiny data: every row of Tables 1-3, the mixed batches, the pixel-perfect subset,
what happens without pixel-perfect images, bad input."""

import json

import numpy as np
import pytest
import torch

import boxloss
from boxloss.trainers import uncertainty
from boxloss.trainers.__main__ import main, run_trainer
from boxloss.trainers.engine.config import ConfigError
from boxloss.trainers.single_stage import TrainBatch

TINY = [
    "pretrained=none",
    "image_size=32",
    "train_images=12",
    "val_images=4",
    "batch_size=2",
    "steps=2",
    "widths=4,8,8,8",
    "figures=2",
    "samples=3",
    "log_every=1",
]


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BOXLOSS_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "data"))


def _config(*more, **values):
    return uncertainty.Config.from_preset("quick", TINY + list(more), threads=1, **values)


def _run(out, *more, settings=None, **values):
    lines = []
    results = run_trainer(
        uncertainty,
        _config(*more, **values),
        out,
        settings=settings or list(uncertainty.SETTINGS),
        progress=False,
        log=lines.append,
    )
    return results, "\n".join(lines)


def test_every_row_of_tables_1_to_3_and_figures(tmp_path):
    results, log = _run(tmp_path / "run")
    rows = [(r["table"], r["setting"], r["metric"]) for r in results.rows]
    assert sorted(rows) == sorted(
        [
            ("2", s, "iou")
            for s in ("bce-all-pp", "bce-pp", "bce-bb", "bce-pp+bb", "uncertainty", "uncertainty+bootstrap")
        ]
        + [("1", "regression-fg", "iou")]
        + [("3", s, "miou") for s in ("ce-all-pp", "ce-pp", "ce-pp+bb", "uncertainty-ce")]
    )
    assert all(r["value"] is None or 0 <= r["value"] <= 100 for r in results.rows)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["rows"] == results.rows
    for name in ("bootstrap_weights.png", "flip_masks.png", "loss_curves.png"):
        assert (tmp_path / "run" / "figures" / name).stat().st_size > 0
    assert "pixel-perfect subset: 2 of 12 training images" in log
    # the uncertainty rows log the variance they learn inside the boxes
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("var_in_boxes" in m for m in metrics if m["job"] == "table2/uncertainty+bootstrap")
    assert any("var_in_boxes" in m for m in metrics if m["job"] == "table3/uncertainty-ce")


def test_pixel_perfect_subset_is_fixed_by_the_seed():
    cfg = uncertainty.Config(pixel_perfect_fraction=0.25)
    a = uncertainty.pixel_perfect_subset(cfg, 40)
    assert a.sum() == 10 and np.array_equal(a, uncertainty.pixel_perfect_subset(cfg, 40))
    other = uncertainty.pixel_perfect_subset(uncertainty.Config(pixel_perfect_fraction=0.25, seed=1), 40)
    assert other.sum() == 10 and not np.array_equal(a, other)
    assert uncertainty.pixel_perfect_subset(uncertainty.Config(), 2780).sum() == 500  # the paper's 500 of 2780


def test_mixed_batches_draw_pixel_perfect_images_with_the_set_probability():
    pp, bb = [("pp", i) for i in range(5)], [("bb", i) for i in range(50)]
    batches = uncertainty.MixedBatches(pp, bb, 8, seed=3, probability=0.25, collate=list, augment=lambda x, r: x)
    steps = [batches.batch(s) for s in range(400)]
    share = np.mean([item[0] == "pp" for b in steps for item in b])
    assert 0.22 < share < 0.28
    assert batches.batch(123) == steps[123]  # a function of (seed, step): resume-exact
    assert {i for b in steps for kind, i in b if kind == "pp"} == set(range(5))
    only_boxes = uncertainty.MixedBatches([], bb, 4, seed=0, probability=0.25, collate=list, augment=lambda x, r: x)
    assert all(kind == "bb" for kind, _ in only_boxes.batch(0))


def _batch(pixel_perfect=(True, False)):
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(2, 10, 10, dtype=torch.long)
    target[:, 2:7, 3:8] = 1
    target[0, 2, 3:8] = 255  # the void band of a true mask
    boxes = torch.tensor([[3.0, 2.0, 8.0, 7.0], [3.0, 2.0, 8.0, 7.0]])
    return TrainBatch(
        torch.rand(2, 3, 10, 10, generator=g),
        target,
        torch.ones(2, 10, 10, dtype=torch.bool),
        boxes,
        torch.tensor([0, 1]),
        torch.tensor([1, 1]),
        torch.tensor(pixel_perfect),
    )


def test_binary_rows_use_the_papers_losses_with_void_left_out():
    cfg = uncertainty.Config()
    batch = _batch()
    g = torch.Generator().manual_seed(1)
    out = {"logits": torch.randn(2, 1, 10, 10, generator=g), "log_var": torch.randn(2, 1, 10, 10, generator=g)}
    mu, s = out["logits"][:, 0], out["log_var"][:, 0]
    in_boxes = torch.zeros(2, 10, 10, dtype=torch.bool)
    in_boxes[:, 2:7, 3:8] = True
    for setting, bootstrap in (("uncertainty", False), ("uncertainty+bootstrap", True)):
        value, _ = uncertainty.binary_loss(setting, cfg)(out, batch)
        torch.testing.assert_close(
            value,
            boxloss.uncertainty_bce_loss(
                mu, s, batch.target, in_boxes, tau=2.5, bootstrap=bootstrap, pixel_perfect=batch.pixel_perfect
            ),
        )
    value, _ = uncertainty.binary_loss("regression-fg", cfg)(out, batch)
    torch.testing.assert_close(
        value, boxloss.uncertainty_l2_loss(mu, s, batch.target, in_boxes, pixel_perfect=batch.pixel_perfect)
    )
    value, _ = uncertainty.binary_loss("bce-pp+bb", cfg)(out, batch)
    known = batch.target != 255
    torch.testing.assert_close(
        value, torch.nn.functional.binary_cross_entropy_with_logits(mu[known], batch.target[known].float())
    )


def test_no_pixel_perfect_images_is_refused_or_warned(tmp_path):
    with pytest.raises(ConfigError, match="allow_no_pixel_perfect"):
        _run(tmp_path / "a", "pixel_perfect_fraction=0", settings=["uncertainty+bootstrap"])
    with pytest.raises(ConfigError, match="bce-pp: no pixel-perfect"):
        _run(tmp_path / "b", "pixel_perfect_fraction=0", "allow_no_pixel_perfect=true", settings=["bce-pp"])
    results, log = _run(
        tmp_path / "c",
        "pixel_perfect_fraction=0",
        "allow_no_pixel_perfect=true",
        settings=["bce-bb", "uncertainty+bootstrap"],
    )
    assert "WARNING" in log and any("uncertainty+bootstrap" in n for n in results.notes)
    assert [r["setting"] for r in results.rows] == ["bce-bb", "uncertainty+bootstrap"]
    # boxes alone need no pixel-perfect image: no warning
    results, log = _run(tmp_path / "d", "pixel_perfect_fraction=0", settings=["bce-bb"])
    assert "WARNING" not in log and not results.notes


@pytest.mark.parametrize(
    "override, words",
    [
        ("pixel_perfect_fraction=1.5", "pixel_perfect_fraction must lie in"),
        ("pp_probability=-0.1", "pp_probability must lie in"),
        ("binary_class=9", "binary_class must be a class channel in 1..6"),
        ("multi_classes=1,1", "classes must be distinct class channels"),
        ("multi_classes=0,2", "classes must be distinct class channels"),
        ("samples=0", "samples must be at least 1"),
        ("optimizer=rmsprop", "optimizer must be one of"),
    ],
)
def test_bad_settings_are_refused(tmp_path, override, words):
    with pytest.raises(ConfigError, match=words):
        _run(tmp_path / "run", override, settings=["bce-bb", "ce-pp"])


def test_command_line_bad_input(tmp_path, capsys):
    assert main(["uncertainty", "--out", str(tmp_path / "x"), "--settings", "uncertainty,bce"]) == 2
    assert "unknown bce" in capsys.readouterr().err
    assert main(["uncertainty", "--out", str(tmp_path / "y"), "--set", "tau=high"]) == 2
    assert "tau: expected float" in capsys.readouterr().err
