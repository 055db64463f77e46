"""The paper presets against the official code (sony/pagoda; issue 24), and the growth start that is exact.

Each test fails on the code before the fix it guards: dropout was live in G, the grown blocks used scale-shift norm,
the 512 px reconstructions' discriminator sat in the adversarial update with lambda = 1, its heads were sized from
the 512 px maps (5/4/3/2 down-blocks), the growth presets passed 8 images per micro-batch, a grown G started only
near up(G), a run whose inputs were replaced at the same paths was taken as finished, and `drift --out` appended
rows to whatever file it was given.
"""

import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_grow import _net, _z
from test_losses import paper_dir  # noqa: F401 (fixture: random DeiT / EfficientNet weights under official names)
from test_pairs import _save_teacher as save_tiny_teacher

from pagoda.__main__ import main
from pagoda.checkpoint import load_network, model_meta, save_model
from pagoda.config import PRESETS
from pagoda.data import build_dataset, save_npz
from pagoda.diffusion import one_step
from pagoda.errors import run_cli
from pagoda.losses import adaptive_weight, adaptive_weight_layer, d, hinge_g_loss
from pagoda.networks.discriminator import ProjectedDiscriminator
from pagoda.networks.features import build_backbone
from pagoda.networks.unet import UNet
from pagoda.pairs import make_pairs, pair_batch
from pagoda.stages.distill import generator_network
from pagoda.stages.grow import GrowStage, grow_network
from pagoda.train import micro_batching

pytestmark = pytest.mark.usefixtures("one_thread")
RES = 8


