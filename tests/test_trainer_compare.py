"""The compare trainer on tiny data: every row from its trainer's own run, the figures, the common budget passed to
every trainer, --seeds, the paper preset's code path, reproducibility, bad input."""

import json

import pytest

from boxloss.trainers import compare
from boxloss.trainers.__main__ import main

ROWS = ("box", "full", "box2tagback", "box2seg", "bana", "lpg", "uncertainty", "uncertainty-boxes-only")
WITH_PSEUDO = ("box", "box2tagback", "box2seg", "bana", "lpg")
#: tiny sizes for every trainer (the compare run's common budget, then each trainer's own stages)
TINY = [
    "pretrained=none",
    "image_size=32",
    "train_images=12",
    "val_images=4",
    "batch_size=2",
    "final_steps=4",
    "widths=4,8,8,8",
    "log_every=1",
    "box2tagback=crop_size=32;crop_min_side=4;single_steps=2;single_batch=4",
    "box2seg=embedding_pretrain_steps=1;embedding_dim=4;grabcut_iterations=1",
    "bana=feature_dim=8;seg_feature_dim=8;stage1_steps=2;crf_iterations=2",
    "lpg=aux_images=8;generator_steps=2;generator_batch=2;generator_width=8;generator_depth=2;crop_size=16",
    "uncertainty=samples=2",
]
#: the paper presets' stages before the final network, cut to tiny sizes as well
PAPER_TINY = [
    "box2tagback=crop_size=32;crop_min_side=4;single_steps=2;single_batch=4",
    "box2seg=embedding_pretrain_steps=1;embedding_dim=4;grabcut_iterations=1",
    "bana=feature_dim=8;seg_feature_dim=8;stage1_steps=2;crf_iterations=2",
    "lpg=aux_images=8;generator_steps=2;generator_batch=2;generator_width=8;generator_depth=2;generator_stacks=1;"
    "crop_size=16",
    "uncertainty=samples=2",
]


def _args(out, *more, sets=TINY, preset="quick"):
    args = ["compare", "--preset", preset, "--out", str(out), "--threads", "1", "--no-progress"]
    for item in sets:
        args += ["--set", item]
    return args + list(more)


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BOXLOSS_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "data"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BOXLOSS_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "data"))
        assert main(_args(out)) == 0
    return out


def _rows(path):
    return json.loads((path / "results.json").read_text())["rows"]


def _results(rows, metrics=("miou", "gap", "pseudo_miou")):
    """The rows that are results (the timings and memory are measurements of the machine)."""
    return sorted((r["setting"], r["metric"], r["value"]) for r in rows if r["metric"] in metrics)


def test_every_row_and_both_figures(smoke_run):
    rows = _rows(smoke_run)
    assert {r["table"] for r in rows} == {"compare"}
    got = {(r["setting"], r["metric"]) for r in rows}
    for setting in ROWS:
        for metric in ("miou", "gap", "train_s", "wall_s", "step_ms", "peak_mib"):
            assert (setting, metric) in got, (setting, metric)
        assert ((setting, "pseudo_miou") in got) == (setting in WITH_PSEUDO), setting
    values = {(r["setting"], r["metric"]): r["value"] for r in rows}
    for setting in ROWS:
        assert 0 <= values[(setting, "miou")] <= 100
        assert values[(setting, "gap")] == pytest.approx(values[(setting, "miou")] - values[("full", "miou")], abs=2e-4)
        assert values[(setting, "step_ms")] > 0 and values[(setting, "peak_mib")] > 0
    assert values[("full", "gap")] == 0
    text = (smoke_run / "results.md").read_text()
    assert "| setting | miou | gap | pseudo_miou | train_s | wall_s | step_ms | peak_mib |" in text
    assert all(f"| {s} |" in text for s in ROWS)
    for name in ("miou.png", "segmentations.png"):
        assert (smoke_run / "figures" / name).stat().st_size > 1000


def test_rows_are_read_from_each_trainers_own_run(smoke_run):
    rows = {(r["setting"], r["metric"]): r["value"] for r in _rows(smoke_run)}
    table = compare.methods(compare.Config.from_preset("quick", TINY))
    for setting in ROWS:
        sub = json.loads((smoke_run / setting / "results.json").read_text())
        method = table[setting]
        assert sub["trainer"] == method.trainer
        own = {(r["table"], r["setting"], r["metric"]): r["value"] for r in sub["rows"]}
        assert rows[(setting, "miou")] == own[(*method.row, "miou")]
        if isinstance(method.pseudo, tuple):
            assert rows[(setting, "pseudo_miou")] == own[(*method.pseudo, "miou")]
        # the final network's step time is the one its trainer measured
        assert rows[(setting, "step_ms")] == sub["timing"]["jobs"][method.final_job]["step_ms"]
    box2seg_notes = json.loads((smoke_run / "box2seg" / "results.json").read_text())["notes"]
    assert any(f"mIoU {rows[('box2seg', 'pseudo_miou')]:.2f}" in n for n in box2seg_notes)
    # the figure's predictions: one label map per row, of the figure image's size
    from boxloss.trainers.engine import checkpoint

    saved = checkpoint.load(smoke_run / "predictions.pt")
    assert list(saved["predictions"]) == list(ROWS)
    assert all(p.shape == saved["truth"].shape for p in saved["predictions"].values())


