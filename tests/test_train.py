"""The training loop: deterministic order, resume after SIGKILL, DDP == one process, accumulation, run dirs."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pagoda import checkpoint
from pagoda.config import PRESETS, TrainConfig, to_dict
from pagoda.data import to_model
from pagoda.dist import shutdown
from pagoda.errors import UserError
from pagoda.rundir import first_difference, truncate_log
from pagoda.schedule import displacement_lr, ema_beta, learning_rate
from pagoda.stages.teacher import TeacherStage
from pagoda.train import Stage, StepSampler, micro_batching, step_indices, train

REPO = Path(__file__).resolve().parents[1]

# Float32 tolerance for "the same update": gloo sums the ranks' gradients, autograd sums the
# accumulation rounds, each in its own order; float addition is not associative, so gradients agree
# to ~1e-7 relative and the Adam-updated weights (lr 1e-3, a handful of steps) to well within 1e-6.
ATOL = 1e-6


class ToyStage(Stage):
    """A deterministic stage (no noise): a two-layer conv net regressing a label-dependent target."""

    name = "toy"
    kind = "teacher"

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))

    def step(self, net, batch, generator, phase=None):
        x, y = batch
        x = to_model(x)
        target = x.flip(-1) * (y.float().view(-1, 1, 1, 1) + 1) / 4
        loss = ((net(x) - target) ** 2).mean()
        return loss, {"x_abs": x.abs().mean()}


def tiny_dataset(n: int = 40, resolution: int = 8, classes: int = 4) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 3, resolution, resolution), generator=g, dtype=torch.uint8)
    return torch.utils.data.TensorDataset(x, torch.arange(n) % classes)


def toy_cfg(**kw) -> TrainConfig:
    base = dict(batch=8, steps=4, lr=1e-3, lr_warmup=2, ema_rate=0.9, snapshot_every=2, log_every=1, seed=3)
    return TrainConfig(**{**base, **kw})


def run_toy(out_dir, **kw):
    cfg = toy_cfg(**kw)
    return train(stage=ToyStage(), cfg=cfg, out_dir=out_dir, config_dict={"train": to_dict(cfg)},
                 dataset=tiny_dataset())


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def final_state(run_dir) -> dict:
    return checkpoint.load_training_state(Path(run_dir) / "state.pt")


def assert_close_states(a: dict, b: dict, atol: float = ATOL) -> None:
    for part in ("net", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=atol, msg=f"{part}.{k}")


# ---------------------------------------------------------------------------------------------
# Pure pieces.

def test_step_indices_are_epoch_permutations_and_a_function_of_seed_and_step():
    n, batch = 20, 8
    stream = torch.cat([step_indices(n, seed=5, step=k, batch=batch) for k in range(5)])  # 40 = two epochs
    assert sorted(stream[:n].tolist()) == list(range(n)) and sorted(stream[n:].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n:])  # each epoch reshuffles
    assert torch.equal(step_indices(n, seed=5, step=3, batch=batch), stream[24:32])  # no iterator state
    assert not torch.equal(step_indices(n, seed=6, step=3, batch=batch), stream[24:32])


@pytest.mark.parametrize("world, micro", [(1, 8), (1, 4), (2, 4), (2, 2)])
def test_rank_micro_batches_partition_the_global_batch(world, micro):
    cfg = TrainConfig(batch=8, micro_batch=micro)
    micro, accum = micro_batching(cfg, world)
    assert micro * accum * world == 8
    parts = [list(StepSampler(20, seed=0, batch=8, micro=micro, start=2, steps=3, rank=r, world=world))
             for r in range(world)]
    assert all(len(p) == accum for p in parts)
    flat = sorted(i for p in parts for mb in p for i in mb)
    assert flat == sorted(step_indices(20, seed=0, step=2, batch=8).tolist())


def test_micro_batching_rejects_batches_that_do_not_split():
    with pytest.raises(UserError, match="train.batch=8"):
        micro_batching(TrainConfig(batch=8, micro_batch=8), world=3)


def test_warmup_and_ema_schedule():
    cfg = TrainConfig(lr=1e-3, lr_warmup=4)
    assert [learning_rate(cfg, k) for k in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert learning_rate(dataclasses.replace(cfg, lr_warmup=0), 0) == 1e-3
    assert ema_beta(0.999, 0) == pytest.approx(0.1) and ema_beta(0.999, 10**6) == 0.999 and ema_beta(0.0, 5) == 0


def test_first_difference_names_the_dotted_key():
    a = {"train": {"lr": 1.0, "steps": 3}, "network": {"channel_mult": [1, 2]}}
    assert first_difference(a, json.loads(json.dumps(a))) is None
    b = {"train": {"lr": 1.0, "steps": 4}, "network": {"channel_mult": [1, 2, 2]}}
    assert first_difference(a, b) == ("network.channel_mult", [1, 2], [1, 2, 2])


def test_truncate_log_drops_rows_past_the_resumed_step(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    truncate_log(path, 2)
    assert [r["step"] for r in map(json.loads, path.read_text().splitlines())] == [1, 2]


# ---------------------------------------------------------------------------------------------
# The loop.

def test_run_directory_contents(tmp_path):
    model = run_toy(tmp_path, steps=4, snapshot_every=2, log_every=2)
    assert model == tmp_path / "toy.safetensors" and model.exists()
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["toy-0000002.safetensors",
                                                                          "toy-0000004.safetensors"]
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == [2, 4]
    assert {"step", "kimg", "loss", "lr", "img_per_s", "sec_per_step", "time", "world_size", "x_abs"} <= rows[0].keys()
    assert rows[1]["kimg"] == pytest.approx(4 * 8 / 1000)
    state = final_state(tmp_path)
    weights, meta = checkpoint.load_model(model)
    assert state["step"] == 4 and meta["step"] == 4
    for k, v in weights.items():  # the deliverable is the EMA of the parameters (buffers: the net's), not the raw weights
        assert torch.equal(v, state["ema"][k] if k in state["ema"] else state["net"][k])
    assert set(state["ema"]) == {k for k, _ in ToyStage().net.named_parameters()}  # parameters only
    assert any(not torch.equal(state["ema"][k], state["net"][k]) for k in weights)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 4


def test_displacement_counts_full_adam_steps_and_every_run_records_it(tmp_path):
    # Adam on a constant gradient moves each weight by lr per step: k steps are a displacement of k lr units
    w = nn.Parameter(torch.zeros(3, 4))
    init, opt = {"w": w.detach().clone()}, torch.optim.Adam([w], lr=1e-3)
    for _ in range(7):
        opt.zero_grad()
        (w * torch.linspace(-2, 3, 12).view(3, 4)).sum().backward()
        opt.step()
    assert displacement_lr({"w": w}, init, {"w": 1e-3}) == pytest.approx(7, rel=1e-4)
    assert displacement_lr({"w": w}, init, {"w": 2e-3}) == pytest.approx(3.5, rel=1e-4)  # per the peak lr given
    # the loop: every log row and the model file, measured from the weights at step 0 (kept in state.pt)
    model = run_toy(tmp_path, steps=4, snapshot_every=2, log_every=2)
    rows, state = read_log(tmp_path), final_state(tmp_path)
    start = {k: v for k, v in ToyStage().net.state_dict().items()}
    assert all(torch.equal(state["init"][k], start[k]) for k in start)
    assert 0 < rows[0]["disp_lr"] < rows[1]["disp_lr"] <= 4 + 1e-6  # Adam: at most ~1 lr unit per step
    _, meta = checkpoint.load_model(model)
    lr = toy_cfg(steps=4).lr
    assert meta["displacement_lr"] == pytest.approx(displacement_lr(state["ema"], start, dict.fromkeys(start, lr)))
    assert meta["train_images"] == 4 * toy_cfg().batch


def test_accumulation_equals_full_batch(tmp_path):
    run_toy(tmp_path / "full")
    run_toy(tmp_path / "accum", micro_batch=4)
    run_toy(tmp_path / "accum4", micro_batch=2)
    full = final_state(tmp_path / "full")
    for other in ("accum", "accum4"):
        assert_close_states(full, final_state(tmp_path / other))
        losses = [r["loss"] for r in read_log(tmp_path / other)]
        assert losses == pytest.approx([r["loss"] for r in read_log(tmp_path / "full")], rel=1e-6)


def _snapshot_files(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_finished_run_is_not_retrained_and_other_config_is_refused(tmp_path, capsys):
    run_toy(tmp_path)
    before = _snapshot_files(tmp_path)
    capsys.readouterr()
    assert run_toy(tmp_path) == tmp_path / "toy.safetensors"
    assert "nothing to do" in capsys.readouterr().out
    assert _snapshot_files(tmp_path) == before
    with pytest.raises(UserError) as e:
        run_toy(tmp_path, lr=2e-3)
    msg = str(e.value)
    assert str(tmp_path) in msg and "train.lr" in msg and "--out" in msg and "\n" not in msg
    assert _snapshot_files(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Two gloo processes == one process.

def _teacher_cfg(**train_kw):
    preset = PRESETS["smoke"].teacher
    network = dataclasses.replace(preset.network, num_classes=4)
    train_cfg = dataclasses.replace(preset.train, batch=8, steps=3, lr_warmup=1, snapshot_every=3, log_every=1,
                                    **train_kw)
    return dataclasses.replace(preset, network=network, train=train_cfg)


def _run_teacher(out_dir, cfg):
    torch.manual_seed(cfg.train.seed)
    return train(stage=TeacherStage(cfg), cfg=cfg.train, out_dir=out_dir, config_dict=to_dict(cfg),
                 dataset=tiny_dataset(resolution=cfg.data.resolution))


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        run_toy(Path(out) / "toy")
        _run_teacher(Path(out) / "teacher", _teacher_cfg())
    finally:
        shutdown()


def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path / "ddp")), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_toy(tmp_path / "one" / "toy")
        # The teacher draws its noise per micro-batch m = round * world + rank, so the one-process run with
        # the same micro-batches (4 images, 2 rounds) sees the same images and the same noise.
        _run_teacher(tmp_path / "one" / "teacher", _teacher_cfg(micro_batch=4))
    finally:
        torch.set_num_threads(threads)
    for name in ("toy", "teacher"):
        one, two = tmp_path / "one" / name, tmp_path / "ddp" / name
        assert_close_states(final_state(one), final_state(two))
        rows_one, rows_two = read_log(one), read_log(two)
        assert [r["world_size"] for r in rows_two] == [2] * len(rows_one)
        assert [r["loss"] for r in rows_two] == pytest.approx([r["loss"] for r in rows_one], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# SIGKILL after the first snapshot, run again: bitwise the same as an uninterrupted run.

def _npz_dataset(path: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = np.arange(64) % 16
    # Images whose colour depends on the class, so the loss has something to learn.
    images = (rng.integers(0, 64, (64, 8, 8, 3)) + (labels[:, None, None, None] * [13, 7, 3]) % 192).astype(np.uint8)
    np.savez(path, images, labels)
    return path


def _command(data: Path, out: Path) -> list[str]:
    sets = [f"data.source={data}", "data.xflip=false", "train.steps=24", "train.batch=8", "train.snapshot_every=4",
            "train.log_every=1", "train.lr_warmup=2"]
    code = ("import sys, torch; torch.set_num_threads(1); from pagoda.config import resolve; "
            "from pagoda.stages.teacher import run; run(resolve('teacher', 'smoke', sys.argv[2:]), out_dir=sys.argv[1])")
    return [sys.executable, "-c", code, str(out), *sets]


def _popen(cmd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc) -> None:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]


def test_sigkill_and_rerun_is_bitwise_identical(tmp_path):
    data = _npz_dataset(tmp_path / "data.npz")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = _popen(_command(data, straight))
    victim = _popen(_command(data, killed))
    deadline = time.time() + 120
    while not (killed / "state.pt").exists():
        assert victim.poll() is None and time.time() < deadline, "no snapshot appeared"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    resumed_from = final_state(killed)["step"]
    assert 4 <= resumed_from < 24, "the run was not interrupted before its end"
    _finish(_popen(_command(data, killed)))
    _finish(reference)

    a, b = final_state(straight), final_state(killed)
    assert a["step"] == b["step"] == 24
    for part in ("net", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    wa, _ = checkpoint.load_model(straight / "teacher.safetensors")
    wb, _ = checkpoint.load_model(killed / "teacher.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows_a, rows_b = read_log(straight), read_log(killed)
    assert [r["step"] for r in rows_b] == list(range(1, 25))  # killed rows past the snapshot were dropped
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]
    assert np.mean([r["loss"] for r in rows_a[-4:]]) < np.mean([r["loss"] for r in rows_a[:4]])


def test_a_folder_of_other_files_is_not_trained_into(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as e:
        run_toy(tmp_path)
    msg = str(e.value)
    assert "notes.txt" in msg and "not a pagoda run" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written into it
    run_toy(tmp_path / "empty-or-new")  # a new folder is fine


class NaNStage(ToyStage):
    """The toy stage whose loss turns NaN from its third call (a diverged run)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def step(self, net, batch, generator, phase=None):
        loss, stats = super().step(net, batch, generator)
        self.calls += 1
        return (loss * float("nan") if self.calls > 2 else loss), stats


@pytest.mark.parametrize("log_every", [1, 4])
def test_a_nan_loss_stops_training_before_anything_diverged_is_saved(tmp_path, log_every):
    cfg = toy_cfg(log_every=log_every, snapshot_every=2, steps=6)
    with pytest.raises(UserError) as e:
        train(stage=NaNStage(), cfg=cfg, out_dir=tmp_path, config_dict={"train": to_dict(cfg)},
              dataset=tiny_dataset())
    msg = str(e.value)
    assert "diverged at step" in msg and "nan" in msg and "\n" not in msg
    rows = read_log(tmp_path) if (tmp_path / "log.jsonl").exists() else []  # log_every 4: none before step 4
    assert len(rows) == (2 if log_every == 1 else 0) and all(math.isfinite(r["loss"]) for r in rows)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["toy-0000002.safetensors"]
    state = checkpoint.load_training_state(tmp_path / "state.pt")
    assert state["step"] == 2