def _save_teacher_with_dropout(path, p: float = 0.1, seed: int = 1):
    cfg = PRESETS["smoke"].teacher
    cfg = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, dropout=p))
    torch.manual_seed(seed)
    net = UNet(**dataclasses.asdict(cfg.network))
    with torch.no_grad():
        for q in net.parameters():
            q.add_(0.05 * torch.randn_like(q))  # no zero convs: dropout reaches the output
    save_model(path, net.state_dict(), model_meta(kind="teacher", stage="teacher", config=cfg, step=0, ema_rate=0.999))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 labelled photo crops at 16 px (the stages crop them to 8 / 16)."""
    d_ = tmp_path_factory.mktemp("official")
    photos = build_dataset("photos", 16)
    x, y = pair_batch(photos, range(0, 2 * len(photos), 2 * len(photos) // 16))
    save_npz(d_ / "data.npz", x.permute(0, 2, 3, 1).numpy(), y.numpy())
    return d_


def _distill(teacher, pairs, out, *more):
    return run_cli(main, ["distill", "--preset", "smoke", "--teacher", str(teacher), "--pairs", str(pairs),
                          "--out", str(out), *map(str, more)])


# ---------------------------------------------------------------------------------------------
# 1. Dropout 0 in G (official cm/script_util.py builds G with dropout=0.0).

def test_g_from_a_dropout_teacher_has_no_dropout_and_its_file_says_so(data, tmp_path):
    teacher = _save_teacher_with_dropout(tmp_path / "t.safetensors")
    t_net, meta = load_network(teacher)
    z, y = _z()
    t_net.train()
    with torch.no_grad():  # control: the teacher's own network in train mode is not deterministic
        assert not torch.equal(one_step(t_net, z, y, sigma_max=80.0), one_step(t_net, z, y, sigma_max=80.0))
    make_pairs(teacher, str(data / "data.npz"), tmp_path / "pairs", shard_size=16, batch=16, progress=False)
    assert _distill(teacher, tmp_path / "pairs", tmp_path / "g", "--set", "train.steps=1") == 0
    g, g_meta = load_network(tmp_path / "g" / "G.safetensors", kind="pagoda")
    assert g_meta["network"]["dropout"] == 0.0
    g.train()
    with torch.no_grad():
        assert torch.equal(one_step(g, z, y, sigma_max=80.0), one_step(g, z, y, sigma_max=80.0))
    # and the stage's G is the teacher's network weight for weight, dropout aside
    g0, network = generator_network(t_net, meta["network"], guided=False)
    assert network["dropout"] == 0.0 and all(torch.equal(a, b) for a, b in zip(g0.state_dict().values(),
                                                                               t_net.state_dict().values()))
    # a G of older code that kept dropout loses it when grown
    grown, grown_cfg = grow_network(t_net, meta["network"])
    assert grown_cfg["dropout"] == 0.0 and all(m.p == 0.0 for m in grown.modules() if isinstance(m, torch.nn.Dropout))


# ---------------------------------------------------------------------------------------------
# 2. The grown blocks take the embedding as a bias (official --use_scale_shift_norm_high=False).

@pytest.mark.parametrize("preset", ["in64to128", "in64to256", "in64to512"])
def test_paper_grown_blocks_have_no_scale_shift_norm(preset):
    cfg = PRESETS[preset].grow
    src, net_cfg = _net()
    grown, grown_cfg = grow_network(src, net_cfg, scale_shift_norm=cfg.scale_shift_norm, start=cfg.start)
    new = [grown.output_blocks[i][0] for i in range(src.base_output_blocks, len(grown.output_blocks))]
    assert len(new) == 3 and not any(b.use_scale_shift_norm for b in new) and not grown_cfg["grow_scale_shift_norm"]
    width = new[0].out_layers[0].num_channels
    assert all(b.emb_layers[1].out_features == width for b in new)  # a bias, not 2 x width (scale and shift)
    assert src.output_blocks[0][0].use_scale_shift_norm  # the trunk keeps ADM's scale-shift
    assert cfg.start == "kept-head"  # the official architecture: one head, kept


def test_a_grown_g_keeps_its_layout_and_old_files_load_as_written():
    src, cfg = _net()
    g1, cfg1 = grow_network(src, cfg, scale_shift_norm=True)
    with pytest.raises(Exception, match="grown with scale_shift_norm=true"):
        grow_network(g1, cfg1, scale_shift_norm=False)
    legacy = {k: v for k, v in cfg1.items() if k not in ("grow_scale_shift_norm", "grow_skip")}  # before the keys
    from pagoda.checkpoint import build_network
    assert build_network({"network": legacy}).output_blocks[-1][0].use_scale_shift_norm


# ---------------------------------------------------------------------------------------------
# 3-4. 512 px: the reconstructions' discriminator in the L_rec update, heads sized as at 256 px.

def test_512_heads_have_the_official_depth_and_patch_count(paper_dir):  # noqa: F811
    bb = build_backbone("efficientnet-lite0", weights_dir=paper_dir, seed=2)
    heads = {r: ProjectedDiscriminator(bb, num_classes=0, resolution=r).heads for r in (256, 512)}
    assert [len(h.main) for h in heads[512]] == [4, 3, 2, 1] == [len(h.main) for h in heads[256]]
    assert [h.num_patches for h in heads[512]] == [13 * 13] * 4 and [h.num_patches for h in heads[256]] == [25] * 4
    with torch.no_grad():
        assert ProjectedDiscriminator(bb, num_classes=0, resolution=512)(torch.zeros(1, 3, 512, 512)).shape == (1, 676)


def _stage3(net_cfg_seed: int = 0):
    src, cfg = _net(net_cfg_seed)
    g1, cfg1 = grow_network(src, cfg)  # the paper's layout (kept head), on the smoke net
    g2, cfg2 = grow_network(g1, cfg1)
    smoke = PRESETS["smoke"].grow
    gcfg = dataclasses.replace(smoke, start="kept-head",
                               loss=dataclasses.replace(smoke.loss, augment=False, w_rec=0.7, w_adv=0.9))
    torch.manual_seed(0)
    stage = GrowStage(gcfg, g2, cfg2, sigma_max=80.0, sigma_data=0.5, stage_index=3, guided=False)
    stage.disc.train()  # as the loop puts it: BatchNorm on batch statistics, spectral norms fixed within a step
    return stage, gcfg


def test_512_loss_per_update_phase_is_the_official_formula():
    stage, gcfg = _stage3()
    net, n = stage.net, 4
    z, y = _z(n)
    x = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    batch = [((x + 1) * 127.5).round().to(torch.uint8), y, z, torch.ones(n)]
    real = batch[0].float() / 127.5 - 1
    loss_rec, stats = stage.step(net, batch, torch.Generator().manual_seed(7), "rec")
    # official (cm/train_util.py, separate_update with recon_discriminator): L_rec + 0.5 * lambda_rec * L_adv_rec
    rec = one_step(net, z, y, sigma_max=80.0).float()
    l_rec = gcfg.loss.w_rec * d(rec, real, [stage.backbone]).mean()
    l_adv_rec = hinge_g_loss(stage.disc.rec(rec, y)).mean()
    lam = adaptive_weight(l_rec, l_adv_rec, adaptive_weight_layer(net))
    want = l_rec + 0.5 * lam * l_adv_rec
    torch.testing.assert_close(loss_rec, want, rtol=1e-5, atol=1e-6)
    assert abs(want - l_rec) > 1e-3 * abs(l_rec) and "lambda_rec" in stats and "l_adv" not in stats
    # and the adversarial update: w_adv * L_adv with lambda = 1, no reconstruction term
    gen = torch.Generator().manual_seed(9)
    loss_adv, stats = stage.step(net, batch, gen, "adv")
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(9))
    fake = one_step(net, 80.0 * eps, y, sigma_max=80.0).float()
    torch.testing.assert_close(loss_adv, gcfg.loss.w_adv * hinge_g_loss(stage.disc.main(fake, y)).mean(),
                               rtol=1e-5, atol=1e-6)
    assert "l_adv_rec" not in stats and "l_rec" not in stats


# ---------------------------------------------------------------------------------------------
# 5. Micro-batches: the official per-GPU batch (global batch / world size) on 8 ranks.

def test_growth_presets_micro_batch_is_the_official_per_gpu_batch_on_8_ranks():
    got = {r: micro_batching(PRESETS[f"in64to{r}"].grow.train, 8) for r in (128, 256, 512)}
    assert got == {128: (32, 1), 256: (45, 1), 512: (64, 1)}
    assert micro_batching(PRESETS["in64to256"].grow.train, 1) == (45, 8)  # one GPU: the same 45, accumulated


# ---------------------------------------------------------------------------------------------
# The exact growth start (start = "skip").

def test_skip_start_is_exactly_the_upsampled_source_and_kept_head_is_not():
    src, cfg = _net()
    z, y = _z()
    with torch.no_grad():
        g = one_step(src, z, y, sigma_max=80.0)
        g1, cfg1 = grow_network(src, cfg, start="skip")
        g2, _ = grow_network(g1, cfg1, start="skip")
        up = F.interpolate(g, scale_factor=2, mode="nearest")
        assert torch.equal(one_step(g1, z, y, sigma_max=80.0), up)  # max |G_2x(z) - up(G(z))| = 0
        assert torch.equal(one_step(g2, z, y, sigma_max=80.0), F.interpolate(g, scale_factor=4, mode="nearest"))
        kept, _ = grow_network(src, cfg, start="kept-head")  # control: the paper's start is only near
        assert (one_step(kept, z, y, sigma_max=80.0) - up).abs().max() > 1e-3
        # the new head trains: its conv is zero but not frozen, and a nonzero one moves the output
        head = g1.grow_out[0][2]
        assert head.weight.abs().sum() == 0 and head.weight.requires_grad
        head.weight.normal_(0, 0.05)
        assert (one_step(g1, z, y, sigma_max=80.0) - up).abs().max() > 1e-3
    with pytest.raises(Exception, match="start=skip"):
        grow_network(g1, cfg1, start="kept-head")


# ---------------------------------------------------------------------------------------------
# Runs are their inputs' content, not their paths; drift --out writes rows only.

def test_a_replaced_teacher_at_the_same_path_is_not_taken_as_the_finished_run(data, tmp_path, capsys):
    teacher, pairs, out = tmp_path / "t.safetensors", tmp_path / "pairs", tmp_path / "g"
    save_tiny_teacher(teacher)
    make_pairs(str(teacher), str(data / "data.npz"), pairs, shard_size=16, batch=16, progress=False)
    assert _distill(teacher, pairs, out, "--set", "train.steps=1") == 0
    assert _distill(teacher, pairs, out, "--set", "train.steps=1") == 0  # same inputs: finished, nothing to do
    assert "finished" in capsys.readouterr().out
    before = (out / "G.safetensors").read_bytes()
    save_tiny_teacher(teacher, seed=5)  # retrained at the same path, pairs remade at the same path
    make_pairs(str(teacher), str(data / "data.npz"), tmp_path / "pairs2", shard_size=16, batch=16, progress=False)
    shutil.rmtree(pairs)
    shutil.copytree(tmp_path / "pairs2", pairs)
    capsys.readouterr()
    assert _distill(teacher, pairs, out, "--set", "train.steps=1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made from other inputs" in err[0] and "sha256" in err[0], err
    assert (out / "G.safetensors").read_bytes() == before
    # grow: a source G replaced at the same path is another run too
    assert _distill(teacher, pairs, tmp_path / "g2", "--set", "train.steps=1") == 0
    grow = ["grow", "--preset", "smoke", "--from", str(tmp_path / "g2" / "G.safetensors"), "--pairs", str(pairs),
            "--out", str(tmp_path / "g16"), "--set", "train.steps=1"]
    assert run_cli(main, grow) == 0
    capsys.readouterr()
    g2 = tmp_path / "g2" / "G.safetensors"
    net, meta = load_network(g2, kind="pagoda")
    with torch.no_grad():
        for q in net.parameters():
            q.add_(0.01)
    save_model(g2, net.state_dict(), meta)
    assert run_cli(main, grow) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made from other inputs (inputs.source_sha256" in err[0], err


@pytest.mark.parametrize("case", ["model_file", "malformed_rows"])
def test_drift_out_refuses_a_file_that_does_not_hold_rows(case, data, tmp_path, capsys):
    teacher, pairs = tmp_path / "t.safetensors", tmp_path / "pairs"
    save_tiny_teacher(teacher)
    make_pairs(str(teacher), str(data / "data.npz"), pairs, shard_size=16, batch=16, progress=False)
    assert _distill(teacher, pairs, tmp_path / "g", "--set", "train.steps=1") == 0
    g = tmp_path / "g" / "G.safetensors"
    assert run_cli(main, ["grow", "--preset", "smoke", "--from", str(g), "--pairs", str(pairs),
                          "--out", str(tmp_path / "g16"), "--set", "train.steps=1"]) == 0
    target = g if case == "model_file" else tmp_path / "rows.jsonl"
    if case == "malformed_rows":
        target.write_text('{"model": "a", "metric": "fid", "value": 1.0}\nnot json\n')
    before = target.read_bytes()
    capsys.readouterr()
    code = run_cli(main, ["drift", "--low", str(g), "--high", str(tmp_path / "g16" / "G.safetensors"),
                          "--seeds", "0-3", "--out", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--out" in err[0], err
    assert target.read_bytes() == before
    if case == "model_file":
        load_network(g, kind="pagoda")  # still loads
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"model": "a", "metric": "fid", "value": 1.0}) + "\n")
    assert run_cli(main, ["drift", "--low", str(g), "--high", str(tmp_path / "g16" / "G.safetensors"),
                          "--seeds", "0-3", "--out", str(good)]) == 0
    assert [json.loads(line)["metric"] for line in good.read_text().splitlines()] == ["fid", "drift_rms",
                                                                                      "drift_psnr_db", "frame_rms"]
