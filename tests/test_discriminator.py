"""Projected discriminator (heads, conditioning, frozen backbone, state) and DiffAugment (checked against the
reference indexing of Zhao et al. 2020, shared draws, ranges, gradients)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from pagoda.losses import hinge_d_loss, hinge_g_loss
from pagoda.networks.discriminator import (
    AugmentDraw,
    ProjectedDiscriminator,
    apply_augment,
    augment_params,
    cutout_box,
    diff_augment,
    translation_pixels,
)
from pagoda.networks.features import build_backbone


def _images(n: int = 4, size: int = 16, seed: int = 0, w: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, w or size, generator=g) * 2 - 1


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _D(seed: int = 0, **kw) -> ProjectedDiscriminator:
    torch.manual_seed(seed)
    kw = {"num_classes": 5, "resolution": 16, "width": 16, **kw}
    return ProjectedDiscriminator(build_backbone("random"), **kw)


# ---------------------------------------------------------------------------------------------------------
# Discriminator.

def test_output_shape_and_heads():
    D = _D()
    assert len(D.heads) == 3 and D.num_patches == 25 + 1 + 1  # maps of 8, 4, 2 px: 4x4 conv (2x2 at 2 px)
    out = D(_images(), torch.tensor([0, 1, 2, 4]))
    assert out.shape == (4, D.num_patches) and out.dtype == torch.float32
    tiny = _D(resolution=8)  # maps of 4, 2, 1 px: one logit each
    assert tiny(_images(2, 8), torch.tensor([0, 1])).shape == (2, 3)
    # StyleGAN-XL widths when `width` is None: a 112 px map goes through 4 down-blocks (64, 128, 256, 512 ch).
    from pagoda.networks.discriminator import MiniDiscriminator

    head = MiniDiscriminator(64, (112, 112), num_classes=10, cond_dim=64, guidance=False)
    assert [b[0].out_channels for b in head.main] == [64, 128, 256, 512] and head.num_patches == 16


def test_spectral_norm_everywhere_and_batchnorm_in_down_blocks():
    D = _D(resolution=64)
    convs = [m for m in D.heads.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in D.heads.modules())
    assert any(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.2 for m in D.heads.modules())


def test_class_projection_changes_logits_per_class():
    D = _D().eval()
    x = _images(1).expand(5, -1, -1, -1)
    out = D(x, torch.arange(5))
    assert all(not torch.allclose(out[i], out[j]) for i in range(5) for j in range(i))
    # <f, e(y)> / sqrt(cond_dim): linear in the embedding.
    with torch.no_grad():
        for h in D.heads:
            h.embed.weight.mul_(2)
    torch.testing.assert_close(D(x, torch.arange(5)), 2 * out)


def test_backbone_frozen_no_grad_while_x_and_heads_get_one():
    D = _D().train()
    assert D.heads.training and not D.backbone.training
    x = _images().requires_grad_()
    hinge_g_loss(D(x, torch.tensor([0, 1, 2, 3]))).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in D.backbone.parameters())
    assert all(p.grad is not None for p in D.heads.parameters())
    D.requires_grad_(False)
    assert not any(p.requires_grad for p in D.parameters())
    D.requires_grad_(True)
    assert all(p.requires_grad for p in D.heads.parameters())
    assert not any(p.requires_grad for p in D.backbone.parameters())


def test_state_dict_holds_the_heads_only_and_round_trips():
    a, b = _D(seed=1), _D(seed=2)
    a(_images(), torch.tensor([0, 1, 2, 3]))  # a train step moves BN statistics and spectral-norm vectors
    sd = a.state_dict()
    assert sd and not any(k.startswith("backbone.") for k in sd)
    b.load_state_dict(sd)  # strict
    x, y = _images(seed=3), torch.tensor([4, 3, 2, 1])
    torch.testing.assert_close(a.eval()(x, y), b.eval()(x, y), rtol=0, atol=0)
    wrapped = torch.nn.ModuleDict({"D": b})  # nested: the prefix is handled
    wrapped.load_state_dict({f"D.{k}": v for k, v in sd.items()})


def test_guidance_embedding_and_conditioning_errors():
    D = _D(guidance_embedding=True).eval()
    x, y = _images(2), torch.tensor([1, 1])
    w1, w3 = D(x, y, torch.tensor([1.0, 1.0])), D(x, y, torch.tensor([3.0, 3.0]))
    assert not torch.allclose(w1, w3)
    torch.testing.assert_close(D(x, y), w1)  # w = None means no guidance (w = 1), as in the UNet
    with pytest.raises(ValueError, match="no guidance embedding"):
        _D()(x, y, torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="class-conditional"):
        _D()(x)
    unconditional = _D(num_classes=0)
    assert unconditional(x).shape == (2, unconditional.num_patches)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, y)
    guided_only = _D(num_classes=0, guidance_embedding=True).eval()
    assert not torch.allclose(guided_only(x, w=torch.tensor([1.0, 1.0])), guided_only(x, w=torch.tensor([4.0, 4.0])))


def test_a_few_d_steps_separate_real_from_fake():
    # Sanity of the whole D path: hinge loss with a shared draw per pair goes down on an easy problem.
    D = _D(num_classes=0)
    opt = torch.optim.Adam(D.heads.parameters(), lr=2e-3)
    real, fake = _images(8, seed=1) * 0.2 + 0.5, _images(8, seed=2) * 0.2 - 0.5
    losses = []
    for step in range(15):
        draw = augment_params(8, _gen(step))
        loss = hinge_d_loss(D(apply_augment(real, draw)), D(apply_augment(fake, draw))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------------------------
# DiffAugment.

def _reference(x: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
    """Zhao et al.'s DiffAugment (CTM `pg_modules/diffaug.py`, explicit parameters), indexing kept verbatim."""
    n, _, h, w = x.shape
    x = x + draw.brightness.view(n, 1, 1, 1)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * draw.saturation.view(n, 1, 1, 1) + m
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    x = (x - m) * draw.contrast.view(n, 1, 1, 1) + m
    t = translation_pixels(draw, (h, w))
    gb, gx, gy = torch.meshgrid(torch.arange(n), torch.arange(h), torch.arange(w), indexing="ij")
    gx = torch.clamp(gx + t[:, 0].view(n, 1, 1) + 1, 0, h + 1)
    gy = torch.clamp(gy + t[:, 1].view(n, 1, 1) + 1, 0, w + 1)
    x = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0]).permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)
    start, cs = cutout_box(draw, (h, w))
    off = start + torch.tensor([cs[0] // 2, cs[1] // 2])  # the reference's offset_x, offset_y
    gb, gx, gy = torch.meshgrid(torch.arange(n), torch.arange(cs[0]), torch.arange(cs[1]), indexing="ij")
    gx = torch.clamp(gx + off[:, 0].view(n, 1, 1) - cs[0] // 2, min=0, max=h - 1)
    gy = torch.clamp(gy + off[:, 1].view(n, 1, 1) - cs[1] // 2, min=0, max=w - 1)
    mask = torch.ones(n, h, w)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


@pytest.mark.parametrize("h,w", [(16, 16), (20, 28), (7, 9), (64, 64)])
def test_diffaugment_matches_reference(h, w):
    x = _images(64, h, w=w)
    draw = augment_params(64, _gen(h * w))
    torch.testing.assert_close(apply_augment(x, draw), _reference(x, draw), rtol=0, atol=0)


def test_same_seed_same_output_and_shared_draw():
    x = _images(6)
    assert torch.equal(diff_augment(x, _gen(5)), diff_augment(x, _gen(5)))
    assert not torch.equal(diff_augment(x, _gen(5)), diff_augment(x, _gen(6)))
    draw = augment_params(6, _gen(7))
    a, b = apply_augment(x, draw), apply_augment(x.clone(), draw)
    assert torch.equal(a, b)  # one draw, two batches: identical transforms
    # Applied to a different batch, the same geometry: the cut-out square and shifted-in border coincide.
    zero_a, zero_b = apply_augment(torch.ones_like(x), draw) == 0, apply_augment(torch.full_like(x, 0.3), draw) == 0
    assert torch.equal(zero_a, zero_b)


def test_ranges_respected():
    n, size = 4000, 64
    draw = augment_params(n, _gen(0))
    assert (draw.brightness >= -0.5).all() and (draw.brightness < 0.5).all()
    assert (draw.saturation >= 0).all() and (draw.saturation < 2).all()
    assert (draw.contrast >= 0.5).all() and (draw.contrast < 1.5).all()
    t = translation_pixels(draw, (size, size))
    assert t.min() == -8 and t.max() == 8  # 1/8 of 64, both extremes reached, nothing beyond
    start, cs = cutout_box(draw, (size, size))
    assert cs == (13, 13)  # int(0.2 * 64 + 0.5)
    centre = start + 6
    assert centre.min() == 0 and centre.max() == 63  # odd size: centre in [0, 64)
    # Every image is augmented, and the cut-out area is at most 13 x 13 px (clipped at the border).
    x = torch.ones(n, 3, size, size)
    geo = AugmentDraw(n=n, cutout=draw.cutout)
    zeros = (apply_augment(x, geo) == 0).all(1).sum(dim=(1, 2))
    assert zeros.max() == 169 and zeros.min() >= 7 * 7
    shifted = AugmentDraw(n=n, translation=draw.translation)
    moved = (apply_augment(x, shifted) == 0).all(1).sum(dim=(1, 2))  # zero rows/columns shifted in
    assert torch.equal(moved == 0, (t == 0).all(1))


def test_translation_moves_content():
    x = _images(1, 16)
    draw = AugmentDraw(n=1, translation=torch.tensor([[0.99, 0.0]]))  # rows +2, cols -2 (s = 2 at 16 px)
    assert translation_pixels(draw, (16, 16)).tolist() == [[2, -2]]
    out = apply_augment(x, draw)
    torch.testing.assert_close(out[0, :, :14, 2:], x[0, :, 2:, :14], rtol=0, atol=0)
    assert (out[0, :, 14:] == 0).all() and (out[0, :, :, :2] == 0).all()


def test_policy_subsets_and_gradients():
    x = _images(4).requires_grad_()
    draw = augment_params(4, _gen(1), policy=("color",))
    assert draw.translation is None and draw.cutout is None
    full = augment_params(4, _gen(1))
    torch.testing.assert_close(draw.brightness, full.brightness, rtol=0, atol=0)  # one stream for every policy
    out = apply_augment(x, full)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="policy"):
        augment_params(4, _gen(0), policy=("flip",))
    with pytest.raises(ValueError, match="draw for 4 images"):
        apply_augment(_images(3), full)
