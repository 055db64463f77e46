"""Feature extractors: parity with the reference tools on identical images and weights, and failure modes.

The weights are random (nothing can be downloaded) but of the exact architectures; the
Inception's BatchNorm statistics are calibrated on real photos so that its features carry
information. Inception runs at a few img/s here, so its features are extracted once per session.
"""

import hashlib
import io
import os
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from eval.extractors import (
    EXTRACTORS,
    build_dinov2,
    cosine,
    get_extractor,
    tf1_bilinear_resize,
    torch_fidelity_inception,
)
from eval.metrics import fid_from_features, frechet_distance, gaussian_stats
from pagoda.errors import UserError
from pagoda.weights import INCEPTION, SPECS, load_state_dict, resolve_weights, sha256_file

N_SET = 12  # images per Inception set (two sets)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def fid(f1, f2) -> float:
    """FID of two feature sets (N < D here: the covariances are singular; fine for parity)."""
    with pytest.warns(UserWarning, match="singular"):
        return fid_from_features(f1, f2)


@pytest.fixture(scope="session")
def inception(inception_weights):
    return get_extractor("inception", weights_dir=inception_weights.parent)


@pytest.fixture(scope="session")
def tf_inception(inception_weights):
    """torch-fidelity's unmodified extractor holding the same weights."""
    return torch_fidelity_inception(load_state_dict(inception_weights)).eval()


@pytest.fixture(scope="session")
def inception_feats(inception, tf_inception, real_images):
    """Ours and torch-fidelity's outputs on two sets of N_SET photos, extracted once."""
    x = real_images[: 2 * N_SET]
    ours = inception(x)
    with torch.no_grad():
        ref = tf_inception(x)
    return {"x": x, "ours": ours, "ref": {"features": ref[0], "logits": ref[1]}}


# --- Inception ------------------------------------------------------------------------------


def test_inception_features_match_torch_fidelity(inception, inception_feats):
    ours, ref = inception_feats["ours"], inception_feats["ref"]
    assert ours["features"].shape == (2 * N_SET, 2048) and ours["logits"].shape == (2 * N_SET, 1008)
    assert ours["features"].dtype == ours["logits"].dtype == torch.float32
    assert rel_err(ours["features"], ref["features"]) < 1e-4
    assert rel_err(ours["logits"], ref["logits"]) < 1e-4
    assert (inception.feature_dim, inception.num_logits, inception.resize) == (2048, 1008, "tf1-bilinear-299")
    assert inception.spatial_dim == 2023 and ours["spatial"].shape == (2 * N_SET, 2023)  # parity: test_extractor_parity


def test_random_weights_are_informative(inception_feats):
    f = inception_feats["ours"]["features"].double()
    a, b = f[:N_SET], f[N_SET:]
    spread = f.std(0).mean().item()
    assert spread > 1e-2 * f.abs().mean().item()  # not collapsed to a constant vector
    assert fid(a, b) > 1e-2 * (np.trace(gaussian_stats(a)[1]) + np.trace(gaussian_stats(b)[1]))
    assert abs(fid(a, a)) < 1e-6 * fid(a, b)


def test_inception_fid_matches_torch_fidelity_calculate_metrics(inception_weights, inception_feats):
    """torch-fidelity end to end: its dataset loop, its extractor, its FID; the weights go in as an in-memory
    state dict (it unpickles whatever it is given, so it never sees a user's file path)."""
    import torch_fidelity

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    buf = io.BytesIO()
    torch.save(load_state_dict(inception_weights), buf)
    buf.seek(0)
    x, ours = inception_feats["x"], inception_feats["ours"]["features"]
    with pytest.warns(UserWarning):
        ref = torch_fidelity.calculate_metrics(
            input1=Images(x[:N_SET]), input2=Images(x[N_SET:]), fid=True, cuda=False, cache=False, verbose=False,
            batch_size=N_SET, feature_extractor="inception-v3-compat", feature_extractor_weights_path=buf,
        )["frechet_inception_distance"]
    ours_fid = fid(ours[:N_SET], ours[N_SET:])
    assert abs(ours_fid - ref) <= 1e-3 * abs(ref)


