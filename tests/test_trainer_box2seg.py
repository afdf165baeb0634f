"""The Box2Seg trainer on tiny data: every Table 3 row, the GrabCut cache, the losses of the rows, bad input."""

import json
import warnings

import numpy as np
import pytest
import torch

import boxloss
from boxloss.trainers import box2seg
from boxloss.trainers.__main__ import main, run_trainer
from boxloss.trainers.engine.config import ConfigError
from boxloss.trainers.engine.run import RunDirectoryError
from boxloss.trainers.single_stage import TrainBatch

TINY = [
    "pretrained=none",
    "image_size=32",
    "train_images=10",
    "val_images=4",
    "batch_size=2",
    "steps=2",
    "embedding_pretrain_steps=1",
    "widths=4,8,8,8",
    "embedding_dim=4",
    "figures=2",
    "grabcut_iterations=1",
    "log_every=1",
]


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BOXLOSS_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "data"))


def _config(*more, **values):
    return box2seg.Config.from_preset("quick", TINY + list(more), threads=1, **values)


def _run(out, *more, settings=None, **values):
    lines = []
    results = run_trainer(
        box2seg,
        _config(*more, **values),
        out,
        settings=settings or list(box2seg.SETTINGS),
        progress=False,
        log=lines.append,
    )
    return results, "\n".join(lines)


def test_every_table3_row_figures_and_checkpoints(tmp_path):
    results, log = _run(tmp_path / "run")
    rows = {(r["table"], r["setting"], r["metric"]) for r in results.rows}
    assert rows == {
        ("3", s, "miou") for s in ("grabcut-no-train", "box", "grabcut", "affinity", "aw-box", "aw-fr", "box2seg")
    }
    assert len(results.rows) == len(rows)
    assert all(0 <= r["value"] <= 100 for r in results.rows)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["rows"] == results.rows and saved["timing"]["loss_share"] is not None
    for name in ("attention.png", "loss_curves.png"):
        assert (tmp_path / "run" / "figures" / name).stat().st_size > 0
    for job in ("embedding-pretrain", "table3/box", "table3/aw-fr", "table3/box2seg"):
        assert (tmp_path / "run" / "checkpoints" / (job.replace("/", "__") + ".pt")).is_file()
    # Sec. 4.1: the rows with the affinity loss start from the embedding pre-training, the others do not
    assert "[table3/box2seg] encoder, decoder and embedding head from the embedding pre-training" in log
    assert "[table3/affinity] encoder, decoder and embedding head from the embedding pre-training" in log
    assert "[table3/aw-fr] encoder, decoder" not in log
    assert any("GrabCut pseudo labels M on the training images" in n for n in results.notes)


def test_grabcut_cache_is_reused_and_keyed_by_data_and_settings(tmp_path):
    _, first = _run(tmp_path / "a", settings=["grabcut"])
    assert "GrabCut pseudo labels of 10 training images: 10 computed" in first
    files = sorted((tmp_path / "grabcut-cache").iterdir())
    assert files
    _, second = _run(tmp_path / "b", settings=["grabcut"])
    assert "10 training images: 0 computed, 10 read" in second
    assert sorted((tmp_path / "grabcut-cache").iterdir()) == files
    _, other_setting = _run(tmp_path / "c", "grabcut_iterations=2", settings=["grabcut"])
    assert "10 training images: 10 computed" in other_setting
    _, other_data = _run(tmp_path / "d", "data_seed=1", settings=["grabcut"])
    assert "10 training images: 10 computed" in other_data
    # corrupt files are recomputed, not trusted
    for f in files:
        f.write_bytes(b"not a checkpoint")
    _, repaired = _run(tmp_path / "e", settings=["grabcut"])
    assert "10 training images: 10 computed" in repaired


