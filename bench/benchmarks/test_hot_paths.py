"""pytest-benchmark suite of the hot paths (`tox -e bench`; never part of the default test run).

    tox -e bench                                   # run, compare with the newest saved run, save this one
    .venv/bin/python -m pytest bench/benchmarks --benchmark-enable --benchmark-storage=bench/baselines \\
        --benchmark-compare=0001 --benchmark-compare-fail=median:25%   # fail on a 25% slower median

Saved runs live in bench/baselines/<machine>/NNNN_*.json (pytest-benchmark's layout; the committed one was
made on the 2-core CI-class machine the README names). Timings are comparable only on the same machine and
thread count: compare a change against a baseline you saved yourself on the same machine, before the change.

Sizes: the photos teacher UNet (~1.3M parameters) at 16 px, batch 64; one-step sampling of 64 images with it;
Inception (exact architecture, random weights: speed does not depend on the values) on 16 images of 64 px
resized to 299 as eval extracts them; the Frechet distance at d = 2048 (float64 covariances, eigenvalues);
precision / recall (k = 3) at 10k real x 10k fake features of d = 2048.
"""

import dataclasses

import numpy as np
import pytest
import torch

from eval.extractors import InceptionExtractor
from eval.metrics import frechet_distance, precision_recall
from pagoda.config import UNetConfig
from pagoda.generator import OneStepGenerator
from pagoda.networks.unet import UNet


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(**dataclasses.asdict(UNetConfig())).eval().requires_grad_(False)


def test_unet_forward(benchmark, unet):
    x, sigma = torch.randn(64, 3, 16, 16), torch.full((64,), 1.0)
    labels = torch.zeros(64, dtype=torch.long)

    def forward():
        with torch.no_grad():
            return unet(x, sigma, labels)

    out = benchmark.pedantic(forward, rounds=20, warmup_rounds=2)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_one_step_sampling(benchmark, unet):
    gen = OneStepGenerator(unet, resolution=16, num_classes=unet.num_classes)
    seeds = torch.arange(64)
    images = benchmark.pedantic(lambda: gen.sample(seeds), rounds=20, warmup_rounds=2)
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.uint8


@pytest.mark.filterwarnings("ignore:.*is not the official inception file")
def test_inception_extraction(benchmark, tmp_path_factory):
    import torchvision

    from eval.extractors import torch_fidelity_inception
    from pagoda.weights import INCEPTION

    torch.manual_seed(0)
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    folder = tmp_path_factory.mktemp("inception")
    torch.save(torch_fidelity_inception(tv.state_dict()).state_dict(), folder / INCEPTION.files[0])
    ex = InceptionExtractor(weights_dir=folder)
    x = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    out = benchmark.pedantic(lambda: ex(x), rounds=5, warmup_rounds=1)
    assert out["features"].shape == (16, 2048)


def _gaussian(d: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    f = np.random.default_rng(seed).standard_normal((n, d))
    return f.mean(0), np.cov(f, rowvar=False)


def test_frechet_distance_2048(benchmark):
    (mu1, s1), (mu2, s2) = _gaussian(2048, 4096, 0), _gaussian(2048, 4096, 1)
    fd = benchmark.pedantic(frechet_distance, args=(mu1, s1, mu2, s2), rounds=3, warmup_rounds=1)
    assert fd > 0


def test_precision_recall_10k(benchmark):
    rng = np.random.default_rng(0)
    real = rng.standard_normal((10_000, 2048), dtype=np.float32)
    fake = rng.standard_normal((10_000, 2048), dtype=np.float32)
    p, r = benchmark.pedantic(precision_recall, args=(real, fake), kwargs={"k": 3}, rounds=3, warmup_rounds=0)
    assert 0 < p <= 1 and 0 < r <= 1
