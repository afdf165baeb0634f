"""The trainers' engine: config overrides, run directories, checkpoints, resume, batches, results, distributed."""

import json
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import boxloss
from boxloss.trainers.engine import checkpoint, distributed
from boxloss.trainers.engine.config import ConfigError, TrainerConfig, apply_overrides
from boxloss.trainers.engine.data import Batches
from boxloss.trainers.engine.loop import TrainingDiverged, fit
from boxloss.trainers.engine.results import Results, aggregate
from boxloss.trainers.engine.run import Run, RunDirectoryError
from boxloss.trainers.engine.timing import StepClock


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(TrainerConfig(), ["seed=3", "widths=8,16,32,64", "data=voc:/x", "batch_size=4"])
    assert cfg.seed == 3 and cfg.widths == (8, 16, 32, 64) and cfg.data == "voc:/x" and cfg.batch_size == 4


@pytest.mark.parametrize(
    "item, words", [("no_such=1", "no such setting"), ("seed=abc", "expected int"), ("seed", "key=value")]
)
def test_bad_overrides_name_the_setting(item, words):
    with pytest.raises(ConfigError, match=words):
        apply_overrides(TrainerConfig(), [item])


def test_run_directory_is_never_overwritten_unasked(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    with pytest.raises(RunDirectoryError, match="already holds files"):
        Run(out, "t", {"a": 1}, log=None)
    assert (out / "mine.txt").read_text() == "precious"
    with pytest.raises(RunDirectoryError, match="no run to resume"):
        Run(out, "t", {"a": 1}, resume=True, log=None)
    Run(out, "t", {"a": 1}, overwrite=True, log=None)
    assert not (out / "mine.txt").exists()


def test_resume_refuses_other_settings(tmp_path):
    Run(tmp_path / "r", "t", {"a": 1, "threads": 1}, log=None)
    Run(tmp_path / "r", "t", {"a": 1, "threads": 2}, resume=True, log=None)  # threads may change
    with pytest.raises(RunDirectoryError, match="settings differ"):
        Run(tmp_path / "r", "t", {"a": 2, "threads": 1}, resume=True, log=None)


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "x.pt"
    checkpoint.atomic_save({"model": {"w": torch.ones(3)}}, path)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(checkpoint.CheckpointError, match="x.pt"):
        checkpoint.load(path)


def test_batches_depend_only_on_seed_and_step():
    data = list(range(10))
    a = Batches(data, 4, seed=1, collate=list)
    b = Batches(data, 4, seed=1, collate=list)
    steps = [a.batch(s) for s in range(6)]
    assert [b.batch(s) for s in (5, 2, 0)] == [steps[5], steps[2], steps[0]]
    epoch0 = sum(steps[:2], []) + steps[2][:2]
    assert sorted(epoch0) == data  # every item once per epoch
    assert Batches(data, 4, seed=2, collate=list).batch(0) != steps[0]


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def _problem(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 8, 8, generator=g), torch.randint(0, 2, (8, 8), generator=g)) for _ in range(n)]


def _collate(items):
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def _step(model, batch, clock):
    x, y = batch
    with clock.model_forward():
        logits = model(x)
    clock.watch(logits)
    with clock.loss_forward():
        fg = logits.softmax(1)[:, 1]
        loss = F.cross_entropy(logits, y) + boxloss.volumetric_loss(
            fg, s_min=0.2, distributed=distributed.world_size() > 1
        )
    return loss, {"ce": loss}


def _train(run, steps, batch_size=4, seed=0):
    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(
        run,
        "job",
        model,
        _step,
        Batches(_problem(), batch_size, seed, collate=_collate),
        steps=steps,
        optimizer=opt,
        checkpoint_every=3,
        progress=False,
    )
    return model


