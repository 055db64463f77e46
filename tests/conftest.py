"""Shared fixtures: real test images and locally made weight files for the feature extractors.

No pretrained weights can be downloaded, so each fixture builds the exact architecture with
random weights (seeded) and saves it under the official file name in a weights folder that
is cached across runs in pytest's cache directory (delete `.pytest_cache` to rebuild).
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pagoda.checkpoint import write_atomic

# The project's machines reach no publisher: nothing a test runs may fetch (tests/test_download.py lifts this
# for its loopback server alone). tox sets it for every environment too.
os.environ["PAGODA_OFFLINE"] = "1"
# The feature cache (eval.cache) of everything the tests measure lives in one temporary folder per session.
# It is removed when the session ends (it was left behind, ~10 MB a run).
os.environ["PAGODA_FEATURES"] = tempfile.mkdtemp(prefix="pagoda-test-features-")
atexit.register(shutil.rmtree, os.environ["PAGODA_FEATURES"], ignore_errors=True)

WEIGHTS_VERSION = "v2"  # bump when the way test weights are made changes


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


def save_pngs(folder: Path, images: torch.Tensor) -> Path:
    """uint8 images [N, 3, H, W] as folder/000000.png ... (EDM2's seed names); returns the folder."""
    from PIL import Image

    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(scope="session")
def write_pngs():
    """`write_pngs(folder, images)`: save_pngs, for tests that need a folder of PNG files."""
    return save_pngs


@pytest.fixture(scope="session")
def domain_weights(tmp_path_factory) -> Path:
    """A folder holding a randomly initialised photos classifier where the `domain` extractor looks for it."""
    from pagoda.data import PHOTO_CLASSES
    from pagoda.networks.domain import DomainNet, save_domain_net

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("domain-weights")
    save_domain_net(DomainNet(len(PHOTO_CLASSES)).eval(), folder / "domain-photos.safetensors", {})
    return folder


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


def crop_photos(n: int, hw: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """n uint8 crops [n, 3, h, w] cut from the bundled photographs at their own resolution (no resampling,
    so a crop larger than a network's input keeps the fine detail that tells resize conventions apart)."""
    rng, photos, out = np.random.default_rng(seed), [p for p in _photos() if min(p.shape[:2]) >= max(hw)], []
    for i in range(n):
        img = photos[i % len(photos)]
        y, x = int(rng.integers(0, img.shape[0] - hw[0] + 1)), int(rng.integers(0, img.shape[1] - hw[1] + 1))
        out.append(img[y : y + hw[0], x : x + hw[1], :3])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def make_dinov2_weights(arch: str, path: Path, seed: int = 0) -> Path:
    """Write a random timm DINOv2 `arch` to `path` (safetensors) as the published file holds it: the 518 px
    (37 x 37) position grid, here a smooth random field (bicubic-upsampled 6 x 6 noise, std 0.1); LayerScale
    gammas drawn from U(0.1, 1) instead of timm's 1e-5 init (which makes every block an identity, so the CLS
    token ignores the image); everything else timm's init. Conventions that differ only in how the grid is
    resampled, or in where the CLS token is read, then move the features far more than float noise."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sd = timm.create_model(arch, pretrained=False, num_classes=0).state_dict()
    dim, grid = sd["pos_embed"].shape[-1], 37
    assert sd["pos_embed"].shape[1] == 1 + grid * grid, "timm's DINOv2 default is the 518 px grid"
    field = F.interpolate(torch.randn(1, dim, 6, 6, generator=gen), size=(grid, grid), mode="bicubic",
                          align_corners=True)
    field = 0.1 * field / field.std()
    cls = 0.1 * torch.randn(1, 1, dim, generator=gen)
    sd["pos_embed"] = torch.cat([cls, field.flatten(2).transpose(1, 2)], dim=1)
    for k in sd:
        if k.endswith(("ls1.gamma", "ls2.gamma")):
            sd[k] = 0.1 + 0.9 * torch.rand(dim, generator=gen)
    sd = {k: v.contiguous() for k, v in sd.items()}
    write_atomic(path, lambda p: save_file(sd, str(p)))
    return path


@pytest.fixture(scope="session")
def dinov2_weights(extractor_weights_dir) -> Path:
    """Random DINOv2 ViT-S/14 saved as timm's model.safetensors (518 px grid; see make_dinov2_weights)."""
    path = extractor_weights_dir / "vit_small_patch14_dinov2.lvd142m.safetensors"
    return path if path.exists() else make_dinov2_weights("vit_small_patch14_dinov2.lvd142m", path)


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


@pytest.fixture(scope="session")
def photo_crops():
    """`crop_photos(n, (h, w), seed)`: uint8 crops [n, 3, h, w] of the bundled photographs, unresampled."""
    return crop_photos


@pytest.fixture(scope="session")
def dinov2_weight_maker():
    """`make_dinov2_weights(arch, path, seed)`: a random DINOv2 file in the published layout (for slow tests)."""
    return make_dinov2_weights


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module (float results can depend on the thread count; the box is shared).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
