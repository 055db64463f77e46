"""PaGoDA's discriminator: a projected multi-scale discriminator on a frozen backbone, and DiffAugment.

- `ProjectedDiscriminator`: Projected GAN (Sauer et al., NeurIPS 2021) as StyleGAN-XL (Sauer et al., SIGGRAPH
  2022, `pg_modules/discriminator.py`) and CTM (PaGoDA's code base) runs it: one mini-discriminator per backbone map, each a
  stack of down-blocks (spectral-norm conv 4x4/2, BatchNorm, LeakyReLU(0.2)) and a final spectral-norm 4x4 conv
  to a map of patch logits; class conditioning by projection (Miyato & Koyama 2018): <f, e(y)> / sqrt(cond_dim).
- `DiscPair`: Stage 3's samples' and reconstructions' discriminators together.
- DiffAugment (Zhao et al., NeurIPS 2020): colour, translation, cutout, drawn once (`augment_params`) and applied
  to any batch (`apply_augment`), so real_i and fake_i of a D step, or both images of L_rec, share a draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from pagoda.networks.features import Backbone, check_images
from pagoda.networks.unet import NO_GUIDANCE, W_EMB_SCALE, timestep_embedding

# StyleGAN-XL's channels after down-sampling to each (nominal) size ("nfc_midas").
NFC = {4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}
END_SIZE = 8  # down-blocks run until the nominal size reaches 8; the 4x4 conv then gives ~4x4-5x5 patches
# The heads' depth is sized for the maps of a 256 px input at most: the official projector hard-codes `im_res = 256`
# (sony/pagoda `pg_modules/projector.py`), so at 512 px each head keeps the 4/3/2/1 down-blocks of 256 px and judges
# 13 x 13 patches instead of 5 x 5.
HEAD_SIZING_RESOLUTION = 256


def sn_conv(c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0, bias: bool = True) -> nn.Conv2d:
    """A k x k conv with spectral normalisation of its weight (Miyato et al. 2018; torch's parametrization)."""
    return spectral_norm(nn.Conv2d(c_in, c_out, k, stride, padding, bias=bias))


class DownBlock(nn.Sequential):
    """Spectral-norm conv 4x4/2 (padding 1), BatchNorm, LeakyReLU(0.2) (StyleGAN-XL `DownBlock`)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(sn_conv(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


class MiniDiscriminator(nn.Module):
    """Patch logits [N, P] of one feature map [N, c_in, H, W] (StyleGAN-XL `SingleDiscCond`).

    The number of down-blocks follows the nominal size (the tabulated size nearest min(sizing), sizing = the map's
    size at the head-sizing resolution, `size` by default): 4 for 112 px maps, 0 at <= 8 px; P follows the map's
    actual `size`. Widths: NFC by nominal output size, or `width` for all. Unconditional heads end in one
    channel; conditional ones in cond_dim channels projected on c = e(y) [+ g(w)], divided by sqrt(cond_dim).
    """

    def __init__(self, c_in: int, size: tuple[int, int], *, num_classes: int, cond_dim: int, guidance: bool,
                 width: int | None = None, sizing: tuple[int, int] | None = None):
        super().__init__()
        nominal = min(NFC, key=lambda s: abs(s - min(sizing or size)))
        (h, w), c, blocks = size, c_in, []
        while nominal > END_SIZE:
            nominal //= 2
            blocks.append(DownBlock(c, width or NFC[nominal]))
            c, h, w = width or NFC[nominal], h // 2, w // 2
        self.main = nn.Sequential(*blocks)
        k = min(4, h, w)
        self.num_patches = (h - k + 1) * (w - k + 1)
        self.cond_dim = cond_dim if num_classes > 0 or guidance else 0
        self.out = sn_conv(c, self.cond_dim or 1, k, bias=False)
        self.embed = nn.Embedding(num_classes, cond_dim) if num_classes > 0 else None
        self.guidance = None
        if guidance:  # a small MLP of the sinusoidal embedding of w, as the generator embeds w
            self.guidance = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, f: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor | None) -> torch.Tensor:
        out = self.out(self.main(f))
        if not self.cond_dim:
            return out.flatten(1)
        c = 0
        if self.embed is not None:
            c = self.embed(y)
        if self.guidance is not None:
            c = c + self.guidance(timestep_embedding(W_EMB_SCALE * w, self.cond_dim))
        return (out * c[:, :, None, None]).sum(1).flatten(1) / math.sqrt(self.cond_dim)


class ProjectedDiscriminator(nn.Module):
    """D(x, y[, w]) -> patch logits [N, P] of images x in [-1, 1], concatenated over the backbone's maps.

    backbone: a frozen `pagoda.networks.features.Backbone` (all of its maps are judged, e.g. 8 for `paper`);
    it gets no gradient, but x does (the generator's adversarial loss passes through). resolution: the image
    size D will see (the backbone is probed to size the heads: their depth as at min(resolution, 256) px, the
    official projector's `im_res`, their patch count at resolution). num_classes: 0 = unconditional, else y [N]
    int64 in [0, num_classes) selects a trainable embedding -> cond_dim (METHOD: 1000 -> 64).
    guidance_embedding: condition on the CFG scale w too ([N] float; None means w = 1). width: None = StyleGAN-XL's
    channels per size, an int = that width everywhere (cheap CPU presets).

    DiffAugment is not applied here: augment real and fake with one draw (`apply_augment`) before calling D.
    The frozen backbone stays in eval mode through `train()`, is left out of `state_dict()` (rebuild it with
    `build_backbone` and the same seed) and out of `requires_grad_()`; optimise `D.heads.parameters()`.
    """

    def __init__(self, backbone: Backbone, *, num_classes: int, resolution: int, cond_dim: int = 64,
                 guidance_embedding: bool = False, width: int | None = None):
        super().__init__()
        if num_classes < 0 or cond_dim < 1 or resolution < 1:
            raise ValueError(f"num_classes={num_classes}, cond_dim={cond_dim}, resolution={resolution}: "
                             "need num_classes >= 0, cond_dim >= 1, resolution >= 1")
        self.backbone, self.num_classes, self.guidance_embedding = backbone, num_classes, guidance_embedding
        device = next(iter([*backbone.parameters(), *backbone.buffers()]), torch.empty(0)).device
        with torch.no_grad():
            maps = backbone(torch.zeros(1, 3, resolution, resolution, device=device))
            r = min(resolution, HEAD_SIZING_RESOLUTION)
            sizing = maps if r == resolution else backbone(torch.zeros(1, 3, r, r, device=device))
        self.heads = nn.ModuleList(
            MiniDiscriminator(m.shape[1], tuple(m.shape[-2:]), num_classes=num_classes, cond_dim=cond_dim,
                              guidance=guidance_embedding, width=width, sizing=tuple(ms.shape[-2:]))
            for m, ms in zip(maps, sizing)).to(device)
        self.num_patches = sum(h.num_patches for h in self.heads)
        self.register_state_dict_post_hook(_drop_backbone)
        self.register_load_state_dict_pre_hook(_keep_backbone)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, w: torch.Tensor | None = None) -> torch.Tensor:
        check_images(x)
        y, w = self._conditioning(x.shape[0], y, w, x.device)
        maps = self.backbone(x)
        return torch.cat([head(f, y, w) for head, f in zip(self.heads, maps)], dim=1)

    def _conditioning(self, n: int, y, w, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Checked labels [N] and guidance scales [N] (None where D does not use them)."""
        if self.num_classes:
            if y is None or y.shape != (n,) or y.dtype != torch.long:
                raise ValueError(f"this discriminator is class-conditional: pass y as int64 [{n}], got "
                                 f"{None if y is None else (y.dtype, tuple(y.shape))}")
        elif y is not None:
            raise ValueError("this discriminator is unconditional (num_classes=0) but labels were given")
        if not self.guidance_embedding:
            if w is not None:
                raise ValueError("this discriminator has no guidance embedding but w was given")
            return y, None
        w = torch.full((n,), NO_GUIDANCE, device=device) if w is None else torch.as_tensor(w, device=device)
        return y, w.float().reshape(-1).expand(n)

    def requires_grad_(self, requires_grad: bool = True) -> ProjectedDiscriminator:
        self.heads.requires_grad_(requires_grad)  # the backbone stays frozen
        return self

    def train(self, mode: bool = True) -> ProjectedDiscriminator:
        """Train mode for BatchNorm; the spectral norms never advance in a forward (see `power_iteration`)."""
        super().train(mode)
        for m in self.modules():
            if type(m).__name__ == "_SpectralNorm":
                m.eval()
        return self

    @torch.no_grad()
    def power_iteration(self, n: int = 1) -> None:
        """Advance every spectral norm's power iteration by n steps on the current weights: called once per
        optimizer step (Miyato et al. 2018, Alg. 1: one iteration per update), so that the normalised weights
        do not depend on how many forwards a step makes (micro-batches, real and fake passes, G's step)."""
        for m in self.modules():
            para = getattr(m, "parametrizations", None)
            if para is not None and "weight" in para:
                sn = para.weight[0]
                sn._power_method(sn._reshape_weight_to_matrix(para.weight.original), n)


class DiscPair(nn.Module):
    """Stage 3 from 8x on (METHOD §2; sony/pagoda `train_util.py`): the discriminator on samples (`main`) and a
    second one on reconstructions (`rec`), trained and stepped together."""

    def __init__(self, main: ProjectedDiscriminator, rec: ProjectedDiscriminator):
        super().__init__()
        self.main, self.rec = main, rec

    def requires_grad_(self, requires_grad: bool = True) -> DiscPair:
        self.main.requires_grad_(requires_grad)  # each keeps its backbone frozen
        self.rec.requires_grad_(requires_grad)
        return self

    def power_iteration(self, n: int = 1) -> None:
        self.main.power_iteration(n)
        self.rec.power_iteration(n)


def _drop_backbone(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "backbone.")]:
        del state_dict[key]


def _keep_backbone(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # A state dict without the backbone (ours) loads strictly: the current frozen tensors stand in for it.
    for key, value in module.backbone.state_dict(prefix=prefix + "backbone.").items():
        state_dict.setdefault(key, value)


# ---------------------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020, `DiffAugment_pytorch.py`; CTM's variant with explicit parameters).

POLICY = ("color", "translation", "cutout")


@dataclass(frozen=True)
class AugmentDraw:
    """One DiffAugment draw for n images, in size-free units (so one draw fits 64 px and 224 px alike).

    brightness [n] ~ U(-0.5, 0.5) (added), saturation [n] ~ U(0, 2), contrast [n] ~ U(0.5, 1.5) (both scale the
    deviation from the mean over channels / over the image); translation [n, 2] and cutout [n, 2] hold U(0, 1)
    variates turned into DiffAugment's integers at apply time (below). A policy's fields are None when it is off.
    """

    n: int
    brightness: torch.Tensor | None = None
    saturation: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    translation: torch.Tensor | None = None
    cutout: torch.Tensor | None = None
    translation_ratio: float = 0.125
    cutout_ratio: float = 0.2


def augment_params(n: int, generator: torch.Generator, policy: tuple[str, ...] = POLICY, *,
                   translation: float = 0.125, cutout: float = 0.2) -> AugmentDraw:
    """Draw DiffAugment parameters for n images from `generator` (on its device); every image is augmented.

    Seven U(0, 1) numbers per image are drawn whatever the policy, so the stream does not depend on it.
    ValueError for an unknown policy name.
    """
    unknown = set(policy) - set(POLICY)
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {sorted(unknown)}: choose from {POLICY}")
    u = torch.rand(n, 7, generator=generator, device=generator.device)
    color, trans, cut = "color" in policy, "translation" in policy, "cutout" in policy
    return AugmentDraw(
        n=n,
        brightness=u[:, 0] - 0.5 if color else None,
        saturation=u[:, 1] * 2 if color else None,
        contrast=u[:, 2] + 0.5 if color else None,
        translation=u[:, 3:5] if trans else None,
        cutout=u[:, 5:7] if cut else None,
        translation_ratio=translation,
        cutout_ratio=cutout,
    )


def _uniform_int(u: torch.Tensor, count: int) -> torch.Tensor:
    """U(0, 1) -> uniform integers in [0, count)."""
    return (u * count).long().clamp_(0, count - 1)


def translation_pixels(draw: AugmentDraw, size: tuple[int, int]) -> torch.Tensor:
    """Integer shifts [n, 2] (rows, cols) in [-s, s], s = int(size * ratio + 0.5) (DiffAugment `rand_translation`)."""
    s = [int(d * draw.translation_ratio + 0.5) for d in size]
    return torch.stack([_uniform_int(draw.translation[:, i], 2 * s[i] + 1) - s[i] for i in range(2)], dim=1)


def cutout_box(draw: AugmentDraw, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """First row / column [n, 2] of each cut-out square and its size (h, w), as DiffAugment `rand_cutout`:
    size = int(dim * ratio + 0.5), centre in [0, dim + (1 - size % 2)), the box clipped to the image later."""
    cs = tuple(int(d * draw.cutout_ratio + 0.5) for d in size)
    centre = torch.stack([_uniform_int(draw.cutout[:, i], size[i] + 1 - cs[i] % 2) for i in range(2)], dim=1)
    return centre - torch.tensor([c // 2 for c in cs], device=centre.device), cs


def apply_augment(x: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
    """DiffAugment of x [n, C, H, W] (in [-1, 1]) with `draw`: colour, then translation, then cutout.

    Differentiable in x. Pixels shifted in and the cut-out square are 0 (mid-grey), as in DiffAugment.
    """
    if x.ndim != 4 or x.shape[0] != draw.n:
        raise ValueError(f"a draw for {draw.n} images cannot augment a batch of shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    dev = x.device
    if draw.brightness is not None:
        x = x + _per_image(draw.brightness, x)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * _per_image(draw.saturation, x) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * _per_image(draw.contrast, x) + mean
    if draw.translation is not None:
        # Output pixel (i, j) reads input (i + dy, j + dx) through a 1-pixel zero pad, as DiffAugment indexes.
        shift = translation_pixels(draw, (h, w)).to(dev)
        rows = (torch.arange(h, device=dev)[None] + shift[:, :1] + 1).clamp(0, h + 1)  # [n, h]
        cols = (torch.arange(w, device=dev)[None] + shift[:, 1:] + 1).clamp(0, w + 1)  # [n, w]
        index = (torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :])
        x = F.pad(x, (1, 1, 1, 1))[index]
    if draw.cutout is not None:
        start, size = cutout_box(draw, (h, w))
        start = start.to(dev)
        r, col = torch.arange(h, device=dev)[None], torch.arange(w, device=dev)[None]
        in_r = (r >= start[:, :1]) & (r < start[:, :1] + size[0])  # [n, h]
        in_c = (col >= start[:, 1:]) & (col < start[:, 1:] + size[1])  # [n, w]
        x = x * (~(in_r[:, :, None] & in_c[:, None, :]))[:, None].to(x.dtype)
    return x


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.device, x.dtype)[:, None, None, None]


def diff_augment(x: torch.Tensor, generator: torch.Generator, policy: tuple[str, ...] = POLICY) -> torch.Tensor:
    """DiffAugment with a fresh draw from `generator`: apply_augment(x, augment_params(len(x), generator, policy))."""
    return apply_augment(x, augment_params(x.shape[0], generator, policy))
