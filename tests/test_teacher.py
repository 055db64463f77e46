"""Stage 1 end to end: the EDM teacher learns the bundled photos, class by class, and its file samples.

The class check uses what a short CPU run can learn: each photograph has its own colour, so the
mean colour of a class's samples must sit nearer that class's data than other classes' data.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from pagoda.config import PRESETS, SampleConfig, UNetConfig
from pagoda.data import build_dataset
from pagoda.errors import UserError
from pagoda.generator import load_generator
from pagoda.stages import teacher

NET = UNetConfig(resolution=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4,), num_head_channels=32, num_classes=16)


def _config(steps: int, **train):
    smoke = PRESETS["smoke"].teacher
    return dataclasses.replace(smoke, network=NET, sample=SampleConfig(sampler="heun", steps=8),
                               train=dataclasses.replace(smoke.train, steps=steps, batch=32, lr=4e-3,
                                                         lr_warmup=10, ema_rate=0.95, log_every=10,
                                                         snapshot_every=steps, **train))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    path = teacher.run(_config(240), out_dir=out)
    return out, path


def test_loss_falls_and_run_directory(trained):
    out, path = trained
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, 241, 10))
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.6 * first, (first, last)
    assert path == out / "teacher.safetensors" and (out / "state.pt").exists()
    assert json.loads((out / "config.json").read_text())["network"]["num_classes"] == 16


def test_samples_follow_their_class(trained):
    _, path = trained
    gen = load_generator(path)
    assert (gen.kind, gen.resolution, gen.num_classes, gen.nfe) == ("teacher", 8, 16, 15.0)
    assert gen.supports_guidance  # trained with label dropout
    data = build_dataset("photos", 8)
    x, y = torch.stack([data[i][0] for i in range(len(data))]).double(), torch.tensor([data[i][1] for i in range(len(data))])
    data_mean = torch.stack([x[y == c].mean((0, 2, 3)) for c in range(16)])  # [16, 3] mean RGB per class
    per_class = 12
    labels = torch.arange(16).repeat_interleave(per_class)
    imgs = gen.sample(torch.arange(len(labels)), labels).double()
    assert imgs.shape == (16 * per_class, 3, 8, 8) and imgs.std() > 10  # not a constant image
    sample_mean = imgs.view(16, per_class, 3, 8, 8).mean((1, 3, 4))
    dist = torch.cdist(sample_mean, data_mean)  # [sample class, data class]
    own = dist.diagonal().mean()
    others = (dist.sum() - dist.diagonal().sum()) / (16 * 15)
    assert own < 0.5 * others, (own.item(), others.item())
    assert (dist.argmin(1) == torch.arange(16)).float().mean() >= 0.4  # chance: 1/16


def test_wrong_class_count_is_refused(tmp_path):
    cfg = dataclasses.replace(_config(1), network=dataclasses.replace(NET, num_classes=10))
    with pytest.raises(UserError, match="network.num_classes=16"):
        teacher.run(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written for a refused config


def test_unconditional_data(tmp_path):
    """An ADM npz without labels trains an unconditional teacher (no class embedding, no dropout)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", arr_0=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8))
    cfg = dataclasses.replace(_config(3), data=dataclasses.replace(_config(3).data, source=str(tmp_path / "data.npz")),
                              network=dataclasses.replace(NET, num_classes=0))
    gen = load_generator(teacher.run(cfg, out_dir=tmp_path / "run"))
    assert gen.num_classes == 0 and not gen.supports_guidance
    assert gen.sample([0, 1]).shape == (2, 3, 8, 8)
