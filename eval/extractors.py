"""Feature extractors for the metrics: a validated registry of frozen networks with their own preprocessing.

Every extractor takes uint8 RGB images [N, 3, H, W] of any size, owns its resize and
normalisation (named by its `resize` attribute, which results record), and returns
`{"features": float32 [N, D], "logits": float32 [N, K], "spatial": float32 [N, S]}` from one
forward pass (logits only when `num_logits` > 0, spatial only when `spatial_dim` > 0: the
Inception's sFID map). Weights are local files, fetched on first use (pagoda.weights); their SHA-256 is
exposed as `weights_sha256` and how far it is trusted as `weights_trust`. Conventions: METHOD.md section 5.
"""

import contextlib
import copy
import functools
import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.sources import check_images
from pagoda.errors import UserError
from pagoda.weights import SPECS, WeightsSpec, load_state_dict, resolve_weights, trust_of, verify

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@contextlib.contextmanager
def deterministic():
    """Disable TF32 and cudnn autotuning for the duration (restored afterwards)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = saved


def calibrate_batchnorm(module: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running stats to the average over `batches` (train-mode forwards).

    Used for test weights: a randomly initialised Inception with default BN stats gives
    near-constant features, hence FID ~ 0 between unrelated image sets.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta, was_training = [m.momentum for m in bns], module.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
    module.train()
    with torch.no_grad():
        for x in batches:
            module(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return module.train(was_training)


class Extractor:
    """Base: validates input, moves it to the device, runs `_forward` deterministically."""

    name: str
    feature_dim: int
    num_logits: int = 0
    spatial_dim: int = 0
    resize: str
    weights_path: Path | None
    weights_sha256: str | None
    weights_trust: str | None  # "pinned", "first use", "unverified" or "not official" (pagoda.weights)
    feature_dtype: str = "float32"  # every output is cast to float32 (__call__); statistics sum it in float64

    def __init__(self, net: nn.Module, spec: WeightsSpec, path: Path | None, sha: str | None, device: str):
        self.net = net.to(device).eval().requires_grad_(False)
        self.spec, self.weights_path, self.weights_sha256, self.device = spec, path, sha, torch.device(device)
        self.weights_trust = trust_of(path, spec, sha) if path is not None and sha is not None else None

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(images, f"{self.name} extractor")
        with torch.inference_mode(), deterministic():
            out = self._forward(images.to(self.device))
        return {k: v.float() for k, v in out.items()}

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # each subclass defines its one forward pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, D={self.feature_dim}, resize={self.resize!r})"


def _load_checked(spec: WeightsSpec, weights_dir, strict: bool) -> tuple[dict, Path, str]:
    """Resolve, hash and safely load the weights of `spec`."""
    path = resolve_weights(spec, weights_dir)
    sha, _ = verify(path, spec, strict=strict)
    return load_state_dict(path, spec), path, sha


def _wrong_architecture(path: Path, what: str, err: Exception) -> UserError:
    """The UserError for a readable file that does not fit the network."""
    first = str(err).strip().splitlines()
    detail = " ".join(line.strip() for line in first[:2])[:200]
    return UserError(f"weights file {path} does not fit {what} ({detail}): check that it is the right file")


# ---------------------------------------------------------------------------------------------
# Inception (FID, KID, IS, P/R): torch-fidelity's TF-compatible port, BatchNorm folded.


def inception_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a torch-fidelity or pytorch-fid Inception state dict onto torch-fidelity's keys.

    pytorch-fid builds its net from torchvision's Inception3 blocks, whose module names
    torch-fidelity's port keeps, so the keys coincide; only torchvision extras differ
    (`num_batches_tracked` buffers, an `AuxLogits` head), and those are dropped.
    """
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits.")}


