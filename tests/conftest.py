"""Shared fixtures: real test images and locally made weight files for the feature extractors.

No pretrained weights can be downloaded, so each fixture builds the exact architecture with
random weights (seeded) and saves it under the official file name in a weights folder that
is cached across runs in pytest's cache directory (delete `.pytest_cache` to rebuild).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from pagoda.checkpoint import write_atomic

WEIGHTS_VERSION = "v1"  # bump when the way test weights are made changes


def _photos() -> list[np.ndarray]:
    """The colour photographs that scikit-image and scikit-learn ship (HWC uint8)."""
    import skimage.data as d
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
    return [getattr(d, n)() for n in names] + list(load_sample_images().images)


@pytest.fixture(scope="session")
def real_images() -> torch.Tensor:
    """48 deterministic 64x64 uint8 crops [48, 3, 64, 64] of the bundled photographs."""
    from PIL import Image

    rng, photos, out = np.random.default_rng(0), _photos(), []
    for i in range(48):
        img = photos[i % len(photos)]
        s = int(rng.integers(96, min(img.shape[:2]) + 1))
        y, x = (int(rng.integers(0, n - s + 1)) for n in img.shape[:2])
        crop = Image.fromarray(img[y : y + s, x : x + s]).resize((64, 64), Image.BICUBIC)
        out.append(np.asarray(crop))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="session")
def extractor_weights_dir(request, tmp_path_factory) -> Path:
    """Folder holding every test weight file, cached across sessions (a temp folder under -p no:cacheprovider)."""
    name = f"pagoda-test-weights-{WEIGHTS_VERSION}-torch{torch.__version__}"
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir(name)) if cache is not None else tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def inception_weights(extractor_weights_dir, real_images) -> Path:
    """Random Inception (torch-fidelity's exact architecture), BN calibrated on real photos."""
    from bench.extract import random_inception_weights

    path = extractor_weights_dir / "weights-inception-2015-12-05-6726825d.pth"
    return path if path.exists() else random_inception_weights(extractor_weights_dir, real_images[::3])


@pytest.fixture(scope="session")
def dinov2_weights(extractor_weights_dir) -> Path:
    """Random DINOv2 ViT-S/14 at 224 px as timm's model.safetensors would hold it."""
    from safetensors.torch import save_file

    from eval.extractors import build_dinov2

    path = extractor_weights_dir / "vit_small_patch14_dinov2.lvd142m.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        sd = {k: v.contiguous() for k, v in build_dinov2("vit_small_patch14_dinov2.lvd142m").state_dict().items()}
        write_atomic(path, lambda p: save_file(sd, str(p)))
    return path


@pytest.fixture(scope="session")
def clip_weights(extractor_weights_dir) -> Path:
    """Random open_clip ViT-B-32 (QuickGELU) saved as open_clip_model.safetensors."""
    from safetensors.torch import save_file

    from eval.extractors import build_clip

    path = extractor_weights_dir / "ViT-B-32-openai" / "open_clip_model.safetensors"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        torch.manual_seed(0)
        sd = {k: v.contiguous().clone() for k, v in build_clip("ViT-B-32").state_dict().items()}
        write_atomic(path, lambda p: save_file(sd, str(p)))
    return path
