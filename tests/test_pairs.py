"""Stage 2a pairs (`pagoda.pairs`, `python -m pagoda pairs`): the latents decode back to the images, and
the shards are a function of the items alone (kill + resume, one vs two processes, shard size), checked
on load (tampered, truncated, missing shards), with every bad input one `error:` line and nothing written.

Teachers are the `smoke` UNet (8 px). Fresh, its output conv is zero, so F = 0 and the teacher is
exactly D(x, s) = c_skip(s) x: the posterior mean of Gaussian data N(0, 0.5^2 I), whose PF-ODE has a
closed form. With every weight perturbed it is a random, label-dependent teacher.
"""

import dataclasses
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_eval_cli import _one_error_line

from pagoda.__main__ import main
from pagoda.checkpoint import load_teacher, model_meta, save_model
from pagoda.config import PRESETS
from pagoda.data import build_dataset, save_npz, to_model, to_uint8
from pagoda.diffusion import karras_sigmas
from pagoda.dist import shutdown
from pagoda.errors import UserError, run_cli
from pagoda.networks.unet import UNet
from pagoda.pairs import INDEX, invert, load_pairs, make_pairs, pair_batch, shard_name
from pagoda.samplers import heun, inversion_sigmas
from pagoda.weights import sha256_file

ROOT = Path(__file__).resolve().parents[1]
RES, SHARD, BATCH = 8, 4, 4  # 16 images -> 32 items -> 8 shards of 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _save_teacher(path, *, seed=1, perturb=0.02, num_classes=None, kind="teacher"):
    """A smoke-preset teacher: exact Gaussian denoiser (perturb=0) or random weights (perturb > 0)."""
    cfg = PRESETS["smoke"].teacher
    if num_classes is not None:
        cfg = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, num_classes=num_classes))
    torch.manual_seed(seed)
    net = UNet(**{f.name: getattr(cfg.network, f.name) for f in dataclasses.fields(cfg.network)})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(perturb * torch.randn_like(p))
    meta = model_meta(kind=kind, stage="teacher", config=cfg, step=0, ema_rate=0.999)
    save_model(path, net.state_dict(), meta)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Teachers and data: an ADM npz of 16 labelled photos crops at 8 px, and one of the first 6."""
    d = tmp_path_factory.mktemp("pairs-inputs")
    photos = build_dataset("photos", RES)
    x, y = pair_batch(photos, range(0, 2 * len(photos), 2 * len(photos) // 16))  # even items: unflipped
    save_npz(d / "data.npz", x.permute(0, 2, 3, 1).numpy(), y.numpy())
    save_npz(d / "small.npz", x[:6].permute(0, 2, 3, 1).numpy(), y[:6].numpy())
    return {"dir": d, "data": str(d / "data.npz"), "small": str(d / "small.npz"),
            "teacher": _save_teacher(d / "teacher.safetensors"),
            "other": _save_teacher(d / "other.safetensors", seed=2),
            "gauss": _save_teacher(d / "gauss.safetensors", perturb=0.0),
            "uncond": _save_teacher(d / "uncond.safetensors", num_classes=0),
            "generator": _save_teacher(d / "gen.safetensors", kind="generator")}


@pytest.fixture(scope="module")
def ref(files, tmp_path_factory):
    """The uninterrupted one-process run: 32 items, shards of 4, micro-batches of 4, float32."""
    out = tmp_path_factory.mktemp("ref") / "pairs"
    make_pairs(files["teacher"], files["data"], out, shard_size=SHARD, batch=BATCH, progress=False)
    return out


def _listing(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _cli(*argv):
    return run_cli(main, ["pairs", *map(str, argv)])


# ---------------------------------------------------------------------------------------------
# (a) The latents decode back to the images.

def test_gaussian_teacher_round_trip_is_exact_in_uint8(files, tmp_path):
    # With D = c_skip x (data N(0, s0^2 I), s0 = 0.5) the flow from sigma_min to 80 multiplies x by
    # a = sqrt((s0^2 + 80^2) / (s0^2 + smin^2)) ~ 160; D stays within [-1, 1] along it, so the clamp is idle.
    # Tolerances: the inversion alone is off by Heun's error on the 40-point grid, <= 0.01 of x (measured
    # 0.0087 here, bounded in test_samplers); up and back the errors largely cancel: ~2e-3 in float64
    # (test_samplers), float32 adds ~1e-6 and float16 storage of z (relative 2^-11, divided back by a) ~3e-4.
    # That is below half a uint8 step (1/255 in [-1, 1] units; measured 1.0e-3 / 1.3e-3), so decoding the
    # stored latent returns the uint8 image exactly.
    a = math.sqrt((0.25 + 80.0**2) / (0.25 + 0.002**2))
    D = load_teacher(files["gauss"]).denoiser()
    sizes = {}
    for dtype in ("float32", "float16"):
        out = tmp_path / dtype
        make_pairs(files["gauss"], files["small"], out, dtype=dtype, shard_size=12, batch=6, progress=False)
        pairs = load_pairs(out)
        x, y, z, _ = (torch.stack(t) for t in zip(*(pairs[j] for j in range(len(pairs)))))
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and z.dtype == torch.float32
        assert len(pairs) == 12 and torch.equal(x[1::2], x[0::2].flip(-1))
        z_exact = a * to_model(x)
        assert (z - z_exact).abs().max() < 0.02 * a
        with torch.no_grad():
            back = heun(D, z, karras_sigmas(40), labels=y)
        err = (back - to_model(x)).abs().max().item()
        assert err < 0.5 / 127.5 and torch.equal(to_uint8(back), x), (dtype, err)
        sizes[dtype] = (out / shard_name(0)).stat().st_size
    # (f) float16 halves the latents' bytes: 12 items x 3 x 8 x 8 x 2 fewer (index and label stay int64).
    assert sizes["float32"] - sizes["float16"] == 12 * 3 * RES * RES * 2


def test_random_teacher_latents_are_the_conditioned_inversion(files, ref):
    pairs = load_pairs(ref)
    D = load_teacher(files["teacher"]).denoiser()
    sigmas = torch.tensor(pairs.index["sigmas"], dtype=torch.float64)
    assert sigmas.shape == (40,) and sigmas[0] == pytest.approx(0.002) and sigmas[-1] == pytest.approx(80.0)
    x, y, z, _ = (torch.stack(t) for t in zip(*(pairs[j] for j in range(len(pairs)))))
    source = build_dataset(files["data"], RES)
    assert torch.equal(x[0::2], torch.stack([source[i][0] for i in range(16)]))
    assert torch.equal(x[1::2], x[0::2].flip(-1))
    assert torch.equal(y[0::2], y[1::2]) and len(set(y.tolist())) > 1
    # Item j's latent is ddim_invert of its micro-batch [4k, 4k + 4) with the true labels, bit for bit.
    assert torch.equal(z[8:12], invert(D, x[8:12], y[8:12], sigmas))
    assert not torch.allclose(z[8:12], invert(D, x[8:12], (y[8:12] + 1) % 16, sigmas), atol=1e-3)
    # Round trip through a random teacher: what is left is Heun's discretisation error on the 40-point grid,
    # up and back, plus the last Euler jump sigma_min -> 0 (c_out(0.002) F ~ 1e-3). Measured per item (max
    # over pixels): median 1.6e-3, below half a uint8 step (1/255 = 3.9e-3) for 29 of 32 items, worst 0.068
    # on one image and its mirror, where the teacher's flow is stiff. That worst case is the solver's: on
    # 80 and 160 points it falls to 0.010 and 0.003 (second order down to the jump floor), which a wrong
    # grid, label or flip would not do.
    with torch.no_grad():
        err = (heun(D, z, karras_sigmas(40), labels=y) - to_model(x)).abs().flatten(1).amax(1)
        assert (err < 0.5 / 127.5).float().mean() >= 0.85 and err.median() < 2.5e-3, err
        w = err.argmax().item()
        z_fine = invert(D, x[w:w + 1], y[w:w + 1], inversion_sigmas(80))
        fine = heun(D, z_fine, karras_sigmas(80), labels=y[w:w + 1])
    assert (fine - to_model(x[w:w + 1])).abs().max() < max(err[w].item() / 3, 4e-3), err[w]
    # The Dataset survives pickling (DataLoader workers open their own shard handles).
    clone = pickle.loads(pickle.dumps(pairs))
    assert all(torch.equal(u, v) for u, v in zip(clone[5], pairs[5]))


def test_unconditional_teacher_and_shard_size(files, tmp_path):
    """An unconditional teacher gets no labels; the latents do not depend on the shard size."""
    make_pairs(files["uncond"], files["small"], tmp_path / "a", shard_size=4, batch=2, progress=False)
    make_pairs(files["uncond"], files["small"], tmp_path / "b", shard_size=6, batch=2, progress=False)
    a, b = load_pairs(tmp_path / "a"), load_pairs(tmp_path / "b")
    assert a.num_classes == 0 and len(a.index["shards"]) == 3 and len(b.index["shards"]) == 2
    za, zb = (torch.stack([p[j][2] for j in range(12)]) for p in (a, b))
    assert torch.equal(za, zb)
    D = load_teacher(files["uncond"]).denoiser()
    x, _ = pair_batch(a.dataset, range(2, 4))
    assert torch.equal(za[2:4], invert(D, x, None, torch.tensor(a.index["sigmas"], dtype=torch.float64)))


# ---------------------------------------------------------------------------------------------
# (b) Killed and resumed == uninterrupted; a finished folder is up to date.

def test_sigkill_then_resume_equals_uninterrupted(files, ref, tmp_path, capsys):
    out = tmp_path / "pairs"
    argv = [sys.executable, "-m", "pagoda", "pairs", "--teacher", files["teacher"], "--data", files["data"],
            "--out", str(out), "--shard-size", str(SHARD), "--batch", str(BATCH), "--device", "cpu"]
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / shard_name(0)).exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = {p.name: p.stat() for p in out.glob("pairs-*.safetensors")}
    assert 1 <= len(done) < 8, sorted(done)
    assert json.loads((out / INDEX).read_text())["complete"] is False  # the plan, written first
    (out / f".{shard_name(5)}.tmp999").write_bytes(b"half a shard")  # as a kill during a write leaves it
    # The same command (options from the folder's index) resumes.
    assert _cli("--teacher", files["teacher"], "--data", files["data"], "--out", out) == 0
    for name, st in done.items():  # finished shards were not recomputed
        assert (out / name).stat().st_ino == st.st_ino and (out / name).stat().st_mtime_ns == st.st_mtime_ns
    assert _listing(out) == _listing(ref)  # shards and index.json, byte for byte; no temp files left
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _cli("--teacher", files["teacher"], "--data", files["data"], "--out", out) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# (c) Two gloo processes write the shards of one.

def _rank(rank, world, init, teacher, data, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        make_pairs(teacher, data, out, shard_size=SHARD, batch=BATCH, progress=False)
    finally:
        shutdown()


def test_two_processes_equal_one(files, ref, tmp_path):
    out = tmp_path / "pairs"
    mp.start_processes(_rank, args=(2, f"file://{tmp_path}/pg", files["teacher"], files["data"], str(out)),
                       nprocs=2, join=True, start_method="spawn")
    assert _listing(out) == _listing(ref)


# ---------------------------------------------------------------------------------------------
# (d) Damaged shards are found on load.

@pytest.mark.parametrize("damage", ["tampered", "truncated", "missing"])
def test_damaged_shard_is_named(damage, ref, tmp_path, capsys):
    out = tmp_path / "pairs"
    shutil.copytree(ref, out)
    shard = out / shard_name(3)
    data = bytearray(shard.read_bytes())
    if damage == "tampered":  # one bit of one latent
        data[-5] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "truncated":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard.unlink()
    assert run_cli(lambda argv: load_pairs(out)) == 2
    _one_error_line(capsys, str(shard), "rerun", {"tampered": "edited", "truncated": "truncated",
                                                  "missing": "missing"}[damage])


def test_rerun_recomputes_a_deleted_shard(files, ref, tmp_path):
    out = tmp_path / "pairs"
    shutil.copytree(ref, out)
    (out / shard_name(6)).unlink()
    assert _cli("--teacher", files["teacher"], "--data", files["data"], "--out", out) == 0
    assert _listing(out) == _listing(ref)


def test_nan_teacher_is_refused_without_a_shard(files, tmp_path, capsys):
    teacher = _save_teacher(tmp_path / "nan.safetensors", perturb=math.nan)
    out = tmp_path / "pairs"
    assert _cli("--teacher", teacher, "--data", files["small"], "--out", out, "--shard-size", 4,
                "--batch", 4) == 2
    _one_error_line(capsys, "nan.safetensors", "non-finite", "items 0..3")
    assert sorted(p.name for p in out.iterdir()) == [INDEX]  # the plan only


# ---------------------------------------------------------------------------------------------
# (e) Bad input: one `error:` line, exit status 2, nothing written.

def test_load_refuses_other_teacher_and_resolution(files, ref, capsys):
    assert load_pairs(ref, teacher_sha256=sha256_file(files["teacher"]), resolution=RES).resolution == RES
    assert run_cli(lambda argv: load_pairs(ref, teacher_sha256=sha256_file(files["other"]))) == 2
    _one_error_line(capsys, str(ref), "teacher", "new --out")
    assert run_cli(lambda argv: load_pairs(ref, resolution=16)) == 2
    _one_error_line(capsys, str(ref), "resolution 8, not 16")
    with pytest.raises(UserError, match="has no index.json"):
        load_pairs(ref.parent)


def _bad_cli(case, files, ref, tmp_path):
    """(argv, words of the error line, the folder that must stay untouched or absent)."""
    new = tmp_path / "new"
    common = ["--data", files["data"], "--out", new, "--shard-size", SHARD, "--batch", BATCH]
    if case == "other_teacher_into_folder":
        out = tmp_path / "pairs"
        shutil.copytree(ref, out)
        argv = ["--teacher", files["other"], "--data", files["data"], "--out", out]
        return argv, ["teacher.sha256", "--out"], out
    if case == "other_dtype_into_folder":
        out = tmp_path / "pairs"
        shutil.copytree(ref, out)
        return ["--teacher", files["teacher"], "--data", files["data"], "--out", out, "--dtype", "float16"], \
            ["dtype = float32", "float16"], out
    if case == "generator_as_teacher":
        return ["--teacher", files["generator"]] + common, ["gen.safetensors", "kind='generator'"], new
    if case == "missing_teacher":
        argv = ["--teacher", tmp_path / "nope.safetensors"] + common
        return argv, ["nope.safetensors", "does not exist"], new
    if case == "unknown_data":
        return ["--teacher", files["teacher"], "--data", tmp_path / "imagenet", "--out", new], \
            ["imagenet", "does not exist"], new
    if case == "unlabelled_data_for_conditional_teacher":
        flat = tmp_path / "flat"
        flat.mkdir()
        from PIL import Image
        Image.new("RGB", (RES, RES)).save(flat / "a.png")
        return ["--teacher", files["teacher"], "--data", flat, "--out", new], ["no labels"], new
    if case == "shard_not_multiple_of_batch":
        return ["--teacher", files["teacher"], "--data", files["data"], "--out", new, "--shard-size", 6,
                "--batch", 4], ["--shard-size 6", "--batch 4"], new
    if case == "not_a_pairs_folder":
        new.mkdir()
        (new / "notes.txt").write_text("mine")
        return ["--teacher", files["teacher"]] + common, ["not a pairs folder"], new
    raise AssertionError(case)


BAD_CASES = ["other_teacher_into_folder", "other_dtype_into_folder", "generator_as_teacher",
             "missing_teacher", "unknown_data", "unlabelled_data_for_conditional_teacher",
             "shard_not_multiple_of_batch", "not_a_pairs_folder"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_writes_nothing(case, files, ref, tmp_path, capsys):
    argv, needles, folder = _bad_cli(case, files, ref, tmp_path)
    before = _listing(folder) if folder.exists() else None
    assert _cli(*argv) == 2
    _one_error_line(capsys, *needles)
    assert (_listing(folder) if folder.exists() else None) == before
