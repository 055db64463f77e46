"""Stage-2b losses and feature backbones: d is a symmetric distance with d(x, x) = 0 on every backbone, hinge
losses and the adaptive weight lambda against closed forms, the paper backbones load from local files only."""

import math

import pytest
import torch
import torch.nn.functional as F

from pagoda.errors import UserError
from pagoda.losses import (
    adaptive_weight,
    adaptive_weight_layer,
    d,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_distance,
)
from pagoda.networks.discriminator import ProjectedDiscriminator, apply_augment, augment_params
from pagoda.networks.features import Backbone, build_backbone, resize_paper
from pagoda.weights import SPECS


def _images(n: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _draw(n: int, seed: int = 0):
    return augment_params(n, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def domain_dir(tmp_path_factory):
    """A weights folder holding a randomly initialised photos classifier under its official name."""
    from pagoda.networks.domain import DomainNet, save_domain_net

    folder = tmp_path_factory.mktemp("domain-weights")
    torch.manual_seed(0)
    save_domain_net(DomainNet(4, width=16, input_resolution=32), folder / SPECS["domain"].files[0], report={})
    return folder


@pytest.fixture(scope="session")
def paper_dir(extractor_weights_dir):
    """Random timm DeiT-base distilled and EfficientNet-lite0 saved under their official names (cached)."""
    import timm
    from safetensors.torch import save_file

    from pagoda.checkpoint import write_atomic

    for key, arch in (("deit-base-distilled", "deit_base_distilled_patch16_224"),
                      ("efficientnet-lite0", "tf_efficientnet_lite0")):
        path = extractor_weights_dir / SPECS[key].files[0]
        if not path.exists():
            torch.manual_seed(0)
            sd = {k: v.contiguous() for k, v in timm.create_model(arch, pretrained=False).state_dict().items()}
            write_atomic(path, lambda p, sd=sd: save_file(sd, str(p)))
    return extractor_weights_dir


# ---------------------------------------------------------------------------------------------------------
# d and its backbones.

@pytest.mark.parametrize("name", ["random", "domain"])
def test_d_is_zero_on_equal_images_and_symmetric(name, domain_dir):
    bb = build_backbone(name, weights_dir=domain_dir)
    x, y = _images(seed=0), _images(seed=1)
    for draw in (None, _draw(3)):
        assert torch.equal(d(x, x, bb, draw), torch.zeros(3))
        dxy, dyx = d(x, y, bb, draw), d(y, x, bb, draw)
        assert dxy.shape == (3,) and (dxy > 0).all()
        torch.testing.assert_close(dxy, dyx, rtol=0, atol=0)


def test_random_backbone_is_seeded_multiscale_and_not_degenerate():
    state = torch.get_rng_state()
    a, b, c = build_backbone("random", seed=0), build_backbone("random", seed=0), build_backbone("random", seed=1)
    assert torch.equal(torch.get_rng_state(), state), "building a backbone must not move the caller's RNG"
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    x = _images(2, 32)
    assert [tuple(f.shape) for f in a(x)] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4)]
    assert not any(p.requires_grad for p in a.parameters()) and not a.train().training
    # Features vary with the image: another image, a contrast change about mid-grey, a shift all register.
    assert (d(x, x.flip(0), a) > 0.1).all()
    assert (d(x, 0.5 * x, a) > 1e-3).all()
    assert (d(x, x.roll(1, dims=-1), a) > 1e-2).all()
    assert [tuple(f.shape) for f in a(_images(1, 8))] == [(1, 32, 4, 4), (1, 64, 2, 2), (1, 128, 1, 1)]


def test_domain_backbone_resizes_like_its_training_and_gives_its_block_maps(domain_dir):
    bb = build_backbone("domain", weights_dir=domain_dir)
    assert set(bb.weights) == {"domain"} and len(bb.weights["domain"]) == 64
    maps = bb(_images(2, 64))
    assert [tuple(f.shape) for f in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]
    x = _images(2, 64)
    want = bb.net.feature_maps(F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True))
    assert all(torch.equal(a, b) for a, b in zip(bb(x), want))


def test_reconstruction_distance_closed_form():
    # One 1x1 map: a = (3, 4) -> (0.6, 0.8), b = (1, 0): 0.4^2 + 0.8^2 = 0.8. A 2x1 map adds the mean over space.
    a1, b1 = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1), torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    a2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 2, 1)  # pixels (1, 0) and (0, 1)
    b2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 2, 1)  # both (1, 0): pixel 2 differs by 2
    got = reconstruction_distance([a1, a2], [b1, b2])
    torch.testing.assert_close(got, torch.tensor([0.8 + (0 + 2) / 2]))
    with pytest.raises(ValueError, match="shape"):
        reconstruction_distance([a1], [a2])


class _Upsampler(Backbone):
    """Resizes to 32 px (nearest) and returns the image itself as its one map."""

    def resize(self, x):
        return x if x.shape[-1] == 32 else F.interpolate(x, size=(32, 32), mode="nearest")

    def features(self, x):
        return [x]