def test_inception_fid_matches_clean_fid_formula(inception_feats):
    from cleanfid.fid import frechet_distance as clean_frechet

    f = inception_feats["ours"]["features"].double().numpy()
    s1, s2 = gaussian_stats(f[:N_SET]), gaussian_stats(f[N_SET:])
    ours = frechet_distance(*s1, *s2)
    clean = clean_frechet(s1[0], s1[1], s2[0], s2[1])  # scipy sqrtm: singular here, so a looser check
    assert abs(ours - clean) <= 1e-2 * abs(clean)


@pytest.mark.parametrize("hw", [(64, 64), (8, 8), (17, 33), (300, 300), (512, 384)])
def test_matmul_resize_equals_torch_fidelity_tf1_resize(hw):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.randint(0, 256, (2, 3, *hw), generator=torch.Generator().manual_seed(0)).float()
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert (tf1_bilinear_resize(x, 299) - ref).abs().max() < 1e-4  # pixel units 0..255: float rounding only


def test_inception_is_batch_size_independent(inception, inception_feats):
    x = inception_feats["x"][:6]
    small = torch.cat([inception(c)["features"] for c in x.split(2)])
    assert rel_err(small, inception_feats["ours"]["features"][:6]) < 1e-5


def test_pytorch_fid_file_name_and_unfolded_path(inception_weights, inception_feats, tf_inception, tmp_path):
    os.symlink(inception_weights, tmp_path / INCEPTION.files[1])
    assert resolve_weights("inception", tmp_path).name == INCEPTION.files[1]
    ex = get_extractor("inception", weights_dir=tmp_path, fold=False)  # torch-fidelity's module as is
    assert ex.weights_sha256 == sha256_file(inception_weights)
    x = inception_feats["x"][:2]
    with torch.no_grad():
        ref = tf_inception(x)
    out = ex(x)
    # bit-exact at the same batch; oneDNN may pick other conv kernels for another batch size (~1e-5 apart)
    assert torch.equal(out["features"], ref[0]) and torch.equal(out["logits"], ref[1])


# --- weights files --------------------------------------------------------------------------


