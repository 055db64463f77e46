"""ADM UNet (Dhariwal & Nichol 2021, as used by consistency-models and PaGoDA) with class and guidance embeddings.

This is the raw network F of EDM: `F(x; c_noise, y[, w])`. Preconditioning (c_skip, c_out, c_in) lives in the
denoiser wrapper, never here. Module names and parameter shapes follow ADM's `cm/unet.py` key for key, so the
public EDM ImageNet-64 checkpoint loads almost as is (pagoda.importers); the one difference is the extra
null-class row of `label_emb`. `output_blocks` is a plain ModuleList and the head `out` is separate, so Stage 3
can append up-blocks (they take no skip connection) and swap the head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# CFG scale meaning "no guidance" (D_w = D_u + w (D_c - D_u), METHOD §1); what guidance=None embeds.
NO_GUIDANCE = 1.0
# The guidance scale w is embedded like a timestep, as sinusoids of W_EMB_SCALE * w (DESIGN). With the timestep's
# 1000 (LCM's choice) most of the sinusoids wrap many times over w in [1, 3], so nearby scales get unrelated features
# and a short run learns a weak w-dependence; at 10 the frequencies span 1e-3 .. 10 rad per unit of w: smooth in w,
# still resolving 0.1 steps. Guided files written with 1000 record no scale and load with LEGACY_W_EMB_SCALE.
W_EMB_SCALE = 10.0
LEGACY_W_EMB_SCALE = 1000.0


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of a module; works on the meta device."""
    return sum(p.numel() for p in module.parameters())


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (ADM: residual branches and the head start as the identity / zero)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups computed in float32 whatever the input dtype (stable under bf16 / fp16)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class TimestepBlock(nn.Module):
    """Marker: a block whose forward takes the embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the embedding to the children that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ResBlock(TimestepBlock):
    """ADM residual block: GN-SiLU-conv, embedding as scale/shift of the second GN (or a bias), optional 2x up/down."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None, *,
                 use_scale_shift_norm: bool = True, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        # Resampling without parameters, applied to both paths between the in-norm and the in-conv (ADM).
        if up:
            self.h_upd, self.x_upd = nn.Upsample(scale_factor=2, mode="nearest"), nn.Upsample(scale_factor=2, mode="nearest")
        elif down:
            self.h_upd, self.x_upd = nn.AvgPool2d(2), nn.AvgPool2d(2)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels; qkv channels are laid out (q, k, v) x heads x head_dim like the released EDM-IN64.

    The consistency-models checkpoints were trained with its flash-attention path, whose layout is
    "b (three h d) s"; ADM's legacy layout (heads x (q, k, v)) would scramble them. 1x1 Conv2d for qkv and
    proj_out, as in that code (its AttentionBlock builds them with dims=2).
    """

    def __init__(self, channels: int, num_head_channels: int):
        super().__init__()
        self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(N, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [N, heads, HW, d]
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        h = h.transpose(-1, -2).reshape(N, C, H, W)
        return x + self.proj_out(h)


class Upsample(nn.Module):
    """ADM Upsample with conv (used only when resblock_updown=False): nearest 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """ADM Downsample with conv (used only when resblock_updown=False): a stride-2 3x3 conv named `op`."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class UNet(nn.Module):
    """ADM UNet F(x; c_noise, y, w) -> same shape as x with out_channels (keyword arguments = UNetConfig fields).

    - c_noise [N] float (EDM: ln(sigma)/4) is scaled by emb_noise_scale before the sinusoidal embedding
      (1000 reproduces the public EDM ImageNet-64 teacher, which embeds 1000 * ln(sigma) / 4).
    - labels [N] int64 in [0, num_classes]; num_classes is the null class, labels=None means all null.
      num_classes=0 builds no label embedding at all and labels must be None.
    - guidance [N] float CFG scale w, only with guidance_embed=True; None means w = NO_GUIDANCE (1.0).
      The w-MLP's last layer starts at zero, so a fresh w-conditioned copy of a teacher equals the teacher;
      it embeds sinusoids of guidance_emb_scale * w (default W_EMB_SCALE).
    - grow_stages: Stage 3's 2x growth stages appended before the head (`output_resolution` =
      resolution * 2^grow_stages); the input x stays at `resolution` (3 x base x base at every stage).
      grow_scale_shift_norm: their ResBlocks take the embedding as scale-shift of the norm (True, files written
      before the key) or as a bias (False, the official growth scripts). grow_skip: each stage adds its own
      zero-initialised head to the upsampled image of the stage before (exact growth start) instead of the one
      kept head reading the last block.
    """

    def __init__(self, *, resolution: int, in_channels: int = 3, out_channels: int = 3, model_channels: int = 192,
                 channel_mult: tuple[int, ...] = (1, 2, 3, 4), num_res_blocks: int = 3,
                 attention_resolutions: tuple[int, ...] = (32, 16, 8), num_head_channels: int = 64,
                 dropout: float = 0.0, num_classes: int = 0, use_scale_shift_norm: bool = True,
                 resblock_updown: bool = True, emb_noise_scale: float = 1000.0, guidance_embed: bool = False,
                 guidance_emb_scale: float = W_EMB_SCALE, grow_stages: int = 0, grow_scale_shift_norm: bool = True,
                 grow_skip: bool = False):
        super().__init__()
        if not guidance_emb_scale > 0:
            raise ValueError(f"network.guidance_emb_scale={guidance_emb_scale} must be > 0")
        self.resolution, self.model_channels, self.num_classes = resolution, model_channels, num_classes
        self.grow_stages, self.output_resolution = grow_stages, resolution * 2 ** grow_stages
        self.emb_noise_scale, self.guidance_emb_scale = emb_noise_scale, guidance_emb_scale
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.guidance_emb = None
        if guidance_embed:
            self.guidance_emb = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                              zero_module(nn.Linear(emb_dim, emb_dim)))

        def res(ch_in, ch_out, **kw):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch, ds):
            return [AttentionBlock(ch, num_head_channels)] if resolution // ds in attention_resolutions else []

        widths = [model_channels * m for m in channel_mult]
        ch, skips, ds = self._encoder(in_channels, widths, num_res_blocks, resblock_updown, res, attn)
        self.middle_block = TimestepEmbedSequential(res(ch, ch), AttentionBlock(ch, num_head_channels), res(ch, ch))
        ch = self._decoder(ch, skips, ds, widths, num_res_blocks, resblock_updown, res, attn)

        # Stage 3 (METHOD §2): per 2x, an up-ResBlock (nearest) and two ResBlocks at the head's width, no attention,
        # no skips, output convs zero-initialised (ResBlock's default), so a fresh stage passes h on upsampled. Their
        # embedding is a scale-shift of the norm or, as the official growth scripts (`use_scale_shift_norm_high`
        # False), a bias added before it.
        self.base_output_blocks = len(self.output_blocks)
        for _ in range(grow_stages):
            self.output_blocks.extend(
                TimestepEmbedSequential(ResBlock(ch, emb_dim, dropout, ch, use_scale_shift_norm=grow_scale_shift_norm,
                                                 up=up)) for up in (True, False, False))

        def head():  # GroupNorm, SiLU, a zero-initialised 3x3 conv to the image (ADM `out`)
            return nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

        self.out = head()
        # grow_skip (DESIGN, ProGAN's skip generator, Karras et al. 2018 / StyleGAN2's "skip" G): the image of each 2x
        # stage is up(the previous stage's image) + a head of its own on the new features, that head's conv zero, so
        # a freshly grown G is exactly up(G). Without it the kept head `out` reads the last grown block (the paper's).
        self.grow_skip = grow_skip and grow_stages > 0
        self.grow_out = nn.ModuleList(head() for _ in range(grow_stages)) if self.grow_skip else None

    def _encoder(self, in_channels: int, widths: list[int], num_res_blocks: int, resblock_updown: bool, res, attn
                 ) -> tuple[int, list[int], int]:
        """input_blocks: a stem conv, num_res_blocks blocks per level, a down-block between levels (ADM's order, so
        a seeded init is ADM's). Returns (channels at the bottom, the skips' channels, the bottom's downsampling)."""
        ch = widths[0]
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.input_blocks.append(TimestepEmbedSequential(res(ch, width), *attn(width, ds)))
                ch = width
                skips.append(ch)
            if level != len(widths) - 1:
                self.input_blocks.append(TimestepEmbedSequential(res(ch, ch, down=True) if resblock_updown
                                                                 else Downsample(ch)))
                skips.append(ch)
                ds *= 2
        return ch, skips, ds

    def _decoder(self, ch: int, skips: list[int], ds: int, widths: list[int], num_res_blocks: int,
                 resblock_updown: bool, res, attn) -> int:
        """output_blocks: num_res_blocks + 1 blocks per level, each eating one skip; an up-block ends each level but
        the last. Returns the channels at the head."""
        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), width), *attn(width, ds)]
                ch = width
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        return ch

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None, guidance: torch.Tensor | None,
              N: int) -> torch.Tensor:
        """The embedding every ResBlock sees: time_embed(noise) + label_emb(y) [+ guidance_emb(w)]."""
        t = self.emb_noise_scale * c_noise.float().reshape(-1).expand(N)
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((N,), self.num_classes, dtype=torch.long, device=emb.device)
            emb = emb + self.label_emb(labels.reshape(-1).expand(N))
        elif labels is not None:
            raise ValueError("this UNet is unconditional (num_classes=0) but labels were given")
        if self.guidance_emb is not None:
            w = torch.full((N,), NO_GUIDANCE, device=emb.device) if guidance is None else guidance.float().reshape(-1).expand(N)
            emb = emb + self.guidance_emb(timestep_embedding(self.guidance_emb_scale * w, self.model_channels))
        elif guidance is not None:
            raise ValueError("this UNet has no guidance embedding (guidance_embed=False) but guidance was given")
        return emb

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(c_noise, labels, guidance, x.shape[0])
        h, hs = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks[:self.base_output_blocks]:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        if self.grow_skip:  # image_k = up(image_{k-1}) + grow_out[k](h_k), image_0 = out(h_0)
            image = self.out(h)
            for k, head in enumerate(self.grow_out):
                for block in self.output_blocks[self.base_output_blocks + 3 * k:self.base_output_blocks + 3 * k + 3]:
                    h = block(h, emb)
                image = F.interpolate(image, scale_factor=2, mode="nearest") + head(h)
            return image.to(x.dtype)  # [N, out_channels, output_resolution, output_resolution]
        for block in self.output_blocks[self.base_output_blocks:]:  # Stage 3's blocks take h alone (no skips)
            h = block(h, emb)
        return self.out(h).to(x.dtype)  # [N, out_channels, output_resolution, output_resolution]

