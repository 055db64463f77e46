"""Stage 2 end to end on a 512-image subset of `photos` at 16 px (slow: about 6 minutes on 2 CPU cores).

A `photos`-preset teacher -> inversion pairs of the subset -> G (L_rec, the preset's budget). Checked:
G's one-step reconstructions of training items are far closer under d than the teacher's one-step (Euler)
output from the same latents, and G's samples beat the teacher's Euler at NFE 1 and 2 on domain-feature FD
against the held-out photos (same reference, same sample count). On held-out images (other strips of the
same 16 photographs, inverted by the teacher) G's reconstructions are no closer than the teacher's one
step: with 16 source photographs G does not generalise to unseen inversions (README, issue note).

A second test does the held-out check where the data allow it: scikit-learn's 1,797 handwritten digits (8 px,
upsampled to 16 px), 1,536 for training and 261 held out. There G's one-step reconstructions of held-out
digits are far closer under d than the teacher's one step, and as close as those of training digits.
"""

import json

import numpy as np
import pytest
import torch

from eval.ref import main as ref_main
from eval.run import main as run_main
from pagoda.__main__ import main
from pagoda.checkpoint import load_teacher
from pagoda.data import build_dataset, save_npz, to_model
from pagoda.diffusion import karras_sigmas, one_step
from pagoda.errors import run_cli
from pagoda.generator import load_generator
from pagoda.losses import d
from pagoda.networks.features import build_backbone
from pagoda.pairs import load_pairs, pair_batch
from pagoda.samplers import euler

pytestmark = pytest.mark.slow


def test_stage2_on_photos_beats_the_teacher_at_one_and_two_steps(tmp_path):
    photos = build_dataset("photos", 16)
    x, y = pair_batch(photos, range(0, 2 * len(photos), 2 * len(photos) // 512))  # 512 unflipped crops
    save_npz(tmp_path / "data.npz", x.permute(0, 2, 3, 1).numpy(), y.numpy())
    run = lambda *a: run_cli(main, [str(v) for v in a])  # noqa: E731
    assert run("domain", "-o", tmp_path / "w" / "domain-photos.safetensors", "--epochs", "2") == 0
    assert run("teacher", "--preset", "photos", "--out", tmp_path / "t",
               "--set", f"data.source={tmp_path / 'data.npz'}") == 0
    teacher = tmp_path / "t" / "teacher.safetensors"
    assert run("pairs", "--teacher", teacher, "--data", tmp_path / "data.npz", "-o", tmp_path / "p",
               "--shard-size", 256, "--batch", 64) == 0
    assert run("distill", "--preset", "photos", "--teacher", teacher, "--pairs", tmp_path / "p",
               "--out", tmp_path / "g") == 0
    g_path = tmp_path / "g" / "G.safetensors"

    # Reconstructions of 64 training items: G(z_x) against the teacher's one Euler step from the same z_x.
    den = load_teacher(teacher).denoiser()
    pairs = load_pairs(tmp_path / "p")
    items = [pairs[j] for j in range(0, len(pairs), len(pairs) // 64)][:64]
    xh, yh, z = (torch.stack([it[k] for it in items]) for k in range(3))
    g = load_generator(g_path)
    with torch.no_grad():
        rec_teacher = euler(den, z, karras_sigmas(1), labels=yh).clamp(-1, 1)
        rec_g = one_step(g.net, z, yh, sigma_max=g.sigma_max).float().clamp(-1, 1)
        backbone = build_backbone("random", seed=1)
        d_teacher, d_g = (float(d(r, to_model(xh), [backbone]).mean()) for r in (rec_teacher, rec_g))
    assert d_g < 0.5 * d_teacher, (d_g, d_teacher)

    # FD on domain features against the held-out photos, 500 samples each.
    common = ["--extractor", "domain", "--weights-dir", str(tmp_path / "w"), "--allow-small"]
    ref = tmp_path / "ref.npz"
    assert run_cli(ref_main, ["photos:heldout:16", "-o", str(ref), *common]) == 0
    out = tmp_path / "fd.jsonl"
    assert run_cli(run_main, ["--ckpt", str(g_path), "--ref", str(ref), "--num-samples", "500", "-o", str(out),
                              *common]) == 0
    assert run_cli(run_main, ["--ckpt", str(teacher), "--ref", str(ref), "--num-samples", "500", "--sampler", "euler",
                              "--steps", "1,2", "-o", str(out), *common]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    fd = {(r["method"], r["nfe"]): r["value"] for r in rows}
    assert fd[("pagoda", 1)] < fd[("ddim", 1)] and fd[("pagoda", 1)] < fd[("ddim", 2)], fd


def _digits_npz(folder):
    """scikit-learn's digits as 16 px RGB uint8 (bilinear from 8 px), split 1,536 train / 261 held out (seed 0)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x.repeat(1, 3, 1, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    save_npz(folder / "train.npz", x[perm[:1536]], y[perm[:1536]])
    save_npz(folder / "heldout.npz", x[perm[1536:]], y[perm[1536:]])


def test_stage2_generalises_to_held_out_digits(tmp_path):
    _digits_npz(tmp_path)
    run = lambda *a: run_cli(main, [str(v) for v in a])  # noqa: E731
    assert run("teacher", "--preset", "photos", "--out", tmp_path / "t", "--set", f"data.source={tmp_path / 'train.npz'}",
               "--set", "network.num_classes=10", "--set", "train.steps=800") == 0
    teacher = tmp_path / "t" / "teacher.safetensors"
    for split in ("train", "heldout"):
        assert run("pairs", "--teacher", teacher, "--data", tmp_path / f"{split}.npz", "-o", tmp_path / f"p-{split}",
                   "--shard-size", 512, "--batch", 32) == 0
    assert run("distill", "--preset", "photos", "--teacher", teacher, "--pairs", tmp_path / "p-train",
               "--out", tmp_path / "g") == 0

    den = load_teacher(teacher).denoiser()
    g = load_generator(tmp_path / "g" / "G.safetensors")
    backbone = build_backbone("random", seed=1)
    result = {}
    for split in ("train", "heldout"):
        pairs = load_pairs(tmp_path / f"p-{split}")
        items = [pairs[j] for j in range(0, len(pairs), max(1, len(pairs) // 256))][:256]
        x, y, z = (torch.stack([it[k] for it in items]) for k in range(3))
        with torch.no_grad():
            rec_teacher = euler(den, z, karras_sigmas(1), labels=y).clamp(-1, 1)
            rec_g = one_step(g.net, z, y, sigma_max=g.sigma_max).float().clamp(-1, 1)
            result[split] = tuple(float(d(r, to_model(x), [backbone]).mean()) for r in (rec_g, rec_teacher))
    # Measured (README): held-out d 0.028 for G against 0.264 for the teacher's one step; train 0.028.
    assert result["heldout"][0] < 0.5 * result["heldout"][1], result
    assert result["heldout"][0] < 1.5 * result["train"][0], result