def test_every_trainer_gets_the_common_budget(smoke_run):
    cfg = compare.Config.from_preset("quick", TINY)
    for setting in ROWS:
        sub = json.loads((smoke_run / setting / "config.json").read_text())["config"]
        assert (sub["preset"], sub["image_size"], sub["train_images"], sub["val_images"], sub["batch_size"]) == (
            "quick",
            32,
            12,
            4,
            2,
        ), setting
        assert (sub["seed"], sub["widths"], sub["pretrained"], sub["data"]) == (0, [4, 8, 8, 8], "none", "synthetic")
        method = compare.methods(cfg)[setting]
        steps = sub[method.steps]
        assert steps == (4 // 4 if setting == "lpg" else 4), setting  # LPG: f over its box stage and 3 stages
        assert sub[method.optimizer] == "adamw" and all(sub[k] == 1e-3 for k in method.lr)
    assert json.loads((smoke_run / "uncertainty" / "config.json").read_text())["config"]["multi_classes"] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    fractions = [
        json.loads((smoke_run / s / "config.json").read_text())["config"]["pixel_perfect_fraction"]
        for s in ("uncertainty", "uncertainty-boxes-only")
    ]
    assert fractions == [pytest.approx(500 / 2780), 0.0]


def test_same_command_and_seed_give_the_same_table(smoke_run, tmp_path):
    assert main(_args(tmp_path / "again")) == 0
    first, second = _rows(smoke_run), _rows(tmp_path / "again")
    assert _results(first) == _results(second)
    assert len(_results(first)) == 2 * len(ROWS) + len(WITH_PSEUDO)


def test_seeds_aggregate_with_spread_and_figures(tmp_path):
    out = tmp_path / "seeds"
    assert main(_args(out, "--seeds", "0,1", "--settings", "box,full")) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["seed"] == [0, 1]
    rows = {(r["setting"], r["metric"]): r for r in saved["rows"]}
    for setting in ("box", "full"):
        per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
        values = [
            next(r["value"] for r in p["rows"] if (r["setting"], r["metric"]) == (setting, "miou")) for p in per_seed
        ]
        assert rows[(setting, "miou")]["values"] == values
        assert rows[(setting, "miou")]["value"] == pytest.approx(sum(values) / 2, abs=1e-4)
        assert "std" in rows[(setting, "miou")]
    for name in ("miou.png", "segmentations.png"):
        assert (out / "figures" / name).stat().st_size > 1000


def test_paper_preset_passes_through_to_each_trainers_paper_preset(tmp_path):
    """The code path of ``--preset paper`` (each trainer's paper preset plus the common budget) at tiny sizes; the
    papers' scale needs VOC and a GPU and is not run here."""
    out = tmp_path / "paper"
    sets = [
        "pretrained=none",
        "image_size=32",
        "train_images=12",
        "val_images=4",
        "batch_size=2",
        "final_steps=4",
        "widths=4,8,8,8",
    ] + PAPER_TINY
    assert main(_args(out, sets=sets, preset="paper")) == 0
    rows = {(r["setting"], r["metric"]) for r in _rows(out)}
    assert all((s, "miou") in rows for s in ROWS)
    b2t = json.loads((out / "box2tagback" / "config.json").read_text())["config"]
    assert (b2t["preset"], b2t["final_optimizer"], b2t["final_lr"], b2t["final_steps"]) == ("paper", "sgd", 1e-4, 4)
    bana_cfg = json.loads((out / "bana" / "config.json").read_text())["config"]
    assert (bana_cfg["preset"], bana_cfg["seg_optimizer"], bana_cfg["crf_reference_size"]) == ("paper", "sgd", 0)


def test_sub_config_keeps_each_trainers_own_values_where_the_budget_is_unset():
    cfg = compare.Config.from_preset("paper", ["data=voc:/nowhere"])
    assert cfg.image_size is None and cfg.batch_size is None and cfg.final_steps == 20000
    b2s = compare.sub_config(cfg, "box2seg", 20)
    assert (b2s.image_size, b2s.batch_size, b2s.steps, b2s.optimizer) == (513, 16, 20000, "sgd")
    lpg = compare.sub_config(cfg, "lpg", 20)
    assert (lpg.image_size, lpg.batch_size, lpg.seg_steps) == (321, 30, 5000)
    unc = compare.sub_config(cfg, "uncertainty", 20)
    assert unc.multi_classes == tuple(range(1, 21)) and unc.image_size == 512
    # on the synthetic benchmark every row sees one split
    synthetic = compare.Config.from_preset("paper")
    assert {compare.sub_config(synthetic, s, 6).image_size for s in ROWS} == {256}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--settings", "box,nope"], "--settings: unknown nope"),
        (["--set", "final_optimizer=rmsprop"], "final_optimizer must be one of sgd, adamw"),
        (["--set", "final_steps=many"], "--set final_steps: expected int, got 'many'"),
        (["--set", "final_steps=0"], "final_steps must be at least 1"),
        (["--set", "bana=stage1_steps"], "bana takes 'key=value;key=value' overrides"),
        (["--set", "lpg=no_such_setting=1"], "row lpg (lpg trainer): --set no_such_setting: no such setting"),
        (["--set", "bana=classifier=svm"], "row bana (bana trainer): bana: classifier must be one of"),
        (["--set", "figure_image=-1"], "figure_image must be >= 0"),
        (["--set", "no_such=1"], "--set no_such: no such setting of Config"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
    assert main(["compare", "--out", str(tmp_path / "bad"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before a run directory is made


def test_missing_data_and_a_figure_image_past_the_split_are_clear_errors(tmp_path, capsys):
    assert main(_args(tmp_path / "voc", "--data", "voc:" + str(tmp_path / "no-voc"))) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(_args(tmp_path / "fig", sets=TINY + ["figure_image=4"])) == 2
    assert "figure_image must be below the 4 validation images" in capsys.readouterr().err
