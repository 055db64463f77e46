"""pagoda.networks.domain: shapes, a short training that beats chance, safetensors round trip, errors."""

import json

import pytest
import safetensors.torch
import torch

from pagoda.data import PHOTO_CLASSES, PhotosDataset
from pagoda.errors import UserError, run_cli
from pagoda.networks.domain import (
    DomainNet,
    heldout_accuracy,
    load_domain_net,
    main,
    save_domain_net,
    train_domain_net,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """Two epochs at 16 px with a narrow net: seconds, but clearly past chance."""
    return train_domain_net(epochs=2, seed=0, width=16, resolutions=(16,))


def test_shapes_any_resolution():
    net = DomainNet(5, width=16, input_resolution=32).eval()
    for h, w in ((8, 8), (16, 16), (64, 64), (40, 24)):
        x = torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8)
        f, logits = net(x)
        assert f.shape == (3, 64) and f.dtype == torch.float32 and logits.shape == (3, 5)
    maps = net.feature_maps(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert [m.shape[-1] for m in maps] == [16, 8, 4] and [m.shape[1] for m in maps] == [16, 32, 64]
    with pytest.raises(TypeError, match="uint8"):
        net(torch.rand(1, 3, 8, 8))


def test_batch_independent_features():
    net = DomainNet(4, width=16).eval()
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        full = net(x)[0]
        parts = torch.cat([net(x[:1])[0], net(x[1:])[0]])
    torch.testing.assert_close(full, parts, rtol=1e-5, atol=1e-5)


def test_short_training_beats_chance(trained):
    model, report = trained
    chance = 1 / len(PHOTO_CLASSES)
    assert report["chance"] == chance and set(report["heldout_accuracy"]) == {"8", "16", "32", "64"}
    assert report["heldout_accuracy"]["16"] > 3 * chance
    assert heldout_accuracy(model, 16) == report["heldout_accuracy"]["16"]
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_training_is_deterministic():
    again, _ = train_domain_net(epochs=1, seed=0, width=16, resolutions=(8,), batch=256)
    other, _ = train_domain_net(epochs=1, seed=0, width=16, resolutions=(8,), batch=256)
    x = PhotosDataset(8, "heldout").images[:32]
    assert torch.equal(again(x)[1], other(x)[1])


def test_save_load_identical(trained, tmp_path):
    model, report = trained
    path = tmp_path / "sub" / "domain.safetensors"
    save_domain_net(model, path, report)
    assert [p.name for p in path.parent.iterdir()] == ["domain.safetensors"]  # no temp file left
    loaded = load_domain_net(path)
    x = PhotosDataset(32, "heldout").images[::7]
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            assert torch.equal(a, b)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["pagoda"])
    assert meta["kind"] == "domain-classifier" and meta["num_classes"] == len(PHOTO_CLASSES)
    assert meta["width"] == 16 and meta["input_resolution"] == 32 and meta["class_names"] == list(PHOTO_CLASSES)
    assert meta["heldout_accuracy"] == report["heldout_accuracy"]


def test_bad_files(trained, tmp_path):
    model, report = trained
    other = tmp_path / "teacher.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(other), metadata={"pagoda": json.dumps({"kind": "teacher"})})
    with pytest.raises(UserError, match="teacher.safetensors holds kind='teacher'"):
        load_domain_net(other)
    good = tmp_path / "good.safetensors"
    save_domain_net(model, good, report)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(UserError, match="cut.safetensors"):
        load_domain_net(cut)
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(UserError, match="text.safetensors is not a readable safetensors"):
        load_domain_net(tmp_path / "text.safetensors")
    save_domain_net(DomainNet(3, width=8), tmp_path / "three.safetensors", {})
    assert load_domain_net(tmp_path / "three.safetensors").class_names == ["0", "1", "2"]
    with pytest.raises(UserError, match="absent.safetensors does not exist"):
        load_domain_net(tmp_path / "absent.safetensors")


def test_cli_rejects_bad_epochs(tmp_path, capsys):
    assert run_cli(main, ["-o", str(tmp_path / "d.safetensors"), "--epochs", "0"]) == 2
    assert "--epochs 0 must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_default_training(tmp_path):
    """The shipped setting: all four resolutions, default epochs (minutes on a shared 2-core CPU)."""
    out = tmp_path / "domain.safetensors"
    assert main(["-o", str(out), "--threads", "1"]) == 0
    model = load_domain_net(out)
    for r in (8, 16, 32, 64):
        assert heldout_accuracy(model, r) > 0.5