def torch_fidelity_inception(sd: dict[str, torch.Tensor], features=("2048", "logits_unbiased")) -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 holding `sd`, without it opening any file.

    Its constructor `torch.load`s a path with weights_only=False; we hand it an in-memory
    serialisation of tensors that were already loaded safely, so no user file is unpickled.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    buf = io.BytesIO()
    torch.save(inception_state_dict(sd), buf)
    buf.seek(0)
    return FeatureExtractorInceptionV3("inception-v3-compat", list(features), feature_extractor_weights_path=buf)


class FoldedConvReLU(nn.Module):
    """relu(BN(conv(x))) with the eval-mode BatchNorm folded into the conv: w' = w g/s, b' = beta - mu g/s."""

    def __init__(self, block: nn.Module):
        super().__init__()
        conv, bn = block.conv, block.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.weight = nn.Parameter((conv.weight * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last))
        self.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
        self.stride, self.padding = list(conv.stride), list(conv.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and _MKLDNN_FUSED:  # oneDNN conv with ReLU as a post-op: one pass
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, self.padding, self.stride, [1, 1], 1, "relu", [], ""
            )
        return F.relu(F.conv2d(x, self.weight, self.bias, self.stride, self.padding))


_MKLDNN_FUSED = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of a torch-fidelity Inception whose BasicConv2d blocks are FoldedConvReLU."""
    net = copy.deepcopy(net)
    for name, block in list(net.named_modules()):
        if type(block).__name__ == "BasicConv2d":
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, FoldedConvReLU(block))
    return net


# sFID (Nash et al. 2021) as the ADM evaluator computes it (openai/guided-diffusion evaluations/evaluator.py):
# tensor `mixed_6/conv:0` of the TF graph, an NHWC [N, 17, 17, 192] map, of which it keeps [..., :7] and
# flattens each sample, so the 2023 dimensions run in (h, w, c) order. The graph names its blocks mixed,
# mixed_1, ..., mixed_10 for torch-fidelity's Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c (the table of
# torch-fidelity's utils/util_convert_inception_weights.py maps mixed_6/conv/{conv2d_params,batchnorm} to
# Mixed_6d.branch1x1). The graph's ops for a conv layer X are X/Conv2D, X/batchnorm (no activation),
# X/CheckNumerics, X/control_dependency and X: the one op left to be the ReLU, which ports that match TF's
# pool3 apply after every BN, is X itself, so `mixed_6/conv` is branch1x1 after its ReLU. InceptionC
# concatenates branch1x1 first: its 7 channels are channels 0..6 of the Mixed_6d output.
SFID_BLOCK, SFID_CHANNELS, SFID_GRID = "Mixed_6d", 7, 17
SFID_DIM = SFID_GRID * SFID_GRID * SFID_CHANNELS


def sfid_spatial(mixed_6d: torch.Tensor) -> torch.Tensor:
    """[N, 2023] sFID features from the Mixed_6d output [N, 768, 17, 17]: its first 7 channels (branch1x1
    after ReLU) in the evaluator's NHWC order, one row per sample."""
    return mixed_6d[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(len(mixed_6d), -1)


@contextlib.contextmanager
def _output_of(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Yield a list that receives fn(output) of each forward of `module` inside the block (a forward hook)."""
    got: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda mod, args, out: got.append(fn(out)))
    try:
        yield got
    finally:
        handle.remove()


class InceptionExtractor(Extractor):
    """pool3 (2048), bias-free logits (1008) and sFID's spatial map (2023) of the 2015-12-05 Inception,
    TF1 bilinear resize to 299."""

    name, feature_dim, num_logits, spatial_dim, resize = "inception", 2048, 1008, SFID_DIM, "tf1-bilinear-299"

    def __init__(self, *, weights_dir=None, device="cpu", strict=False, fold=True):
        sd, path, sha = _load_checked(SPECS["inception"], weights_dir, strict)
        try:
            net = torch_fidelity_inception(sd)
        except (RuntimeError, ValueError, KeyError) as e:
            raise _wrong_architecture(path, "the 2015-12-05 Inception of torch-fidelity", e) from e
        self.fast = fold  # False: torch-fidelity's module and forward untouched (bit-exact with it)
        super().__init__(fold_batchnorm(net) if fold else net, SPECS["inception"], path, sha, device)

    def _forward(self, x):
        """torch-fidelity's forward (float32, TF1 resize, (x-128)/128, trunk, pool3, bias-free fc) with the
        resize done as two small matmuls and the trunk in channels-last memory: same numbers, less time.
        The sFID map is a slice of the Mixed_6d output taken on the way (see `sfid_spatial`)."""
        net = self.net
        if not self.fast:
            with _output_of(net.Mixed_6d, sfid_spatial) as spatial:
                features, logits = net(x)
            return {"features": features, "logits": logits, "spatial": spatial[0]}
        x = tf1_bilinear_resize(x.float(), 299)
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)
        for name in INCEPTION_TRUNK:
            x = getattr(net, name)(x)
            if name == SFID_BLOCK:
                spatial = sfid_spatial(x)
        features = torch.flatten(x, 1)
        return {"features": features, "logits": features.mm(net.fc.weight.T), "spatial": spatial}


# torch-fidelity's FeatureExtractorInceptionV3 layers from the 299 px input to pool3, in order.
INCEPTION_TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                   "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                   "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


@functools.lru_cache(maxsize=8)
def _tf1_bilinear_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """[n_out, n_in] weights of TF1 bilinear resampling (align_corners=False, no half-pixel offset):
    source coordinate i * n_in / n_out in float32, as torch-fidelity computes it, hence the same taps."""
    src = torch.arange(n_out, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = src.long()
    hi = (lo + 1).clamp_max(n_in - 1)
    frac = src - lo.float()
    w = torch.zeros(n_out, n_in, dtype=torch.float32)
    w[torch.arange(n_out), lo] += 1 - frac
    w[torch.arange(n_out), hi] += frac
    return w.to(device)


def tf1_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1-compatible bilinear resize of float [N, C, H, W] to size x size as W_h x W_w^T (two matmuls);
    agrees with torch-fidelity's gather-based interpolate_bilinear_2d_like_tensorflow1x to float rounding."""
    wh = _tf1_bilinear_matrix(x.shape[2], size, x.device)
    ww = _tf1_bilinear_matrix(x.shape[3], size, x.device)
    return torch.matmul(torch.matmul(wh, x), ww.T)


# ---------------------------------------------------------------------------------------------
# DINOv2 (FD-DINOv2): the torch.hub model of facebookresearch/dinov2, which dgm-eval and EDM2 run, computed
# with timm's ViT (the same layers: patch conv, cls token, pre-norm blocks with LayerScale, qkv bias, GELU,
# LayerNorm eps 1e-6) and CLS token after the final norm (the hub's `x_norm_clstoken`).

DINOV2_ARCH = {
    "dinov2": "vit_large_patch14_dinov2.lvd142m",
    "dinov2-vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2-vits14": "vit_small_patch14_dinov2.lvd142m",
}
DINOV2_SIZE = 224  # dgm-eval and EDM2 feed 224 x 224 images: a 16 x 16 patch grid
# dinov2/hub/backbones.py builds dinov2_vit{s,b,l}14 with interpolate_offset=0.1 and interpolate_antialias=False
# (also img_size=518, init_values=1.0, ffn_layer="mlp", no register tokens, which the timm models share).
HUB_INTERPOLATE_OFFSET = 0.1


def build_dinov2(arch: str) -> nn.Module:
    """timm DINOv2 at 224 px with no head, randomly initialised (never downloads)."""
    import timm

    return timm.create_model(arch, pretrained=False, img_size=DINOV2_SIZE, num_classes=0)


def hub_pos_embed(pos_embed: torch.Tensor, grid: int, offset: float = HUB_INTERPOLATE_OFFSET) -> torch.Tensor:
    """float32 [1, 1 + grid^2, D]: what the hub's `DinoVisionTransformer.interpolate_pos_encoding` adds to the
    tokens of a grid x grid input, from a stored table [1, 1 + M^2, D] (M = 37 in the published 518 px files).

    The hub resamples at every forward: a float32 bicubic F.interpolate without antialias whose target is
    given as scale_factor = (grid + 0.1) / M, so its taps are those of that scale, not of a resize to
    `size=grid` (timm's checkpoint_filter_fn, which also antialiases). One identical call at load gives
    the same table. A table already at `grid` comes back as is (the hub adds it unchanged then).
    ValueError when the stored grid is not square or the call does not land on `grid`.
    """
    n, dim = pos_embed.shape[1] - 1, pos_embed.shape[-1]
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
    if m == grid:
        return pos_embed.float()
    pe = pos_embed.float()
    scale = float(grid + offset) / m
    patch = F.interpolate(pe[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                          mode="bicubic", antialias=False)
    if tuple(patch.shape[-2:]) != (grid, grid):
        raise ValueError(f"resampling a {m}x{m} position grid by {scale} gave {tuple(patch.shape[-2:])}")
    return torch.cat([pe[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def dinov2_state_dict(sd: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """timm's or the hub's DINOv2 state dict (same keys but the hub's unused `mask_token`) ready for a timm
    ViT with a grid x grid patch grid: position table resampled as the hub does (`hub_pos_embed`)."""
    out = {k: v for k, v in sd.items() if k != "mask_token"}
    out["pos_embed"] = hub_pos_embed(sd["pos_embed"], grid)
    return out


def pil_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-image PIL BICUBIC resize of uint8 [N, 3, H, W] to `size` (h, w) -> uint8 [N, 3, h, w] (the
    dgm-eval / torchvision-on-PIL / EDM2 resize_mode='pil' path; PIL antialiases when it shrinks)."""
    from PIL import Image

    out = []
    for img in x.permute(0, 2, 3, 1).cpu().numpy():
        out.append(np.asarray(Image.fromarray(img).resize(size[::-1], Image.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def normalize(x01: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel on [0, 1] images."""
    mean, std = (torch.tensor(v, device=x01.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x01 - mean) / std


class DINOv2Extractor(Extractor):
    """CLS token after the final norm of DINOv2 ViT-{S,B,L}/14 at 224 px (as the torch.hub model computes it),
    ImageNet mean/std, with one of two resize conventions (`resize`):

    - "edm2-torch": EDM2's DINOv2Detector resize_mode='torch' (NVlabs/edm2 calculate_metrics.py), the mode
      its published dataset-refs (img64.pkl, img512.pkl: `fd_dinov2`) were made with: float32 F.interpolate
      of the 0..255 values to 224 x 224, bicubic, antialias=True, no clamp, then / 255.
    - "pil-bicubic": per-image PIL BICUBIC to 224 x 224 on uint8, then / 255: dgm-eval's default transform
      (torchvision Resize on a PIL image) and EDM2's resize_mode='pil'.

    Weights: timm's `vit_*_patch14_dinov2.lvd142m` file or the hub's `dinov2_vit*14_pretrain.pth`.
    UserError for an unknown resize or a file that does not fit the architecture.
    """

    RESIZES = ("edm2-torch", "pil-bicubic")

    def __init__(self, name: str, *, weights_dir=None, device="cpu", strict=False, resize="edm2-torch"):
        if resize not in self.RESIZES:
            raise UserError(f"resize={resize!r} for {name}: choose one of {', '.join(self.RESIZES)}")
        spec, self.name, self.resize = SPECS[name], name, resize
        sd, path, sha = _load_checked(spec, weights_dir, strict)
        net = build_dinov2(DINOV2_ARCH[name])
        try:
            net.load_state_dict(dinov2_state_dict(sd, net.patch_embed.grid_size[0]))
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            raise _wrong_architecture(path, f"DINOv2 {DINOV2_ARCH[name]}", e) from e
        self.feature_dim = net.num_features
        super().__init__(net, spec, path, sha, device)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float32 [N, 3, 224, 224], resized by `self.resize` and normalised."""
        size = (DINOV2_SIZE, DINOV2_SIZE)
        if self.resize == "pil-bicubic":
            x = pil_resize(x, size).to(x.device)
        else:
            x = F.interpolate(x.to(torch.float32), size=size, mode="bicubic", antialias=True)
        return normalize(x.to(torch.float32) / 255, IMAGENET_MEAN, IMAGENET_STD)

    def _forward(self, x):
        return {"features": self.net.forward_features(self.preprocess(x))[:, 0]}


# ---------------------------------------------------------------------------------------------
# CLIP (CLIP score, CMMD): open_clip ViTs with OpenAI weights (QuickGELU), L2-normalised embeddings.

CLIP_MODEL = {"clip": "ViT-L-14", "clip-vitb32": "ViT-B-32", "clip-vitl14-336": "ViT-L-14-336"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's (open_clip OPENAI_DATASET_MEAN / _STD)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(model: str) -> nn.Module:
    """open_clip model with OpenAI's QuickGELU activation, randomly initialised (never downloads); open_clip's
    "No pretrained weights loaded" warning is silenced: the weights are loaded from the local file next."""
    import logging

    import open_clip

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return open_clip.create_model(model, pretrained=None, force_quick_gelu=True)
    finally:
        root.setLevel(level)


class CLIPExtractor(Extractor):
    """L2-normalised CLIP image embeddings [N, D] with OpenAI's eval preprocessing (open_clip's
    `image_transform`: PIL bicubic resize of the short side, center crop, CLIP mean/std); `encode_text`
    for prompts. UserError for a file that does not fit the architecture."""

    resize = "pil-bicubic-short224-centercrop"

    def __init__(self, name: str, *, weights_dir=None, device="cpu", strict=False):
        import open_clip

        spec, self.name = SPECS[name], name
        sd, path, sha = _load_checked(spec, weights_dir, strict)
        net = build_clip(CLIP_MODEL[name])
        try:
            net.load_state_dict(sd)
        except (RuntimeError, ValueError, KeyError) as e:
            raise _wrong_architecture(path, f"open_clip {CLIP_MODEL[name]}", e) from e
        self.feature_dim = net.text_projection.shape[1]
        self.transform = open_clip.image_transform(net.visual.image_size, is_train=False)
        self.tokenizer = open_clip.get_tokenizer(CLIP_MODEL[name])
        super().__init__(net, spec, path, sha, device)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """open_clip's own eval transform (resize short side, center crop, CLIP mean/std) per image."""
        from PIL import Image

        imgs = [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]
        return torch.stack([self.transform(img) for img in imgs]).to(x.device)

    def _forward(self, x):
        return {"features": F.normalize(self.net.encode_image(self.preprocess(x)), dim=-1)}

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D] of `texts`."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise UserError(f"{self.name}.encode_text got {type(texts).__name__}: pass a list of strings")
        with torch.inference_mode(), deterministic():
            return F.normalize(self.net.encode_text(self.tokenizer(texts).to(self.device)), dim=-1).float()


def cosine(img_feats: torch.Tensor, txt_feats: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity [N] of paired image and text embeddings (CLIP score = 100 max(cos, 0))."""
    if img_feats.shape != txt_feats.shape:
        raise UserError(f"cosine: image features {tuple(img_feats.shape)} and text features "
                        f"{tuple(txt_feats.shape)} differ: pass one caption per image")
    return (F.normalize(img_feats.double(), dim=-1) * F.normalize(txt_feats.double(), dim=-1)).sum(-1)


CMMD_SIZE = 336  # ViT-L/14@336px (scenic clip.IMAGE_RESOLUTION['vit_l14_336px'])


def cmmd_resize(x: torch.Tensor, size: int = CMMD_SIZE) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, size, size] as google-research cmmd/io_util.py reads an image: crop
    the centered square of the short side (offsets (w - l) // 2, (h - l) // 2), then PIL BICUBIC to size."""
    from PIL import Image

    out = []
    for a in x.permute(0, 2, 3, 1).cpu().numpy():
        im = Image.fromarray(a)
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        out.append(np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


class CMMDExtractor(CLIPExtractor):
    """CMMD's embedding (Jayasumana et al., CVPR 2024; google-research `cmmd`): L2-normalised image embeddings
    [N, 768] of OpenAI CLIP ViT-L/14@336px. Preprocessing as its io_util + embedding: centered square crop and
    PIL BICUBIC to 336 on uint8, / 255, then `jax.image.resize` to 336 (an identity at that size) and CLIP
    mean/std. UserError for a file that does not fit ViT-L-14-336."""

    resize = "cmmd-centercrop-pil-bicubic-336"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float32 [N, 3, 336, 336] (crop, PIL bicubic, / 255, CLIP mean/std)."""
        x01 = cmmd_resize(x).to(x.device).to(torch.float32) / 255
        return normalize(x01, CLIP_MEAN, CLIP_STD)


# ---------------------------------------------------------------------------------------------
# Domain: the project's classifier of the bundled photos.


class DomainExtractor(Extractor):
    """Features and logits of the bundled-photos classifier (pagoda.networks.domain)."""

    name, resize = "domain", "domain-net-internal"

    def __init__(self, *, weights_dir=None, device="cpu", strict=False):
        try:
            from pagoda.networks.domain import load_domain_net
        except ImportError as e:
            raise UserError("the domain extractor needs pagoda.networks.domain, missing from this install: "
                            "update the checkout or pick another extractor") from e
        spec = SPECS["domain"]
        path = resolve_weights(spec, weights_dir)
        sha, _ = verify(path, spec, strict=strict)
        net = load_domain_net(path)  # reads its config from the safetensors metadata; UserError if unfit
        self.feature_dim, self.num_logits = net.feature_dim, net.num_classes
        super().__init__(net, spec, path, sha, device)

    def _forward(self, x):
        features, logits = self.net(x)
        return {"features": features, "logits": logits}


# ---------------------------------------------------------------------------------------------
# Registry.


@dataclass(frozen=True)
class ExtractorEntry:
    """How to build one registered extractor, the options it takes, and the metrics it serves."""

    build: Callable[..., Extractor]
    options: tuple[str, ...]
    metrics: tuple[str, ...]


def _named(cls, name):
    """Builder for one name of a family class (DINOv2 sizes, CLIP models)."""
    return lambda **kw: cls(name, **kw)


# Metric names are eval.registry's METRICS keys (its check_extractor reads them before loading weights).
EXTRACTORS: dict[str, ExtractorEntry] = {
    "inception": ExtractorEntry(InceptionExtractor, ("strict", "fold"), ("fid", "sfid", "kid", "is", "pr", "dc")),
    **{n: ExtractorEntry(_named(DINOv2Extractor, n), ("strict", "resize"), ("fd_dinov2",)) for n in DINOV2_ARCH},
    **{n: ExtractorEntry(_named(CLIPExtractor, n), ("strict",), ("clip",)) for n in ("clip", "clip-vitb32")},
    "clip-vitl14-336": ExtractorEntry(_named(CMMDExtractor, "clip-vitl14-336"), ("strict",), ("cmmd",)),
    "domain": ExtractorEntry(DomainExtractor, ("strict",), ("fid", "kid", "is", "pr", "dc")),
}


def get_extractor(name: str, *, weights_dir=None, device="cpu", **opts) -> Extractor:
    """Build a registered extractor from local weights; UserError on unknown names or options."""
    if name not in EXTRACTORS:
        raise UserError(f"unknown extractor {name!r}: choose one of {', '.join(EXTRACTORS)}")
    entry = EXTRACTORS[name]
    bad = sorted(set(opts) - set(entry.options))
    if bad:
        raise UserError(f"extractor {name!r} has no option {', '.join(bad)}: it accepts {', '.join(entry.options)}")
    return entry.build(weights_dir=weights_dir, device=device, **opts)
