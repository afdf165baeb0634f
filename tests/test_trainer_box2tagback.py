"""The Box to Tag and Back trainer end to end on tiny data, killed and resumed, and its command-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boxloss.trainers import box2tagback

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--set",
    "pretrained=none",
    "--set",
    "train_images=24",
    "--set",
    "val_images=6",
    "--set",
    "image_size=64",
    "--set",
    "num_classes=2",
    "--set",
    "crop_size=32",
    "--set",
    "crop_min_side=6",
    "--set",
    "single_steps=4",
    "--set",
    "final_steps=4",
    "--set",
    "single_batch=4",
    "--set",
    "batch_size=4",
    "--set",
    "widths=8,8,16,16",
    "--set",
    "log_every=1",
    "--set",
    "checkpoint_every=2",
    "--threads",
    "1",
    "--no-progress",
]
EXPECTED = (
    {("1", s, "fbeta") for s in ("box", "grabcut", "densecrf", "ours", "ours(T)", "ours(T+N)")}
    | {("2", s, m) for s in ("overlap-small", "overlap-void", "overlap-back-void") for m in ("miou", "void_percent")}
    | {("final", s, "miou") for s in ("final", "final-no-crf", "final-box-labels")}
)


def _cli(*args, env_extra=None, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), BOXLOSS_DATA_CACHE=kw.pop("cache"))
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "boxloss.trainers", *args], env=env, capture_output=True, text=True, timeout=900, **kw
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("b2t") / "run"
    r = _cli("box2tagback", "--out", str(out), *TINY, cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _rows(out):
    return {
        (r["table"], r["setting"], r["metric"]): r["value"]
        for r in json.loads((out / "results.json").read_text())["rows"]
    }


def test_pipeline_writes_every_row_figures_and_checkpoints(full_run):
    doc = json.loads((full_run / "results.json").read_text())
    assert doc["trainer"] == "box2tagback" and doc["preset"] == "quick" and doc["seed"] == 0
    assert set(_rows(full_run)) == EXPECTED
    assert all(v is not None for v in _rows(full_run).values())
    t = doc["timing"]
    assert t["train_s"] > 0 and 0 <= t["loss_share"] <= 1 and "final/final" in t["jobs"]
    for fig in ("pseudo_ground_truth.png", "final_predictions.png", "loss_curves.png"):
        assert (full_run / "figures" / fig).stat().st_size > 1000
    assert (full_run / "results.md").read_text().startswith("# box2tagback")
    ckpts = {p.name for p in (full_run / "checkpoints").iterdir()}
    assert "final__final.pt" in ckpts and "single__ours_T_N___class-1.pt" in ckpts
    assert (full_run / "metrics.jsonl").read_text().count("\n") > 10


def test_killed_run_resumes_to_the_same_results(tmp_path, full_run, cache):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), BOXLOSS_DATA_CACHE=cache)
    proc = subprocess.Popen(
        [sys.executable, "-m", "boxloss.trainers", "box2tagback", "--out", str(out), *TINY],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # kill it in the middle of training: once a checkpoint of a single-class network exists
    deadline = time.time() + 600
    while time.time() < deadline and not list((out / "checkpoints").glob("single__ours_T___class-1.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    r = _cli("box2tagback", "--out", str(out), "--resume", *TINY, cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at step" in r.stdout + r.stderr or "finished earlier" in r.stdout + r.stderr
    assert _rows(out) == _rows(full_run)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--data", "voc:/no/such/voc"], "is not a folder"),
        (["--data", "coco:/no/such.json:/tmp"], "does not exist"),
        (["--data", "imagenet"], "--data must be"),
        (["--set", "no_such_setting=1"], "no such setting"),
        (["--set", "single_steps=many"], "expected int"),
        (["--settings", "ours,nonsense"], "unknown nonsense"),
    ],
)
def test_bad_command_lines_are_clear_errors(tmp_path, cache, args, words):
    r = _cli("box2tagback", "--out", str(tmp_path / "run"), *TINY, *args, cache=cache)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_existing_run_directory_is_refused(tmp_path, cache):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = _cli("box2tagback", "--out", str(out), *TINY, cache=cache)
    assert r.returncode == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_corrupt_checkpoint_is_named(tmp_path, full_run, cache):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    bad = out / "checkpoints" / "final__final.pt"
    bad.write_bytes(b"not a checkpoint")
    r = _cli("box2tagback", "--out", str(out), "--resume", *TINY, cache=cache)
    assert r.returncode == 2 and "final__final.pt" in r.stderr


def test_config_defaults_are_the_papers():
    cfg = box2tagback.Config()
    assert (cfg.crop_border, cfg.crop_min_side, cfg.crop_size, cfg.s_min, cfg.lambda_crf, cfg.sigma) == (
        3,
        50,
        256,
        0.3,
        100.0,
        0.15,
    )
    quick = box2tagback.Config.from_preset("quick")
    assert quick.preset == "quick" and quick.crop_size < cfg.crop_size