def test_d_resizes_before_augmenting():
    bb, draw = _Upsampler("up").eval(), _draw(3, seed=4)
    x, y = _images(seed=0), _images(seed=1)
    want = reconstruction_distance([apply_augment(bb.resize(x), draw)], [apply_augment(bb.resize(y), draw)])
    other = reconstruction_distance([bb.resize(apply_augment(x, draw))], [bb.resize(apply_augment(y, draw))])
    torch.testing.assert_close(d(x, y, [bb], draw), want, rtol=0, atol=0)
    assert not torch.allclose(want, other)


def test_resize_paper():
    x = _images(1, 64)
    out = resize_paper(x)
    assert out.shape[-2:] == (224, 224)
    torch.testing.assert_close(out, F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False))
    big = _images(1, 256)
    assert resize_paper(big) is big and resize_paper(out) is out


# ---------------------------------------------------------------------------------------------------------
# Hinge losses and the adaptive weight.

def test_hinge_losses_on_known_logits():
    real = torch.tensor([[0.5, 2.0], [1.0, -1.0]])
    fake = torch.tensor([[-0.5, 0.0], [-2.0, 3.0]])
    # Sample 0: real mean(0.5, 0) = 0.25, fake mean(0.5, 1) = 0.75. Sample 1: real mean(0, 2) = 1, fake mean(0, 4) = 2.
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor([0.25, -0.5]))
    assert hinge_g_loss(torch.tensor([2.0, -1.0])).tolist() == [-2.0, 1.0]  # one logit per sample
    with pytest.raises(ValueError, match="shape"):
        hinge_d_loss(real, fake[:1])


def test_perfect_discriminator_has_zero_loss():
    g = torch.Generator().manual_seed(0)
    real, fake = 1 + torch.rand(5, 64, generator=g) * 3, -1 - torch.rand(5, 64, generator=g) * 3
    real[0, 0], fake[0, 0] = 1.0, -1.0  # the margins themselves
    assert torch.equal(hinge_d_loss(real, fake), torch.zeros(5))


def _linear_problem(a: float, b: float):
    """out = W v with W [4, 2], v = (3, 4): grad_W sum(out) = 1 v^T, |.| = sqrt(4) * 5 = 10.
    L_rec = a sum(out), L_adv = b sum(out): the norms are 10|a| and 10|b|."""
    lin = torch.nn.Linear(2, 4, bias=False)
    out = lin(torch.tensor([3.0, 4.0]))
    return a * out.sum(), b * out.sum(), lin.weight


@pytest.mark.parametrize("a,b", [(2.0, 1.0), (-3.0, 7.0), (1.0, 1000.0), (1000.0, 1.0), (1.0, 0.0)])
def test_adaptive_weight_closed_form(a, b):
    l_rec, l_adv, w = _linear_problem(a, b)
    ratio = min(10 * abs(a) / (10 * abs(b) + 1e-4), 1e4)
    lam = adaptive_weight(l_rec, l_adv, w)
    assert lam.shape == () and not lam.requires_grad and lam.dtype == torch.float32
    assert lam.item() == pytest.approx(min(max(ratio, 0.01), 10), rel=1e-6)
    (l_rec + lam * l_adv).backward()  # the graph is still there


def test_adaptive_weight_is_one_without_reconstruction_loss():
    _, l_adv, w = _linear_problem(1.0, 1.0)
    assert adaptive_weight(0.0, l_adv, w).item() == 1.0
    assert adaptive_weight(torch.tensor(0.0), l_adv, w).item() == 1.0
    l_zero, l_adv, w = _linear_problem(0.0, 1.0)  # attached, exactly 0 (the clip alone would give 0.01)
    assert adaptive_weight(l_zero, l_adv, w).item() == 1.0
    with pytest.raises(ValueError, match="not attached"):
        adaptive_weight(torch.tensor(0.5), l_adv, w)
    with pytest.raises(ValueError, match="L_adv does not depend"):
        adaptive_weight(_linear_problem(1.0, 1.0)[0], torch.tensor(1.0, requires_grad=True) * 2, w)


def test_adaptive_weight_on_a_unet_generator():
    from pagoda.networks.unet import UNet

    torch.manual_seed(0)
    G = UNet(resolution=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
             num_head_channels=32, num_classes=5)
    with torch.no_grad():  # fresh ADM heads are zero: give every weight a value so gradients reach W
        for p in G.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    W = adaptive_weight_layer(torch.nn.Sequential(G))
    assert W is G.output_blocks[-1][0].out_layers[3].weight and W.shape == (32, 32, 3, 3)
    bb = build_backbone("random")
    D = ProjectedDiscriminator(build_backbone("random", seed=1), num_classes=5, resolution=8, width=16)
    y = torch.tensor([0, 3])
    x_hat = G(torch.randn(2, 3, 8, 8), torch.full((2,), math.log(80) / 4), y)
    l_rec, l_adv = d(x_hat, _images(2, 8), bb).mean(), hinge_g_loss(D(x_hat, y)).mean()
    lam = adaptive_weight(l_rec, l_adv, W)
    g_rec = torch.autograd.grad(l_rec, W, retain_graph=True)[0].norm()
    g_adv = torch.autograd.grad(l_adv, W, retain_graph=True)[0].norm()
    assert lam.item() == pytest.approx(min(max(g_rec.item() / (g_adv.item() + 1e-4), 0.01), 10), rel=1e-5)
    with pytest.raises(ValueError, match="no pagoda UNet"):
        adaptive_weight_layer(D)


