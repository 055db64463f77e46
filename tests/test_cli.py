"""`python -m pagoda`: every user mistake is one `error:` line, exit status 2, and nothing written.

A few checks run the real command in a subprocess (the exit status and stderr as a user sees
them); the rest call `main(argv)` in process through `run_cli`.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from pagoda.__main__ import main
from pagoda.checkpoint import model_meta, save_model
from pagoda.config import PRESETS, SampleConfig, TeacherConfig, UNetConfig, from_dict, to_dict
from pagoda.errors import int_list, run_cli
from pagoda.networks.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
NET = UNetConfig(resolution=8, model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(),
                 num_head_channels=32, num_classes=3)
CFG = dataclasses.replace(PRESETS["smoke"].teacher, network=NET, sample=SampleConfig(sampler="euler", steps=2))


def _listing(folder: Path) -> dict:
    """Every file under folder with its bytes (to check that nothing was written or changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pagoda(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "pagoda", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def _fails(proc, *needles):
    """Exit status 2 and exactly one stderr line `error: ...` naming each needle."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


def _fails_in_process(capsys, argv, *needles):
    assert run_cli(main, [str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in err[0], err[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = UNet(**dataclasses.asdict(NET))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "teacher.safetensors"
    save_model(path, net.state_dict(), model_meta(kind="teacher", stage="teacher", config=CFG, step=5, ema_rate=0.9))
    return path


@pytest.fixture(scope="module")
def domain_file(tmp_path_factory):
    from pagoda.networks.domain import DomainNet, save_domain_net
    path = tmp_path_factory.mktemp("domain") / "domain-photos.safetensors"
    save_domain_net(DomainNet(3), path, {})
    return path


# ---------------------------------------------------------------------------------------------
# Subprocess: what a user sees.

def test_unknown_preset(tmp_path):
    _fails(pagoda("teacher", "--preset", "imagenet99", cwd=tmp_path), "imagenet99", "smoke")
    assert _listing(tmp_path) == {}


def test_unknown_set_key(tmp_path):
    _fails(pagoda("teacher", "--preset", "smoke", "--set", "train.stepz=3", cwd=tmp_path), "train.stepz", "steps")
    assert _listing(tmp_path) == {}


def test_missing_and_empty_data_folder(tmp_path):
    _fails(pagoda("teacher", "--preset", "smoke", "--set", "data.source=/nonexistent", cwd=tmp_path), "/nonexistent")
    (tmp_path / "empty").mkdir()
    _fails(pagoda("teacher", "--preset", "smoke", "--set", f"data.source={tmp_path / 'empty'}", "--out", "run",
                  cwd=tmp_path), tmp_path / "empty", "no images")
    assert _listing(tmp_path) == {} and not (tmp_path / "runs").exists() and not (tmp_path / "run").exists()


def test_resume_directory_of_another_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    other = dataclasses.replace(PRESETS["smoke"].teacher, train=dataclasses.replace(PRESETS["smoke"].teacher.train,
                                                                                    steps=99))
    (run / "config.json").write_text(json.dumps(to_dict(other), indent=2, sort_keys=True))
    before = _listing(tmp_path)
    _fails(pagoda("teacher", "--preset", "smoke", "--out", run, cwd=tmp_path), run, "train.steps", "--out")
    assert _listing(tmp_path) == before


def test_dry_run_round_trips(tmp_path):
    proc = pagoda("teacher", "--preset", "smoke", "--set", "train.steps=7", "--set", "network.channel_mult=[1,2]",
                  "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = from_dict(TeacherConfig, json.loads(proc.stdout))
    assert cfg == dataclasses.replace(PRESETS["smoke"].teacher, train=dataclasses.replace(
        PRESETS["smoke"].teacher.train, steps=7))
    assert _listing(tmp_path) == {}


def test_sample_refuses_a_domain_classifier(tmp_path, domain_file):
    _fails(pagoda("sample", "--ckpt", domain_file, "-o", "s.npz", cwd=tmp_path), domain_file, "'domain-classifier'",
           "'teacher'")
    assert _listing(tmp_path) == {}


def test_info_refuses_foreign_and_truncated_files(tmp_path, ckpt):
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(foreign))
    _fails(pagoda("info", "--ckpt", foreign, cwd=tmp_path), foreign, "not a pagoda checkpoint", "import-edm")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[:-100])
    _fails(pagoda("sample", "--ckpt", truncated, "-o", "x.png", cwd=tmp_path), truncated, "truncated")
    assert not (tmp_path / "x.png").exists()


def test_sample_writes_an_adm_npz(tmp_path, ckpt):
    proc = pagoda("sample", "--ckpt", ckpt, "--seeds", "3-6,9", "--batch", "2", "-o", "out/s.npz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "out" / "s.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (5,)
    from pagoda.generator import load_generator
    gen = load_generator(ckpt)
    seeds = torch.tensor([3, 4, 5, 6, 9])
    assert np.array_equal(labels, gen.seed_labels(seeds).numpy())
    assert np.array_equal(images, gen.sample(seeds).permute(0, 2, 3, 1).numpy())


# ---------------------------------------------------------------------------------------------
# In process.

def test_int_list():
    assert int_list("0-3") == [0, 1, 2, 3] and int_list("1,5,7") == [1, 5, 7] and int_list("0-1,4") == [0, 1, 4]


@pytest.mark.parametrize("seeds", ["3-1", "a", "1,,2", "-1", "0-9999999"])
def test_bad_seeds(tmp_path, capsys, ckpt, seeds):
    _fails_in_process(capsys, ["sample", "--ckpt", ckpt, "--seeds", seeds, "-o", tmp_path / "s.npz"], "--seeds")
    assert _listing(tmp_path) == {}


@pytest.mark.parametrize("extra,needles", [
    (["--labels", "7"], ["[0, 2]"]), (["--labels", "0-2"], ["3 labels for 4 seeds"]),
    (["--resolution", "16"], ["resolution 8", "--resolution 16"]), (["--sampler", "rk4"], ["--sampler", "rk4"]),
    (["--steps", "0"], ["--steps"]), (["--guidance", "-1"], ["--guidance"]), (["-o", "{tmp}/s.jpg"], [".npz", ".png"]),
    (["--device", "tpu"], ["--device"])])
def test_bad_sample_options(tmp_path, capsys, ckpt, extra, needles):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    out = [] if "-o" in extra else ["-o", tmp_path / "s.npz"]
    _fails_in_process(capsys, ["sample", "--ckpt", ckpt, "--seeds", "0-3", *out, *extra], *needles)
    assert _listing(tmp_path) == {}


def test_sample_png_grid_with_labels(tmp_path, capsys, ckpt):
    out = tmp_path / "grid.png"
    argv = ["sample", "--ckpt", ckpt, "--seeds", "0-4", "--labels", "2", "--sampler", "heun", "--steps", "1", "-o", out]
    assert run_cli(main, [str(a) for a in argv]) == 0
    assert "5 images" in capsys.readouterr().out
    grid = np.asarray(Image.open(out))
    assert grid.shape == (16, 24, 3)  # 3 columns x 2 rows of 8 px
    assert (grid[8:, 16:] == 0).all() and grid[:8, :8].std() > 0  # the empty sixth cell stays black
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # no temp file left


def test_guidance_needs_a_model_trained_for_it(tmp_path, capsys):
    cfg = dataclasses.replace(CFG, diffusion=dataclasses.replace(CFG.diffusion, label_dropout=0.0))
    path = tmp_path / "no-cfg.safetensors"
    save_model(path, UNet(**dataclasses.asdict(NET)).state_dict(),
               model_meta(kind="teacher", stage="teacher", config=cfg, step=0, ema_rate=0.0))
    _fails_in_process(capsys, ["sample", "--ckpt", path, "--guidance", "2", "-o", tmp_path / "s.npz"],
                      "guidance 2: no-cfg was not trained for classifier-free guidance")
    assert not (tmp_path / "s.npz").exists()


def test_info(capsys, ckpt):
    assert run_cli(main, ["info", "--ckpt", str(ckpt)]) == 0
    out = capsys.readouterr().out
    head, config = out.split("config:\n")
    assert "teacher" in head and "step:" in head and "resolution:" in head
    n = sum(p.numel() for p in UNet(**dataclasses.asdict(NET)).parameters())
    assert f"{n:,}" in head
    assert from_dict(TeacherConfig, json.loads(config)) == CFG


def test_info_refuses_other_kind(capsys, domain_file):
    _fails_in_process(capsys, ["info", "--ckpt", domain_file, "--kind", "teacher"], domain_file, "'teacher'")


def test_presets_and_no_command(capsys):
    assert run_cli(main, ["presets"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(PRESETS)
    assert all(PRESETS[line.split()[0]].description in line for line in out)
    _fails_in_process(capsys, [], "COMMAND")
    _fails_in_process(capsys, ["teacher"], "--preset")


def test_teacher_calls_the_stage(tmp_path, capsys, monkeypatch):
    import pagoda.stages.teacher as stage
    seen = {}

    def run(cfg, *, out_dir):
        seen.update(cfg=cfg, out_dir=out_dir)
        return Path(out_dir) / "teacher.safetensors"

    monkeypatch.setattr(stage, "run", run)
    monkeypatch.chdir(tmp_path)
    assert run_cli(main, ["teacher", "--preset", "smoke", "--set", "train.steps=3"]) == 0
    assert seen["out_dir"] == "runs/smoke-teacher" and seen["cfg"].train.steps == 3
    assert "runs/smoke-teacher/teacher.safetensors" in capsys.readouterr().out
    config = tmp_path / "c.json"
    config.write_text(json.dumps(to_dict(CFG)))
    assert run_cli(main, ["teacher", "--preset", "smoke", "--config", str(config), "--out", "x"]) == 0
    assert seen["cfg"] == CFG and seen["out_dir"] == "x"