def test_missing_weights_fail_fast_with_instructions(tmp_path, monkeypatch):
    """Offline (as every test runs), a missing file is one line: its name, hash, address and where to copy it."""
    monkeypatch.delenv("PAGODA_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):  # a hub client would open a socket (and retry for ~50 s)
        raise AssertionError("a missing weights file must not reach for the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    for name in ("inception", "dinov2", "clip", "clip-vitl14-336"):
        with pytest.raises(UserError) as e:
            get_extractor(name, weights_dir=tmp_path)
        msg = str(e.value)
        assert SPECS[name].files[0] in msg and "PAGODA_OFFLINE=1" in msg and str(tmp_path / SPECS[name].files[0]) in msg
        assert SPECS[name].url in msg and "\n" not in msg
        assert (SPECS[name].sha256[0] if SPECS[name].sha256 else "no published SHA-256") in msg
    with pytest.raises(UserError, match=str(tmp_path / "xdg" / "pagoda")):  # the default cache
        get_extractor("inception")


def test_env_variable_names_the_folder(inception_weights, monkeypatch):
    monkeypatch.setenv("PAGODA_WEIGHTS", str(inception_weights.parent))
    assert resolve_weights("inception") == inception_weights


def test_wrong_architecture_and_truncated_files(dinov2_weights, inception_weights, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    torch.save(load_state_dict(dinov2_weights), wrong / INCEPTION.files[0])
    with pytest.raises(UserError, match="does not fit"):
        get_extractor("inception", weights_dir=wrong)
    shutil.copy(inception_weights, tmp_path / "dinov2.pth")
    (tmp_path / "vit_small_patch14_dinov2.lvd142m.pth").write_bytes(b"")  # empty file
    with pytest.raises(UserError, match="could not be read"):
        get_extractor("dinov2-vits14", weights_dir=tmp_path)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / INCEPTION.files[0]).write_bytes(inception_weights.read_bytes()[:100_000])
    with pytest.raises(UserError, match="could not be read"):
        get_extractor("inception", weights_dir=cut)


def test_sha256_and_official_hash_check(inception_weights):
    assert sha256_file(inception_weights) == hashlib.sha256(inception_weights.read_bytes()).hexdigest()
    with pytest.warns(UserWarning, match="not the official inception file"):
        get_extractor("inception", weights_dir=inception_weights.parent)
    with pytest.raises(UserError, match="not the official"):
        get_extractor("inception", weights_dir=inception_weights.parent, strict=True)


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / INCEPTION.files[0])
    with pytest.raises(UserError, match="could not be read"):
        get_extractor("inception", weights_dir=tmp_path)


# --- input validation and registry ----------------------------------------------------------


def test_bad_inputs_and_names(inception):
    with pytest.raises(UserError, match="uint8"):
        inception(torch.rand(2, 3, 32, 32))
    with pytest.raises(UserError, match=r"\[N, 3, H, W\]"):
        inception(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"\[N, 3, H, W\]"):
        inception(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(UserError, match="inception, dinov2"):
        get_extractor("fid-net")
    with pytest.raises(UserError, match="no option colour"):
        get_extractor("inception", colour=True)
    assert set(EXTRACTORS) == {"inception", "dinov2", "dinov2-vitb14", "dinov2-vits14", "clip", "clip-vitb32",
                               "clip-vitl14-336", "domain"}
    from eval.registry import METRICS

    assert all(set(e.metrics) <= set(METRICS) for e in EXTRACTORS.values())  # the registry's metric names
    assert EXTRACTORS["clip-vitl14-336"].metrics == ("cmmd",) and "sfid" in EXTRACTORS["inception"].metrics


# --- DINOv2 (parity with the hub forward: test_extractor_parity.py) --------------------------------------------


def test_dinov2_resize_modes(dinov2_weights, real_images):
    ex = get_extractor("dinov2-vits14", weights_dir=dinov2_weights.parent)
    assert (ex.resize, ex.feature_dim, ex.net.pos_embed.shape[1]) == ("edm2-torch", 384, 1 + 16 * 16)
    pil = get_extractor("dinov2-vits14", weights_dir=dinov2_weights.parent, resize="pil-bicubic")
    x = real_images[:4]
    a, b = ex(x)["features"], pil(x)["features"]
    assert a.shape == (4, 384) and a.dtype == torch.float32 and not torch.allclose(a, b)
    with pytest.raises(UserError, match="edm2-torch, pil-bicubic"):
        get_extractor("dinov2-vits14", weights_dir=dinov2_weights.parent, resize="torch-bicubic-aa")


def test_dinov2_vitl14_builds_without_download():
    with torch.device("meta"):  # architecture only: no memory, no weights, no network
        net = build_dinov2("vit_large_patch14_dinov2.lvd142m")
        out = net.forward_features(torch.empty(2, 3, 224, 224))
    assert net.num_features == 1024 and out.shape == (2, 1 + 256, 1024)


# --- CLIP -----------------------------------------------------------------------------------


def test_clip_image_text_and_cosine(clip_weights, real_images):
    import torchvision.transforms as T

    ex = get_extractor("clip-vitb32", weights_dir=clip_weights.parent.parent)
    x = real_images[:4, :, :, :48]  # non-square: short side resize then center crop
    ref_t = T.Compose([T.Resize(224, T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                       T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    ref_in = torch.stack([ref_t(Image.fromarray(a)) for a in x.permute(0, 2, 3, 1).numpy()])
    assert (ex.preprocess(x) - ref_in).abs().max() < 1e-6
    img = ex(x)["features"]
    txt = ex.encode_text(["a cat", "a rocket", "coffee", "a photo of an astronaut"])
    assert img.shape == txt.shape == (4, 512) and ex.feature_dim == 512
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(4), atol=1e-5)
    cos = cosine(img, txt)
    assert torch.allclose(cos, (img.double() * txt.double()).sum(-1), atol=1e-6) and (cos.abs() <= 1).all()
    with pytest.raises(UserError, match="list of strings"):
        ex.encode_text("a cat")
    with pytest.raises(UserError, match="one caption per image"):
        cosine(img, txt[:2])


# --- domain ---------------------------------------------------------------------------------


def test_domain_adapter(tmp_path, real_images):
    from pagoda.data import PHOTO_CLASSES
    from pagoda.networks.domain import DomainNet, save_domain_net

    torch.manual_seed(0)
    net = DomainNet(len(PHOTO_CLASSES)).eval()
    save_domain_net(net, tmp_path / "domain-photos.safetensors", {})
    ex = get_extractor("domain", weights_dir=tmp_path)
    out = ex(real_images[:4])
    with torch.no_grad():
        ref_f, ref_l = net(real_images[:4])
    assert torch.equal(out["features"], ref_f) and torch.equal(out["logits"], ref_l)
    assert (ex.feature_dim, ex.num_logits) == (ref_f.shape[1], len(PHOTO_CLASSES))
