"""eval.sources: every input yields the same samples in the same order whatever the batch size or shard."""

import numpy as np
import pytest
import torch
from PIL import Image

from eval.sources import (
    FolderSource,
    GeneratorSource,
    NpzSource,
    TensorSource,
    open_source,
    parse_dataset_spec,
    save_samples,
)
from pagoda.errors import UserError
from pagoda.generator import Generator


def _all(source, batch, world=1):
    """Concatenate every rank's batches and put them back in index order."""
    parts = [b for r in range(world) for b in source.batches(batch, rank=r, world=world)]
    x = torch.cat([p[0] for p in parts])
    idx = torch.cat([p[2] for p in parts])
    y = None if parts[0][1] is None else torch.cat([p[1] for p in parts])[idx.argsort()]
    return x[idx.argsort()], y, idx.sort().values


class ToyGenerator(Generator):
    """A stand-in Generator: pixel values from a per-seed torch.Generator through a tiny nn.Module."""

    def __init__(self, resolution=8, num_classes=4, broken=False):
        self.resolution, self.num_classes, self.name, self.nfe = resolution, num_classes, "toy", 1
        self.net = self.network = torch.nn.Linear(3, 3)
        if broken:
            torch.nn.init.constant_(self.net.weight, float("nan"))

    def sample(self, seeds, labels=None, guidance=None):
        z = torch.stack([torch.randn(self.resolution, self.resolution, 3, generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds])
        x = self.net(z).permute(0, 3, 1, 2)
        if labels is not None:
            x = x + labels.view(-1, 1, 1, 1)
        return ((x.clamp(-1, 1) + 1) * 127.5).round().nan_to_num(0).to(torch.uint8)


def _write_pngs(folder, n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_generator_source_independent_of_batch_and_shards():
    src = GeneratorSource(ToyGenerator(), 11, seed=5, labels="balanced")
    x1, y1, i1 = _all(src, 3)
    x2, y2, i2 = _all(src, 8, world=2)
    assert torch.equal(i1, torch.arange(11)) and torch.equal(i1, i2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert sorted(torch.bincount(y1, minlength=4).tolist()) == [2, 3, 3, 3]  # equal counts (11 = 3 + 3 + 3 + 2)
    assert not torch.equal(y1, torch.arange(11) % 4)  # in a random order, not class-sorted runs
    rank1 = [b[2] for b in src.batches(4, rank=1, world=2)]
    assert torch.equal(torch.cat(rank1), torch.arange(1, 11, 2))  # sample i on rank i % world, in order
    seeded = GeneratorSource(ToyGenerator(), 11, seed=5, labels="seed")
    _, ys, _ = _all(seeded, 3)
    assert torch.equal(ys, _all(seeded, 5)[1]) and ys.min() >= 0 and ys.max() < 4


def test_generator_source_nan_named():
    src = GeneratorSource(ToyGenerator(broken=True), 4, seed=7)
    with pytest.raises(UserError, match="NaN/inf at seed 7"):
        next(src.batches(2, rank=0, world=1))


def test_folder_source(tmp_path):
    _write_pngs(tmp_path / "a" / "sub", 5)
    src = FolderSource(tmp_path / "a")
    x, y, idx = _all(src, 2)
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.uint8 and src.resolution == 8
    assert src.class_names == ["sub"] and torch.equal(y, torch.zeros(5, dtype=torch.int64))  # ImageNet layout
    assert FolderSource(tmp_path / "a" / "sub").num_classes == 0  # images directly inside: no labels
    assert torch.equal(x, _all(src, 5, world=3)[0])
    assert len(src.fingerprint()) == 64 and src.fingerprint() == FolderSource(tmp_path / "a").fingerprint()


@pytest.mark.parametrize("arr_1", [np.eye(3, dtype=np.int64), np.array([0, -1, 2]), np.array([0.0, 1.0, 2.0]),
                                   np.array([0, 1])])
def test_npz_bad_labels_refused(arr_1, tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8), arr_1=arr_1)
    with pytest.raises(UserError, match=r"arr_1 is .* expected 3 non-negative integer labels"):
        NpzSource(tmp_path / "s.npz")


def test_folder_errors(tmp_path):
    _write_pngs(tmp_path / "mixed", 3)
    Image.new("RGB", (9, 8)).save(tmp_path / "mixed" / "odd.png")
    with pytest.raises(UserError, match=r"odd\.png is 9x8"):
        FolderSource(tmp_path / "mixed")
    _write_pngs(tmp_path / "bad", 2)
    (tmp_path / "bad" / "zz.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=r"zz\.png"):
        FolderSource(tmp_path / "bad")
    good = tmp_path / "trunc"
    _write_pngs(good, 2, size=32)
    data = (good / "001.png").read_bytes()
    (good / "001.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut off
    with pytest.raises(UserError, match=r"001\.png"):
        _all(FolderSource(good), 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        FolderSource(tmp_path / "empty")


def test_npz_source_round_trip(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    save_samples(tmp_path / "s.npz", imgs, np.arange(6))
    src = NpzSource(tmp_path / "s.npz")
    x, y, _ = _all(src, 4)
    assert torch.equal(x, torch.from_numpy(imgs).permute(0, 3, 1, 2)) and torch.equal(y, torch.arange(6))
    np.savez(tmp_path / "noarr.npz", images=imgs)
    with pytest.raises(UserError, match=r"no arr_0 \(keys: images\)"):
        NpzSource(tmp_path / "noarr.npz")
    assert open_source(str(tmp_path / "s.npz"), num_samples=3).num_samples == 3
    with pytest.raises(UserError, match="fewer than the 7"):
        open_source(str(tmp_path / "s.npz"), num_samples=7)


def test_dataset_and_tensor_sources():
    src = open_source("photos:heldout:8", num_samples=10)
    x, y, _ = _all(src, 4)
    assert x.shape == (10, 3, 8, 8) and y.dtype == torch.int64 and src.num_classes == 16
    assert torch.equal(x, _all(src, 3, world=2)[0])
    assert parse_dataset_spec("photos") == ("photos", "train", None)
    t = TensorSource([x[:4], (x[4:], y[4:])])
    parts = list(t.batches(99, rank=1, world=2))
    assert torch.equal(torch.cat([p[2] for p in parts]), torch.arange(1, 10, 2)) and t.num_samples == 10
    with pytest.raises(UserError, match="uint8"):
        list(TensorSource(x.float()).batches(4, rank=0, world=1))


def test_open_source_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="resolution"):
        open_source("photos:train")


def test_generator_source_removes_its_hooks():
    gen = ToyGenerator()
    with GeneratorSource(gen, 4) as src:
        assert len(gen.net._forward_hooks) == 1
        next(src.batches(2, rank=0, world=1))
    assert len(gen.net._forward_hooks) == 0
