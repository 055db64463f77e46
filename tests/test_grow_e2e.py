"""Stage 3 end to end on a 512-image subset of `photos` (slow: about 15 minutes on 2 CPU cores).

A `photos`-preset teacher at 16 px -> inversion pairs of the subset -> G at 16 px -> grown to 32 and then 64 px,
each stage twice: with L_rec (the paper's objective) and without it (adversarial loss alone, the paper's Fig. 3
ablation). Checked: every stage samples at its resolution from the same 16 px noise with NFE 1; domain-feature
FD against the held-out photos at each resolution is finite; and the drift between resolutions
(`pagoda drift`: RMS of area-downsample(G_2x(z)) - G(z), same seeds) is smaller with L_rec than without it at
both growth stages. The subset is stored at 64 px, so the 16, 32 and 64 px crops of an item come from the same
source image.
"""

import json

import pytest
import torch

from eval.ref import main as ref_main
from eval.run import main as run_main
from pagoda.__main__ import main
from pagoda.data import build_dataset, save_npz
from pagoda.errors import run_cli
from pagoda.generator import load_generator
from pagoda.pairs import pair_batch
from pagoda.stages.grow import drift

pytestmark = pytest.mark.slow
STEPS = 150  # grow steps per stage (the preset's 300 halved to keep the test near 15 minutes)


def test_photos_grown_16_32_64_with_and_without_l_rec(tmp_path):
    photos = build_dataset("photos", 64)
    x, y = pair_batch(photos, range(0, 2 * len(photos), 2 * len(photos) // 512))  # 512 unflipped crops
    save_npz(tmp_path / "data.npz", x.permute(0, 2, 3, 1).numpy(), y.numpy())
    run = lambda *a: run_cli(main, [str(v) for v in a])  # noqa: E731
    weights = tmp_path / "w"
    assert run("domain", "-o", weights / "domain-photos.safetensors", "--epochs", "2") == 0
    assert run("teacher", "--preset", "photos", "--out", tmp_path / "t",
               "--set", f"data.source={tmp_path / 'data.npz'}") == 0
    teacher = tmp_path / "t" / "teacher.safetensors"
    assert run("pairs", "--teacher", teacher, "--data", tmp_path / "data.npz", "-o", tmp_path / "p",
               "--shard-size", 256, "--batch", 64) == 0
    assert run("distill", "--preset", "photos", "--teacher", teacher, "--pairs", tmp_path / "p",
               "--out", tmp_path / "g16") == 0
    paths = {16: tmp_path / "g16" / "G.safetensors"}
    for variant, more in (("rec", []), ("adv", ["--set", "loss.w_rec=0"])):
        src = paths[16]
        for res in (32, 64):
            out = tmp_path / f"g{res}-{variant}"
            assert run("grow", "--preset", "photos", "--from", src, "--pairs", tmp_path / "p", "--out", out,
                       "--set", f"train.steps={STEPS}", *more) == 0
            src = paths[(res, variant)] = out / "G.safetensors"

    gens = {k: load_generator(p) for k, p in paths.items()}
    for (res, _), g in ((k, v) for k, v in gens.items() if k != 16):
        assert g.resolution == res and g.noise_shape == (3, 16, 16) and g.nfe == 1
    seeds = torch.arange(500)
    drifts = {}
    for variant in ("rec", "adv"):
        drifts[variant] = (drift(gens[16], gens[(32, variant)], seeds)["drift_rms"],
                           drift(gens[(32, variant)], gens[(64, variant)], seeds)["drift_rms"])
    print("drift rms (16->32, 32->64):", drifts)
    assert drifts["rec"][0] < drifts["adv"][0] and drifts["rec"][1] < drifts["adv"][1]

    common = ["--extractor", "domain", "--weights-dir", str(weights), "--allow-small"]
    refs = []
    for res in (16, 32, 64):
        refs += ["--ref", str(tmp_path / f"ref{res}.npz")]
        assert run_cli(ref_main, [f"photos:heldout:{res}", "-o", str(tmp_path / f"ref{res}.npz"), *common]) == 0
    ckpts = [a for p in paths.values() for a in ("--ckpt", str(p))]
    assert run_cli(run_main, [*ckpts, *refs, "--metrics", "fid", "--num-samples", "500", "--out",
                              str(tmp_path / "rows.jsonl"), *common]) == 0
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    print("FD:", {(r["model"], r["resolution"]): round(r["value"], 2) for r in rows})
    assert sorted(r["resolution"] for r in rows) == [16, 32, 32, 64, 64]
    assert all(r["nfe"] == 1 and 0 < r["value"] < float("inf") for r in rows)
