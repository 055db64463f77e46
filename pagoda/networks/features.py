"""Frozen multi-scale feature backbones: one registry for PaGoDA's reconstruction distance d (L_rec) and for its
projected discriminator (METHOD §2, Stage 2b).

A `Backbone` maps float images in [-1, 1] [N, 3, H, W] to a list of feature maps [N, C_i, H_i, W_i]. It owns its
input resize and normalisation, is frozen (eval mode for good, no parameter requires grad) and stays
differentiable in its input, so a generator loss passes through it to the image.

    name               maps (224 px input)                                 weights (pagoda.weights.SPECS)
    paper              deit + efficientnet-lite0 below: 8 maps              deit-base-distilled, efficientnet-lite0
    deit               DeiT-base distilled, tokens after blocks 2/5/8/11    deit-base-distilled
    efficientnet-lite0 EfficientNet-lite0 at strides 4/8/16/32              efficientnet-lite0
    domain             the photos classifier's 3 block outputs              domain (domain-photos.safetensors)
    random             a seeded random conv net at strides 2/4/8            none

`deit` and `efficientnet-lite0` follow Projected GAN / StyleGAN-XL as CTM (the code PaGoDA builds on) runs them (`F_RandomProj`
with `proj_type=2, cout=64, expand=True`): ImageNet mean/std for DeiT, mean = std = 0.5 for EfficientNet-lite0,
resized to 224 px (bilinear, no antialias) below 256 px, then frozen random projections (`projection=`):
"ccm" = cross-channel mixing, a random 1x1 conv per scale to 64/128/256/512 channels; "ccm+csm" (default, the
reference's) adds cross-scale mixing, top-down 2x bilinear upsampling + random 1x1 convs, which doubles each
map's resolution (64/64/128/256 channels at 112/56/28/14 px); "none" returns the trunk's maps.
The random layers are drawn from `seed`, so two instances with different seeds (METHOD: L_rec's feature network
is its own instance, not the discriminator's) differ only there.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.errors import UserError
from pagoda.weights import SPECS, WeightsSpec, check_sha256, load_state_dict, resolve_weights, verify

PAPER_SIZE = 224  # the paper backbones' input size ...
RESIZE_BELOW = 256  # ... for images whose short side is below this (METHOD; CTM `get_feature`)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEIT_ARCH, DEIT_BLOCKS = "deit_base_distilled_patch16_224", (2, 5, 8, 11)  # StyleGAN-XL `_make_vit` hooks (0-based)
EFFNET_ARCH = "tf_efficientnet_lite0"
PROJECTIONS = ("ccm+csm", "ccm", "none")
BACKBONES = ("paper", "deit", "efficientnet-lite0", "domain", "random")


def check_images(x: torch.Tensor) -> None:
    """ValueError unless x is a float tensor [N, 3, H, W]."""
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        what = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"expected float images [N, 3, H, W] in [-1, 1], got {what}")


class Backbone(nn.Module):
    """Frozen feature network: forward(x [-1, 1] [N, 3, H, W]) -> list of maps [N, C_i, H_i, W_i].

    forward = features(resize(x)). `resize` brings x to the network's input size and is a no-op on an image
    already there (so d can resize, augment, then call forward); `features` normalises and runs the net.
    `weights` maps each weight file used to its SHA-256 (empty for weight-free backbones).
    """

    input_size = "native"  # one line saying what `resize` does (also: members of a BackboneSet must agree)

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.weights: dict[str, str] = {}
        self.seed: int | None = None  # set by build_backbone

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] at the network's input size (the same tensor when already there)."""
        return x

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Maps of x [N, 3, H, W] in [-1, 1], already at the input size (normalisation happens here)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_images(x)
        return self.features(self.resize(x))

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)  # BatchNorm statistics of a frozen backbone never move

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size!r}"


def resize_paper(x: torch.Tensor) -> torch.Tensor:
    """To 224 x 224 (bilinear, align_corners=False, no antialias) when the short side is below 256 px (METHOD)."""
    if min(x.shape[-2:]) >= RESIZE_BELOW or tuple(x.shape[-2:]) == (PAPER_SIZE, PAPER_SIZE):
        return x
    return F.interpolate(x, size=(PAPER_SIZE, PAPER_SIZE), mode="bilinear", align_corners=False, antialias=False)


