"""PaGoDA's Stage-2b losses as pure functions (METHOD §2; Kim et al., NeurIPS 2024): no step counters, logging or
cross-rank gathers; per-sample losses come back unreduced ([N]), the caller takes the mean.

    L_G = L_rec + w_adv * lambda * L_adv_G,   L_rec = d(G(z_x, y), x)   (L_dstl = d(G(z), ODE_teacher(z)))
    L_D = mean relu(1 - D(aug(x))) + mean relu(1 + D(aug(G(.))))      (hinge; real_i, fake_i share one draw)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.networks.discriminator import AugmentDraw, apply_augment
from pagoda.networks.features import Backbone

LAMBDA_EPS, LAMBDA_MAX_RATIO, LAMBDA_CLIP = 1e-4, 1e4, (0.01, 10.0)  # METHOD: adaptive weight constants


def reconstruction_distance(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """LPIPS-like distance [N] (float32) between two lists of maps [N, C_i, H_i, W_i].

    Each map is normalised over channels (f / (|f|_2 + 1e-10), as LPIPS and CTM's `cnn_vit` loss), then the
    squared difference is averaged over space and summed over channels and maps (Zhang et al. 2018, eq. 1 with
    unit weights; CTM `get_CTM_loss`). ValueError when the lists or shapes disagree.
    """
    if len(feats_a) != len(feats_b) or not feats_a:
        raise ValueError(f"need two equally long, non-empty lists of maps, got {len(feats_a)} and {len(feats_b)}")
    total = 0
    for a, b in zip(feats_a, feats_b):
        if a.shape != b.shape:
            raise ValueError(f"feature maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        a, b = a.float(), b.float()  # METHOD: feature networks in fp32, whatever autocast gave the maps
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total = total + (a - b).square().mean(dim=(2, 3)).sum(dim=1)
    return total


def d(x: torch.Tensor, x_hat: torch.Tensor, backbones: Backbone | Sequence[Backbone],
      draw: AugmentDraw | None = None) -> torch.Tensor:
    """PaGoDA's distance d(x, x_hat) [N] for L_rec = d(G(z_x, y), x) and L_dstl = d(G(z), ODE_teacher(z)).

    x, x_hat: float images [N, 3, H, W] in [-1, 1]. For each backbone both are resized to its input size FIRST
    (METHOD: 224 px below 256, bilinear, no antialias), then augmented with the same `draw` (None = no
    augmentation; one draw serves every backbone: DESIGN), then normalised and featurised by the backbone;
    the distances add up over backbones. Symmetric, d(x, x) = 0; gradients flow to both inputs.
    """
    backbones = [backbones] if isinstance(backbones, Backbone) else list(backbones)
    if x.shape != x_hat.shape:
        raise ValueError(f"d needs two batches of one shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    total = 0
    for backbone in backbones:
        a, b = backbone.resize(x), backbone.resize(x_hat)
        if draw is not None:
            a, b = apply_augment(a, draw), apply_augment(b, draw)
        total = total + reconstruction_distance(backbone(a), backbone(b))
    return total


def _per_sample(logits: torch.Tensor) -> torch.Tensor:
    """Logits [N, ...] as [N, P] (a single logit per sample becomes [N, 1])."""
    return logits.reshape(logits.shape[0], -1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss [N] (Lim & Ye 2017; METHOD): mean_p relu(1 - D(x)) + mean_p relu(1 + D(G)).

    logits [N, P] (any [N, ...]); real_i and fake_i are a pair (they share one DiffAugment draw), so both need
    the same shape. Zero for a perfect discriminator (real logits >= 1, fake logits <= -1).
    """
    if logits_real.shape != logits_fake.shape:
        raise ValueError(f"real and fake logits differ in shape: {tuple(logits_real.shape)} vs {tuple(logits_fake.shape)}")
    return F.relu(1 - _per_sample(logits_real)).mean(1) + F.relu(1 + _per_sample(logits_fake)).mean(1)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator's hinge-GAN loss L_adv_G [N] = -mean_p D(aug(G(z, y)), y) (METHOD)."""
    return -_per_sample(logits_fake).mean(1)


def adaptive_weight(l_rec: torch.Tensor | float, l_adv: torch.Tensor, last_layer_weight: torch.Tensor) -> torch.Tensor:
    """lambda = clip(|grad_W L_rec| / (|grad_W L_adv| + 1e-4), 0.01, 10), the ratio first clamped to [0, 1e4],
    detached (METHOD; VQGAN's `calculate_adaptive_weight`, Esser et al. 2021, as CTM / PaGoDA clip it).

    l_rec, l_adv: the losses (reduced by mean when not scalars, as the references pass means), still attached
    to the graph, which is kept (retain_graph) for the caller's backward. last_layer_weight: W, e.g.
    `adaptive_weight_layer(unet)`. Returns a 0-dim float32 tensor on W's device; 1 when
    L_rec = 0 (METHOD: "skipped"), also when l_rec is a plain 0 or a constant tensor. Both norms are of
    unscaled gradients, so pass the losses before any loss scaling (a common scale would cancel anyway).
    ValueError if L_rec != 0 does not depend on W, or L_adv does not.
    """
    one = torch.ones((), device=last_layer_weight.device)
    if not (torch.is_tensor(l_rec) and l_rec.requires_grad):
        if float(l_rec if not torch.is_tensor(l_rec) else l_rec.detach().sum()) == 0:
            return one
        raise ValueError("l_rec is non-zero but not attached to a graph: pass the loss before .detach()")
    l_rec, l_adv = l_rec.mean(), l_adv.mean()
    g_rec = torch.autograd.grad(l_rec, last_layer_weight, retain_graph=True, allow_unused=True)[0]
    g_adv = torch.autograd.grad(l_adv, last_layer_weight, retain_graph=True, allow_unused=True)[0]
    if g_adv is None:
        raise ValueError("L_adv does not depend on the adaptive-weight layer: pass the generator's last layer")
    if g_rec is None:
        g_rec = torch.zeros_like(last_layer_weight)  # only allowed when L_rec = 0, checked below
        if l_rec.detach() != 0:
            raise ValueError("L_rec does not depend on the adaptive-weight layer: pass the generator's last layer")
    ratio = (g_rec.norm() / (g_adv.norm() + LAMBDA_EPS)).clamp(0, LAMBDA_MAX_RATIO).detach()
    lam = ratio.clamp(*LAMBDA_CLIP).float()
    return torch.where(l_rec.detach() == 0, one, lam)


def adaptive_weight_layer(net: nn.Module) -> nn.Parameter:
    """W of the adaptive weight: `output_blocks[-1][0].out_layers[3].weight` of the (first) pagoda UNet in `net`:
    the last conv of the first layer (a ResBlock) of the last output block (METHOD; CTM's
    `output_blocks[15][0].out_layers[3]` for the ImageNet-64 UNet's 16 output blocks). ValueError without a UNet."""
    from pagoda.networks.unet import UNet

    unet = next((m for m in net.modules() if isinstance(m, UNet)), None)
    if unet is None:
        raise ValueError(f"{type(net).__name__} holds no pagoda UNet: pass the generator")
    return unet.output_blocks[-1][0].out_layers[3].weight