def test_cached_labels_are_grabcut_merged_smaller_box_in_front(tmp_path):
    from boxloss.trainers.engine.context import Context
    from boxloss.trainers.engine.results import Results
    from boxloss.trainers.engine.run import Run
    from boxloss.trainers.single_stage import load_data

    cfg = _config()
    ctx = Context(
        cfg,
        Run(tmp_path / "r", "box2seg", cfg.to_dict(), log=None),
        torch.device("cpu"),
        Results("box2seg", "quick", 0),
        log=lambda s: None,
    )
    splits = load_data(ctx)
    labels = box2seg.grabcut_labels(ctx, splits.train, splits.num_classes, "training")
    again = box2seg.grabcut_labels(ctx, splits.train, splits.num_classes, "training")
    s = next(s for s in splits.train if s.num_boxes >= 2)
    i = list(splits.train).index(s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # boxes too small for GrabCut are filled, with a warning
        masks = boxloss.grabcut_box_masks(s.image, s.boxes, iterations=cfg.grabcut_iterations)
    expected = boxloss.merge_box_masks(
        masks,
        torch.from_numpy(s.boxes),
        torch.zeros(s.num_boxes, dtype=torch.long),
        torch.from_numpy(s.labels),
        (1, s.height, s.width),
        strategy="overlap-small",
        num_classes=splits.num_classes,
    )[0]
    assert np.array_equal(labels[i], expected.numpy()) and np.array_equal(again[i], labels[i])
    assert labels[i].dtype == np.uint8 and set(np.unique(labels[i])) <= set(range(splits.num_classes + 1))


def _batch(L=3, B=2, H=12, W=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[1.0, 1.0, 8.0, 9.0], [4.0, 3.0, 11.0, 11.0], [0.0, 0.0, 6.0, 6.0]])
    target = torch.randint(0, L + 1, (B, H, W), generator=g)
    target[0, 0, :3] = 255
    return TrainBatch(
        torch.rand(B, 3, H, W, generator=g),
        target,
        torch.ones(B, H, W, dtype=torch.bool),
        boxes,
        torch.tensor([0, 0, 1]),
        torch.tensor([1, 3, 2]),
        torch.zeros(B, dtype=torch.bool),
    )


def _outputs(cfg, L=3, B=2, H=12, W=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "logits": torch.randn(B, L + 1, H, W, generator=g),
        "attention": torch.randn(B, L, H, W, generator=g),
        "embedding": torch.randn(B, cfg.embedding_dim, H, W, generator=g),
    }


def test_each_row_trains_the_terms_of_table3():
    cfg = box2seg.Config(affinity_mode="exact")
    batch, out = _batch(), _outputs(box2seg.Config())
    y = out["logits"].softmax(1)
    alpha = torch.sigmoid(out["attention"])
    B = boxloss.boxes_to_masks(batch.boxes, batch.box_batch, batch.box_labels, (2, 12, 12), 3)
    M = batch.target
    expected = {
        "box": {"box": boxloss.box_ce_loss(y, B)},
        "grabcut": {"gc": boxloss.pseudo_label_ce_loss(y, M)},
        "affinity": {
            "gc": boxloss.pseudo_label_ce_loss(y, M),
            "affinity": boxloss.affinity_loss(out["embedding"], y, mode="exact"),
        },
        "aw-box": {
            "gc": boxloss.pseudo_label_ce_loss(y, M),
            "aw": boxloss.attention_weighted_loss(y, alpha, B),
            "alpha": boxloss.attention_box_regulariser(alpha, B),
        },
        "aw-fr": {
            "gc": boxloss.pseudo_label_ce_loss(y, M),
            "aw": boxloss.attention_weighted_loss(y, alpha, B),
            "alpha": boxloss.fill_rate_hinge_loss(alpha, M, B, gamma=0.7),
        },
    }
    expected["box2seg"] = {**expected["aw-fr"], "affinity": expected["affinity"]["affinity"]}
    weights = {"box": 1, "gc": 1, "affinity": 1, "aw": 10, "alpha": 1}
    for setting, terms in expected.items():
        total, got = box2seg.table3_loss(setting, cfg, 3)(out, batch)
        assert set(got) == set(terms), setting
        for k in terms:
            torch.testing.assert_close(got[k], terms[k])
        torch.testing.assert_close(total, sum(weights[k] * v for k, v in terms.items()))


@pytest.mark.parametrize(
    "override, words",
    [
        ("optimizer=lbfgs", "optimizer must be one of"),
        ("affinity_mode=dense", "affinity_mode must be"),
        ("gamma=1.5", "gamma must lie in"),
        ("sample_fraction=0", "sample_fraction must lie in"),
        ("steps=0", "steps must be at least 1"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, override, words):
    with pytest.raises(ConfigError, match=words):
        _run(tmp_path / "run", override)
    assert not (tmp_path / "grabcut-cache").exists()


def test_command_line_bad_input(tmp_path, capsys):
    assert main(["box2seg", "--out", str(tmp_path / "x"), "--settings", "box,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert main(["box2seg", "--out", str(tmp_path / "x"), "--set", "lambda_aw=ten"]) == 2
    assert "lambda_aw: expected float" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(RunDirectoryError):
        _run(tmp_path / "taken", settings=["box"])
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