class RandomProjection(nn.Module):
    """Projected GAN's frozen random projections of 4 maps (Sauer et al., NeurIPS 2021, §3.2; `F_RandomProj`).

    CCM: a 1x1 conv per scale to cout * (1, 2, 4, 8) channels. CSM (csm=True): top-down, level i = 1x1 conv of
    the bilinear (align_corners=True) upsampling of (level i+1 + CCM_i) to the size of map i-1 (2x for i = 0),
    ending with cout * (1, 1, 2, 4) channels at twice each input resolution.
    """

    def __init__(self, channels: tuple[int, ...], cout: int = 64, csm: bool = True):
        super().__init__()
        mixed = [cout * 2**i for i in range(len(channels))]
        self.ccm = nn.ModuleList(nn.Conv2d(c, m, 1) for c, m in zip(channels, mixed))
        self.csm = nn.ModuleList(nn.Conv2d(m, m // 2 if i else m, 1) for i, m in enumerate(mixed)) if csm else None

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        maps = [conv(m) for conv, m in zip(self.ccm, maps)]
        if self.csm is None:
            return maps
        out, h = [None] * len(maps), None
        for i in reversed(range(len(maps))):
            h = maps[i] if h is None else h + maps[i]
            size = maps[i - 1].shape[-2:] if i else tuple(2 * s for s in maps[0].shape[-2:])
            out[i] = h = self.csm[i](F.interpolate(h, size=size, mode="bilinear", align_corners=True))
        return out


class DeiTTrunk(nn.Module):
    """DeiT-base distilled: the patch tokens after blocks 2, 5, 8, 11 (0-based; class and distillation tokens
    dropped, no final norm) as 768 x 14 x 14 maps, reassembled as in DPT / StyleGAN-XL `_make_vit` by random
    frozen layers to 96 x 56, 192 x 28, 384 x 14, 768 x 7 (1x1 conv, then 4x / 2x transposed conv, none, 3x3/2)."""

    channels = (96, 192, 384, 768)

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, d = net, net.embed_dim
        c = self.channels
        self.reassemble = nn.ModuleList([
            nn.Sequential(nn.Conv2d(d, c[0], 1), nn.ConvTranspose2d(c[0], c[0], 4, stride=4)),
            nn.Sequential(nn.Conv2d(d, c[1], 1), nn.ConvTranspose2d(c[1], c[1], 2, stride=2)),
            nn.Conv2d(d, c[2], 1),
            nn.Sequential(nn.Conv2d(d, c[3], 1), nn.Conv2d(c[3], c[3], 3, stride=2, padding=1)),
        ])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.net.forward_intermediates(x, indices=list(DEIT_BLOCKS), norm=False, output_fmt="NCHW",
                                                intermediates_only=True)
        return [layer(t) for layer, t in zip(self.reassemble, tokens)]


class EfficientNetTrunk(nn.Module):
    """EfficientNet-lite0 split as StyleGAN-XL `_make_efficientnet`: stem + blocks 0-1 (24 ch, stride 4), block 2
    (40, 8), blocks 3-4 (112, 16), blocks 5-6 (320, 32); the head (conv 1280, classifier) is dropped."""

    channels = (24, 40, 112, 320)

    def __init__(self, net: nn.Module):
        super().__init__()
        b = net.blocks
        self.stages = nn.ModuleList([nn.Sequential(net.conv_stem, net.bn1, *b[0:2]), nn.Sequential(*b[2:3]),
                                     nn.Sequential(*b[3:5]), nn.Sequential(*b[5:])])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


class PretrainedBackbone(Backbone):
    """A pretrained trunk behind its normalisation, with the paper's resize and optional random projection."""

    input_size = f"{PAPER_SIZE} px below {RESIZE_BELOW} px (bilinear, no antialias), else native"

    def __init__(self, name: str, trunk: nn.Module, projection: RandomProjection | None,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__(name)
        self.trunk, self.projection = trunk, projection
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        return resize_paper(x)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.trunk(((x + 1) / 2 - self.mean) / self.std)
        return self.projection(maps) if self.projection is not None else maps


class BackboneSet(Backbone):
    """Several backbones that share one input size; their maps concatenated in order."""

    def __init__(self, name: str, members: list[Backbone]):
        super().__init__(name)
        if len({m.input_size for m in members}) != 1:
            raise ValueError(f"members of {name} resize differently: {[m.input_size for m in members]}")
        self.members = nn.ModuleList(members)
        self.input_size = members[0].input_size
        self.weights = {k: v for m in members for k, v in m.weights.items()}

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        return self.members[0].resize(x)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [f for m in self.members for f in m.features(x)]


class RandomBackbone(Backbone):
    """Weight-free features: a random conv net, seeded and frozen, at strides 2, 4, 8 (`widths` channels).

    Stem 3x3 conv, then per scale a 4x4/2 conv and a 3x3 conv, each followed by LeakyReLU(0.2); weights
    Kaiming-normal for that slope (activations keep their scale), biases N(0, 0.1^2) so the features are not
    positively homogeneous in x (a contrast change about mid-grey would otherwise vanish under channel
    normalisation). Random conv features make a usable perceptual distance (Amir & Weiss, CVPR 2021).
    No resize or normalisation: any H, W >= 8.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__("random")

        def act():
            return nn.LeakyReLU(0.2)

        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), act())
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c, 4, stride=2, padding=1), act(), nn.Conv2d(c, c, 3, padding=1), act())
            for c_in, c in zip((widths[0], *widths[:-1]), widths))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.normal_(m.bias, std=0.1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if min(x.shape[-2:]) < 2 ** len(self.stages):
            raise ValueError(f"the random backbone needs images of at least {2 ** len(self.stages)} px, got {tuple(x.shape)}")
        maps, h = [], self.stem(x)
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps


class DomainBackbone(Backbone):
    """The bundled photos classifier (pagoda.networks.domain): its 3 block outputs (width, 2 width, 4 width
    channels at 1/2, 1/4, 1/8 of its input). Input resized as it was trained: bilinear, antialiased, to its
    input_resolution (32 px by default)."""

    def __init__(self, net: nn.Module):
        super().__init__("domain")
        self.net = net
        self.input_size = f"{net.input_resolution} px (bilinear, antialias)"

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        r = self.net.input_resolution
        if tuple(x.shape[-2:]) == (r, r):
            return x
        return F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.feature_maps(x)


# ---------------------------------------------------------------------------------------------------------
# Loading.

def _check_hub_name(path: Path, digest: str, spec: WeightsSpec) -> None:
    """torch.hub names a file `<name>-<first hex digits of its SHA-256>.pth`: warn when the digest disagrees."""
    m = re.search(r"-([0-9a-f]{8,64})\.pth$", path.name)
    if m and not digest.startswith(m.group(1)):
        warnings.warn(f"{path}: SHA-256 {digest[:16]}... does not start with the {m.group(1)} its name promises: "
                      f"the file is damaged or not the official one; fetch it again from {spec.url}", stacklevel=3)


def load_timm(key: str, arch: str, weights_dir: str | os.PathLike | None = None, **kwargs) -> tuple[nn.Module, str]:
    """timm `arch` (random init; timm itself never downloads) loaded from the file of SPECS[key], fetched on first
    use (pagoda.weights); returns (net, SHA-256). UserError naming the file and its source when it is missing,
    unreadable, or holds another architecture."""
    import timm

    spec = SPECS[key]
    path = resolve_weights(spec, weights_dir)
    digest, _ = verify(path, spec)  # a fetched file that changed since its first use is refused
    _check_hub_name(path, digest, spec)
    state = load_state_dict(path, spec)
    net = timm.create_model(arch, pretrained=False, **kwargs)
    try:
        net.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:120]
        raise UserError(f"{path} does not fit timm {arch} ({first}): it is not the {spec.key} file; fetch "
                        f"{spec.files[0]} from {spec.url}") from None
    return net, digest


def _paper_member(kind: str, weights_dir, projection: str, seed: int) -> PretrainedBackbone:
    """`deit` or `efficientnet-lite0`: the loaded trunk, then its random layers drawn from (seed, kind) alone
    (not from whatever timm's own initialisation left in the RNG)."""
    if kind == "deit":
        net, digest = load_timm("deit-base-distilled", DEIT_ARCH, weights_dir, dynamic_img_size=True)
        torch.manual_seed(seed)
        trunk, mean, std, key = DeiTTrunk(net), IMAGENET_MEAN, IMAGENET_STD, "deit-base-distilled"
    else:
        net, digest = load_timm("efficientnet-lite0", EFFNET_ARCH, weights_dir)
        torch.manual_seed(seed + 1_000_003)  # another stream than DeiT's
        trunk, mean, std, key = EfficientNetTrunk(net), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "efficientnet-lite0"
    proj = None if projection == "none" else RandomProjection(trunk.channels, csm=projection == "ccm+csm")
    bb = PretrainedBackbone(kind, trunk, proj, mean, std)
    bb.weights = {key: digest}
    return bb


def _build(name: str, weights_dir, projection: str, seed: int) -> Backbone:
    if name == "random":
        return RandomBackbone()
    if name == "domain":
        from pagoda.networks.domain import load_domain_net

        path = resolve_weights(SPECS["domain"], weights_dir)
        bb = DomainBackbone(load_domain_net(path))
        bb.weights = {"domain": check_sha256(path, SPECS["domain"])}
        return bb
    if name == "paper":
        for key in ("deit-base-distilled", "efficientnet-lite0"):  # fail on a missing file before building anything
            resolve_weights(SPECS[key], weights_dir)
        members = [_paper_member(k, weights_dir, projection, seed) for k in ("deit", "efficientnet-lite0")]
        return BackboneSet("paper", members)
    return _paper_member(name, weights_dir, projection, seed)


def build_backbone(name: str, *, weights_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   seed: int = 0, projection: str = "ccm+csm") -> Backbone:
    """A frozen Backbone by name (see the module docstring), on `device`, in eval mode, no parameter requiring grad.

    weights_dir: the weights folder (else the cache and ./weights, pagoda.weights); `random` needs none.
    seed: draws every random layer (the random net, the projections, DeiT's reassembly); the caller's RNG state
    is left untouched. projection: "ccm+csm" | "ccm" | "none", for the pretrained backbones only.
    UserError: unknown name or projection, weights missing / unreadable / of another architecture.
    """
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    if projection not in PROJECTIONS:
        raise UserError(f"unknown projection {projection!r}: choose one of {', '.join(PROJECTIONS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = _build(name, weights_dir, projection, seed)
    backbone.seed = seed
    return backbone.requires_grad_(False).eval().to(device)