def test_fit_resumes_where_it_stopped(tmp_path):
    full = _train(Run(tmp_path / "a", "t", {}, log=None), steps=8)
    run = Run(tmp_path / "b", "t", {}, log=None)
    _train(run, steps=8)
    state = checkpoint.load(run.checkpoint_path("job"))
    assert state["done"] and state["step"] == 8
    # an interrupted job: its checkpoint at step 6 is what a kill after step 6 leaves
    run_c = Run(tmp_path / "c", "t", {}, log=None)
    _train(run_c, steps=6)
    state = checkpoint.load(run_c.checkpoint_path("job"))
    state["done"] = False
    checkpoint.atomic_save(state, run_c.checkpoint_path("job"))
    resumed = _train(Run(tmp_path / "c", "t", {}, resume=True, log=None), steps=8)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_finished_job_is_loaded_not_retrained(tmp_path):
    run = Run(tmp_path / "a", "t", {}, log=None)
    trained = _train(run, steps=4)
    again = _train(Run(tmp_path / "a", "t", {}, resume=True, log=None), steps=4)
    for a, b in zip(trained.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_diverging_loss_names_job_and_step():
    def bad(model, batch, clock):
        return model(batch[0]).sum() * float("nan"), {}

    model = _Tiny()
    with pytest.raises(TrainingDiverged, match=r"\[job\].*step 0"):
        fit(
            None,
            "job",
            model,
            bad,
            Batches(_problem(), 2, 0, collate=_collate),
            steps=2,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            progress=False,
        )


def test_clock_splits_loss_and_model_time():
    clock = StepClock()
    model = _Tiny()
    x = torch.rand(2, 3, 8, 8)
    with clock.model_forward():
        out = model(x)
    clock.watch(out)
    with clock.loss_forward():
        loss = out.square().mean()
    clock.backward(loss)
    clock.add_step(0.01)
    s = clock.summary()
    assert s["steps"] == 1 and s["loss_backward_ms"] >= 0 and s["model_backward_ms"] > 0
    assert model.conv.weight.grad is not None


def test_results_aggregate_over_seeds():
    per = []
    for seed, v in ((0, 1.0), (1, 3.0)):
        r = Results("t", "quick", seed)
        r.add("1", "a", "miou", v)
        per.append(r)
    agg = aggregate(per)
    row = agg.rows[0]
    assert agg.seed == [0, 1] and row["value"] == 2.0 and row["values"] == [1.0, 3.0] and row["std"] > 0
    assert "2.00 ± 1.41" in agg.markdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    model = _train(None, steps=5, batch_size=3)
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
    distributed.shutdown()


def test_two_processes_equal_one_on_the_combined_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    single = _train(None, steps=5, batch_size=6).state_dict()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6)


def test_results_json_layout(tmp_path):
    r = Results("box2tagback", "quick", 0)
    r.add("1", "box", "fbeta", 50.0)
    d = json.loads(json.dumps(r.to_dict()))
    assert set(d) >= {"trainer", "preset", "seed", "rows", "timing"}
    assert d["rows"] == [{"table": "1", "setting": "box", "metric": "fbeta", "value": 50.0}]


def test_small_unet_heads_at_stride_two_are_the_upsampled_heads_before_upsampling():
    from boxloss.trainers.engine.models import SmallUNet

    torch.manual_seed(0)
    net = SmallUNet({"logits": 3, "aux": 2}, widths=(4, 8, 8, 8)).eval()
    x = torch.rand(2, 3, 20, 23)
    full = net(x)
    net.output_stride = 2
    half = net(x)
    assert half["logits"].shape == (2, 3, 10, 12) and half["aux"].shape == (2, 2, 10, 12)
    for name in full:
        up = F.interpolate(half[name], size=(20, 23), mode="bilinear", align_corners=False)
        torch.testing.assert_close(up, full[name])
    with pytest.raises(ValueError, match="output_stride must be 1 or 2"):
        SmallUNet({"logits": 3}, output_stride=4)


_DENORMAL_SCRIPT = """
import torch
from boxloss.trainers.engine.context import flushing_denormals, set_flush_denormal

torch.set_num_threads(2)
tiny = torch.full((4_000_000,), 1e-39)
assert not flushing_denormals()
assert set_flush_denormal(True)
assert flushing_denormals()
assert bool(((tiny * 1.0) == 0).all()), "some pool thread still computes subnormal floats"
set_flush_denormal(False)
assert not flushing_denormals()
assert bool(((tiny * 1.0) != 0).all()), "some pool thread still flushes subnormal floats"
"""


def test_denormals_are_flushed_on_every_pool_thread():
    """In a fresh process, so the pool's threads are in the state a training process starts from."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _DENORMAL_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_run_puts_the_process_settings_back(tmp_path):
    """A trainer run from Python sets threads and denormal flushing for itself and restores them afterwards."""
    from types import SimpleNamespace

    from boxloss.trainers.__main__ import run_trainer
    from boxloss.trainers.engine.context import flushing_denormals

    seen = {}

    def pipeline(ctx, settings):
        seen["threads"], seen["flushing"] = torch.get_num_threads(), flushing_denormals()

    module = SimpleNamespace(NAME="probe", SUMMARY="records the process settings", run=pipeline)
    threads, flushing = torch.get_num_threads(), flushing_denormals()
    other = 1 if threads != 1 else 2
    run_trainer(module, TrainerConfig(threads=other), tmp_path / "run", settings=[], progress=False, log=None)
    assert seen == {"threads": other, "flushing": True}
    assert (torch.get_num_threads(), flushing_denormals()) == (threads, flushing)
