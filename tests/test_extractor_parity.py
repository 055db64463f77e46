"""Extractors against the reference tools' published forwards, each parity test with sensitivity controls.

The reference side of every test is written here from the reference tool's source (named in each
docstring) or is the tool's own module used directly, and is driven by the same weights; it never
calls the project's extractors. Every parity test also computes deliberately wrong conventions with
the reference and requires each to move the features by BLIND x the tolerance or more: a test whose
controls stay inside that could not see a convention error, and fails as blind.

Error measure: err(a, ref) = max |a - ref| over all images and dimensions, divided by the spread of
the reference, the RMS over dimensions of the per-dimension standard deviation across the images.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import load_file, save_file

from eval.extractors import get_extractor, torch_fidelity_inception
from pagoda.weights import load_state_dict

TOL = 1e-5  # parity of the conventions, both sides in float64 where the extractor allows it (DINOv2)
TOL_F32 = 3e-5  # the float32 outputs themselves: the hub's own float32 ViT-L/14 forward is 0.9e-5 from its float64
TOL_FOLDED = 1e-3  # Inception with BatchNorm folded into the convs: w g / s rounds differently (pool3: ~4e-4)
BLIND = 100  # a wrong convention must move the features by at least BLIND x the test's tolerance
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def spread(ref: torch.Tensor) -> float:
    """RMS over dimensions of the per-dimension std across images [N, D]."""
    return ref.double().std(0).pow(2).mean().sqrt().item()


def err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / spread(ref)."""
    return ((a.double() - ref.double()).abs().max() / spread(ref)).item()


def check(name: str, ours: torch.Tensor, ref: torch.Tensor, controls: dict[str, torch.Tensor], tol=TOL) -> None:
    """Assert parity within `tol` and every control beyond BLIND x tol; print the measured numbers (-s)."""
    moved = {k: err(v, ref) for k, v in controls.items()}
    print(f"{name}: err {err(ours, ref):.2e}; controls " + ", ".join(f"{k} {v:.2e}" for k, v in moved.items()))
    assert ours.shape == ref.shape
    assert err(ours, ref) <= tol, name
    blind = {k: v for k, v in moved.items() if v < BLIND * tol}
    assert not blind, f"{name}: controls {blind} move the features by less than {BLIND * tol}: the test is blind"


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).numpy()]