# ---------------------------------------------------------------------------------------------------------
# The paper's backbones: local files only.

def test_paper_backbone_from_local_files(paper_dir):
    bb = build_backbone("paper", weights_dir=paper_dir)
    assert [m.name for m in bb.members] == ["deit", "efficientnet-lite0"]
    assert set(bb.weights) == {"deit-base-distilled", "efficientnet-lite0"}
    assert not any(p.requires_grad for p in bb.parameters()) and not bb.train().training
    x = _images(1, 32).requires_grad_()
    maps = bb(x)
    shapes = [(1, 64, 112, 112), (1, 64, 56, 56), (1, 128, 28, 28), (1, 256, 14, 14)]
    assert [tuple(f.shape) for f in maps] == shapes * 2
    sum(f.square().mean() for f in maps).backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in bb.parameters())
    # Normalisation: DeiT sees ImageNet mean/std, EfficientNet (x + 1) / 2 standardised by 0.5, i.e. x itself.
    deit, eff = bb.members
    z = resize_paper(x.detach())
    assert torch.equal(eff.trunk(z)[0], eff.trunk.stages[0](z))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(deit.features(z)[2], deit.projection(deit.trunk(((z + 1) / 2 - mean) / std))[2])
    assert d(z, z, bb, _draw(1)).item() == 0.0
    # The DeiT maps come from blocks 2, 5, 8, 11: the projections differ per seed, the trunk does not.
    other = build_backbone("paper", weights_dir=paper_dir, seed=1)
    assert torch.equal(other.members[0].trunk.net.pos_embed, deit.trunk.net.pos_embed)
    assert not torch.equal(other.members[1].projection.ccm[0].weight, eff.projection.ccm[0].weight)


@pytest.mark.parametrize("projection,channels,size", [("ccm", [64, 128, 256, 512], 56), ("none", [24, 40, 112, 320], 56)])
def test_efficientnet_projections(paper_dir, projection, channels, size):
    bb = build_backbone("efficientnet-lite0", weights_dir=paper_dir, projection=projection)
    maps = bb(_images(1, 64))
    assert [f.shape[1] for f in maps] == channels and maps[0].shape[-1] == size


def test_paper_discriminator_shape(paper_dir):
    D = ProjectedDiscriminator(build_backbone("paper", weights_dir=paper_dir), num_classes=1000, resolution=64)
    assert len(D.heads) == 8 and D.num_patches == 8 * 16  # 4 x 4 patch logits per map, as StyleGAN-XL
    assert D(_images(2, 64), torch.tensor([0, 999])).shape == (2, 128)
    assert not any(k.startswith("backbone.") for k in D.state_dict())


def test_missing_or_wrong_weights_fail_fast(tmp_path, paper_dir, monkeypatch):
    monkeypatch.delenv("PAGODA_WEIGHTS", raising=False)
    for name in ("paper", "deit", "efficientnet-lite0", "domain"):
        with pytest.raises(UserError) as e:
            build_backbone(name, weights_dir=tmp_path)
        key = {"paper": "deit-base-distilled", "deit": "deit-base-distilled"}.get(name, name)
        msg = str(e.value)
        assert SPECS[key].files[0] in msg and SPECS[key].url in msg and "\n" not in msg
    # Only one of the two paper files present: the other is named before anything is built.
    (tmp_path / SPECS["efficientnet-lite0"].files[0]).symlink_to(paper_dir / SPECS["efficientnet-lite0"].files[0])
    with pytest.raises(UserError, match=SPECS["deit-base-distilled"].files[0]):
        build_backbone("paper", weights_dir=tmp_path)
    # The EfficientNet file under DeiT's name: another architecture.
    (tmp_path / SPECS["deit-base-distilled"].files[0]).symlink_to(paper_dir / SPECS["efficientnet-lite0"].files[0])
    with pytest.raises(UserError, match="does not fit timm deit_base_distilled_patch16_224") as e:
        build_backbone("deit", weights_dir=tmp_path)
    assert SPECS["deit-base-distilled"].url in str(e.value)
    with pytest.raises(UserError, match="unknown backbone"):
        build_backbone("vgg")
    with pytest.raises(UserError, match="unknown projection"):
        build_backbone("random", projection="csm")


def test_torch_hub_file_name_hash_is_checked(tmp_path, paper_dir):
    from pagoda.weights import load_state_dict

    hub = tmp_path / "tf_efficientnet_lite0-0aa007d2.pth"  # the official torch.hub name; our random file's hash differs
    torch.save(load_state_dict(paper_dir / SPECS["efficientnet-lite0"].files[0]), hub)
    with pytest.warns(UserWarning, match="does not start with the 0aa007d2"):
        bb = build_backbone("efficientnet-lite0", weights_dir=tmp_path)
    assert bb.weights["efficientnet-lite0"][:8] != "0aa007d2"