def center_square(x: torch.Tensor) -> torch.Tensor:
    """Centered square crop of the short side (a control: crop instead of squash)."""
    h, w = x.shape[-2:]
    s = min(h, w)
    return x[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


# --- DINOv2: torch.hub facebookresearch/dinov2 ------------------------------------------------------------


def hub_pos_encoding(pos_embed, w0, h0, *, offset=0.1, antialias=False, timm_way=False):
    """DinoVisionTransformer.interpolate_pos_encoding (dinov2/models/vision_transformer.py) with the defaults of
    dinov2/hub/backbones.py (interpolate_offset=0.1, interpolate_antialias=False). timm_way: the control,
    timm's checkpoint_filter_fn (resample_abs_pos_embed to a size, bicubic, antialias=True)."""
    pe = pos_embed.float()
    m = int(math.sqrt(pe.shape[1] - 1))
    patch = pe[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if timm_way:
        patch = F.interpolate(patch, size=(w0, h0), mode="bicubic", antialias=True)
    else:
        patch = F.interpolate(patch, scale_factor=(float(w0 + offset) / m, float(h0 + offset) / m),
                              mode="bicubic", antialias=antialias)
    return torch.cat([pe[:, :1], patch.permute(0, 2, 3, 1).reshape(1, w0 * h0, -1)], dim=1)


def hub_block(t, p, heads):
    """NestedTensorBlock.forward at inference (dinov2/layers/block.py, attention.py, mlp.py, layer_scale.py):
    x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); LayerNorm eps 1e-6, qkv bias, GELU."""
    b, n, c = t.shape
    y = F.layer_norm(t, (c,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
    qkv = F.linear(y, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    a = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    t = t + p["ls1.gamma"] * F.linear(a.transpose(1, 2).reshape(b, n, c), p["attn.proj.weight"], p["attn.proj.bias"])
    y = F.layer_norm(t, (c,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
    y = F.linear(F.gelu(F.linear(y, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    return t + p["ls2.gamma"] * y


def hub_dinov2(sd, x, heads, *, timm_grid=False, cls_before_norm=False):
    """DinoVisionTransformer.forward -> x_norm_clstoken (prepare_tokens_with_masks, blocks, norm, [:, 0]) on
    normalised images [N, 3, H, W]; the keyword flags are the controls."""
    _, _, w, h = x.shape  # the hub's names: w is dim 2
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], dim=1)
    t = t + hub_pos_encoding(sd["pos_embed"], w // 14, h // 14, timm_way=timm_grid)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        t = hub_block(t, {k.removeprefix(f"blocks.{i}."): v for k, v in sd.items() if k.startswith(f"blocks.{i}.")},
                      heads)
    if cls_before_norm:
        return t[:, 0]
    return F.layer_norm(t, t.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


def edm2_torch(x, mode="bicubic"):
    """DINOv2Detector.__call__ with resize_mode='torch' (NVlabs/edm2 calculate_metrics.py): interpolate the
    0..255 floats to 224 (bicubic, antialias=True), / 255, ImageNet mean/std. mode: the bilinear control."""
    x = F.interpolate(x.to(torch.float32), size=(224, 224), mode=mode, antialias=True)
    x = x.to(torch.float32) / 255
    x = x - torch.tensor(IMAGENET_MEAN).reshape(1, -1, 1, 1)
    return x / torch.tensor(IMAGENET_STD).reshape(1, -1, 1, 1)


def dgm_eval(x):
    """DINOv2Encoder.transform without --clean_resize (layer6ai-labs/dgm-eval dgm_eval/models/dinov2.py):
    torchvision Resize((224, 224), BICUBIC) on the PIL image, ToTensor, Normalize; = EDM2's resize_mode='pil'."""
    t = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(IMAGENET_MEAN,
                                                                                                  IMAGENET_STD)])
    return torch.stack([t(im) for im in to_pil(x)])


DINO_SETS = {"square-64": (4, (64, 64)), "nonsquare-37x53": (4, (37, 53)), "large-256": (3, (256, 256))}


def dinov2_parity(name, sd, heads, ex_by_resize, x):
    """Our extractor against the hub forward: its float32 output (within TOL_F32, with three controls, four on
    non-square images), and its preprocessing + network run in float64 against the hub's in float64 (within TOL)."""
    sd64 = {k: v.double() for k, v in sd.items()}
    with torch.no_grad():
        ref_in = {"edm2-torch": edm2_torch(x), "pil-bicubic": dgm_eval(x)}
        ref = {k: hub_dinov2(sd, v, heads) for k, v in ref_in.items()}
        controls = {
            "bilinear": hub_dinov2(sd, edm2_torch(x, "bilinear"), heads),
            "grid-timm-antialias": hub_dinov2(sd, ref_in["edm2-torch"], heads, timm_grid=True),
            "cls-before-norm": hub_dinov2(sd, ref_in["edm2-torch"], heads, cls_before_norm=True),
        }
        if x.shape[-1] != x.shape[-2]:
            controls["crop-not-squash"] = hub_dinov2(sd, edm2_torch(center_square(x)), heads)
    for resize, ex in ex_by_resize.items():
        out = ex(x)["features"]
        assert out.dtype == torch.float32 and ex.resize == resize
        check(f"{name} {resize} float32", out, ref[resize], controls if resize == "edm2-torch" else {}, tol=TOL_F32)
        with torch.no_grad():
            ours64 = copy.deepcopy(ex.net).double().forward_features(ex.preprocess(x).double())[:, 0]
            check(f"{name} {resize} float64", ours64, hub_dinov2(sd64, ref_in[resize].double(), heads), {})


@pytest.fixture(scope="module")
def dinov2_vits14(dinov2_weights):
    return {r: get_extractor("dinov2-vits14", weights_dir=dinov2_weights.parent, resize=r)
            for r in ("edm2-torch", "pil-bicubic")}


@pytest.mark.parametrize("images", DINO_SETS)
def test_dinov2_vits14_equals_hub_forward(images, dinov2_vits14, dinov2_weights, photo_crops):
    n, hw = DINO_SETS[images]
    dinov2_parity(f"ViT-S/14 {images}", load_file(str(dinov2_weights)), 6, dinov2_vits14, photo_crops(n, hw, 1))


def test_dinov2_reads_the_hub_file(dinov2_weights, dinov2_vits14, photo_crops, tmp_path):
    """torch.hub's dinov2_vits14_pretrain.pth (the same tensors plus `mask_token`) gives the same features."""
    sd = load_file(str(dinov2_weights))
    torch.save({**sd, "mask_token": torch.zeros(1, sd["cls_token"].shape[-1])}, tmp_path / "dinov2_vits14_pretrain.pth")
    ex = get_extractor("dinov2-vits14", weights_dir=tmp_path)
    x = photo_crops(2, (64, 64), 2)
    assert ex.resize == "edm2-torch" and ex.feature_dim == 384 and ex.weights_path.name == "dinov2_vits14_pretrain.pth"
    assert torch.equal(ex(x)["features"], dinov2_vits14["edm2-torch"](x)["features"])


@pytest.mark.slow
@pytest.mark.parametrize("name,arch,heads", [("dinov2-vitb14", "vit_base_patch14_dinov2.lvd142m", 12),
                                             ("dinov2", "vit_large_patch14_dinov2.lvd142m", 16)])
def test_dinov2_vitb14_vitl14_equal_hub_forward(name, arch, heads, dinov2_weight_maker, photo_crops, tmp_path):
    path = dinov2_weight_maker(arch, tmp_path / f"{arch}.safetensors", seed=1)
    ex = {"edm2-torch": get_extractor(name, weights_dir=tmp_path)}
    sd = load_file(str(path))
    for images in ("nonsquare-37x53", "large-256"):
        dinov2_parity(f"{arch} {images}", sd, heads, ex, photo_crops(3, DINO_SETS[images][1], 3))


# --- sFID: the ADM evaluator's mixed_6/conv, via torch-fidelity's unmodified Inception ------------------------


def test_sfid_spatial_equals_mixed_6d_branch1x1(inception_weights, real_images):
    """Reference: forward hooks on torch-fidelity's FeatureExtractorInceptionV3 as published: the output of
    Mixed_6d.branch1x1 (BasicConv2d: conv, bn, ReLU), [:, :7], NCHW -> NHWC, one row per sample, which is what
    guided-diffusion evaluations/evaluator.py does to `mixed_6/conv:0` ([..., :7], reshape([N, -1]))."""
    net = torch_fidelity_inception(load_state_dict(inception_weights)).eval()
    got = {}

    def keep(key):
        return lambda mod, args, out: got.__setitem__(key, out.clone())  # clone: the ReLU after bn is in place

    for key, mod in {"6d": net.Mixed_6d.branch1x1, "6e": net.Mixed_6e.branch1x1, "6d-bn": net.Mixed_6d.branch1x1.bn}.items():
        mod.register_forward_hook(keep(key))
    x = real_images[:6]
    with torch.no_grad():
        net(x)

    def nhwc(m):
        return m[:, :7].permute(0, 2, 3, 1).reshape(len(m), -1)

    ref = nhwc(got["6d"])
    controls = {"chw-order": got["6d"][:, :7].reshape(len(x), -1), "mixed_6e": nhwc(got["6e"]),
                "pre-relu": nhwc(got["6d-bn"])}
    fast = get_extractor("inception", weights_dir=inception_weights.parent)
    plain = get_extractor("inception", weights_dir=inception_weights.parent, fold=False)
    assert fast.spatial_dim == plain.spatial_dim == 2023 == ref.shape[1]
    check("sFID fold=True", fast(x)["spatial"], ref, controls, tol=TOL_FOLDED)
    check("sFID fold=False", plain(x)["spatial"], ref, controls)
    assert torch.equal(plain(x)["spatial"], ref)  # torch-fidelity's own forward: bit-exact


# --- CLIP: open_clip's model and transform, and CMMD's preprocessing ------------------------------------------


def open_clip_reference(model_name, sd, quick_gelu=True):
    """open_clip.create_model_and_transforms(model, pretrained=None) holding `sd`: its model and eval transform."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None,
                                                                 force_quick_gelu=quick_gelu)
    model.load_state_dict(sd)
    return model.eval(), preprocess


def clip_embed(model, pixels):
    with torch.no_grad():
        return F.normalize(model.encode_image(pixels), dim=-1)


def test_clip_vitb32_equals_open_clip(clip_weights, photo_crops):
    """CLIP-score embeddings: open_clip's OpenAI ViT-B/32 (QuickGELU) and its eval transform (= OpenAI clip's
    _transform: Resize(224, BICUBIC) of the short side, CenterCrop(224), ToTensor, Normalize), L2-normalised."""
    sd = load_file(str(clip_weights))
    model, preprocess = open_clip_reference("ViT-B-32", sd)
    gelu, _ = open_clip_reference("ViT-B-32", sd, quick_gelu=False)
    ex = get_extractor("clip-vitb32", weights_dir=clip_weights.parent.parent)
    x = photo_crops(6, (48, 80), 4)  # non-square: crop and squash differ
    pixels = torch.stack([preprocess(im) for im in to_pil(x)])
    squash = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    controls = {"gelu-not-quickgelu": clip_embed(gelu, pixels),
                "squash-not-crop": clip_embed(model, torch.stack([squash(im) for im in to_pil(x)]))}
    check("CLIP ViT-B/32", ex(x)["features"], clip_embed(model, pixels), controls)


def cmmd_reference_pixels(x, size=336):
    """google-research cmmd: io_util._read_image (_center_crop_and_resize: crop the centered square of the short
    side at ((w - l) // 2, (h - l) // 2), PIL resize to size x size BICUBIC; float32), / 255.0, then
    embedding._clip_preprocess: jax.image.resize to (size, size) (the identity at that size) and
    clip.normalize_image ((x - IMAGE_MEAN) / IMAGE_STD). Returns NCHW float32."""
    out = []
    for im in to_pil(x):
        w, h = im.size
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), resample=Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).astype(np.float32)) / 255.0)
    images = torch.stack(out)
    images = (images - torch.tensor(CLIP_MEAN, dtype=torch.float32)) / torch.tensor(CLIP_STD, dtype=torch.float32)
    return images.permute(0, 3, 1, 2)


def torch_bicubic_pixels(x, size=336):
    """Control: sayakpaul/cmmd-pytorch's _resize_bicubic applied to the raw image (no crop, no antialias)."""
    x = F.interpolate(x.float() / 255, size=(size, size), mode="bicubic")
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("hw", [(64, 64), (37, 53), (300, 400)])
def test_cmmd_preprocessing_equals_reference(clip_weights, photo_crops, hw):
    """The pixels CMMD feeds its CLIP, exactly; the class is built on the ViT-B/32 fixture (its preprocessing does
    not depend on the network) so that this runs in the default suite."""
    from eval.extractors import CMMDExtractor

    ex = CMMDExtractor("clip-vitb32", weights_dir=clip_weights.parent.parent)
    x = photo_crops(3, hw, 5)
    ref = cmmd_reference_pixels(x)
    assert ex.resize == "cmmd-centercrop-pil-bicubic-336"
    assert torch.equal(ex.preprocess(x), ref)
    assert (torch_bicubic_pixels(x) - ref).abs().max() > 1e-2
    if hw[0] != hw[1]:
        squash = torch.stack([T.Normalize(CLIP_MEAN, CLIP_STD)(T.ToTensor()(im.resize((336, 336), Image.BICUBIC)))
                              for im in to_pil(x)])
        assert (squash - ref).abs().max() > 1e-2


@pytest.mark.slow
def test_cmmd_vitl14_336_equals_reference(photo_crops, tmp_path):
    """CMMD's embeddings: OpenAI CLIP ViT-L/14@336px (open_clip ViT-L-14-336, QuickGELU, as scenic's
    vit_l14_336px) on cmmd's pixels, L2-normalised (scenic CLIP.encode_image(normalize=True))."""
    import open_clip

    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in open_clip.create_model("ViT-L-14-336", pretrained=None,
                                                               force_quick_gelu=True).state_dict().items()}
    save_file(sd, str(tmp_path / "ViT-L-14-336-openai.safetensors"))
    ex = get_extractor("clip-vitl14-336", weights_dir=tmp_path)
    assert (ex.feature_dim, ex.resize) == (768, "cmmd-centercrop-pil-bicubic-336")
    x = photo_crops(3, (37, 53), 6)
    model, _ = open_clip_reference("ViT-L-14-336", sd)
    gelu, _ = open_clip_reference("ViT-L-14-336", sd, quick_gelu=False)
    pixels = cmmd_reference_pixels(x)
    controls = {"gelu-not-quickgelu": clip_embed(gelu, pixels), "torch-bicubic-no-crop": clip_embed(model, torch_bicubic_pixels(x))}
    check("CMMD ViT-L/14@336", ex(x)["features"], clip_embed(model, pixels), controls)
