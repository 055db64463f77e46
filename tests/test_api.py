"""`from eval import evaluate` (eval.api): every kind of sample set gives the CLI's rows, bad input is one line,
and the README's Python examples run as written."""

import re
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import Evaluator, evaluate
from eval.fid import main as fid_main
from eval.ref import main as ref_main
from pagoda.checkpoint import model_meta, save_model
from pagoda.config import PRESETS
from pagoda.errors import UserError, run_cli
from pagoda.networks.unet import UNet
from pagoda.rows import read_rows

README = Path(__file__).resolve().parents[1] / "README.md"
RES = 16


@pytest.fixture(scope="module")
def weights(domain_weights):
    return domain_weights


@pytest.fixture(scope="module")
def ref(tmp_path_factory, weights):
    path = tmp_path_factory.mktemp("ref") / "photos-heldout-16px-domain.npz"
    assert run_cli(ref_main, ["photos:heldout:16", "-o", str(path), "--extractor", "domain", "--weights-dir",
                              str(weights), "--store-features", "300", "--no-cache"]) == 0
    return path


@pytest.fixture(scope="module")
def images():
    """300 photos:train crops at 16 px, uint8 [300, 3, 16, 16]."""
    from eval.sources import open_source
    source = open_source("photos:train:16", num_samples=300)
    return torch.cat([x for x, _, _ in source.batches(100, rank=0, world=1)])


def test_every_kind_of_samples_gives_the_clis_numbers(weights, ref, images, tmp_path):
    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=images.permute(0, 2, 3, 1).numpy())
    assert run_cli(fid_main, ["--images", str(npz), "--ref", str(ref), "--extractor", "domain", "--weights-dir",
                              str(weights), "-o", str(tmp_path / "cli.jsonl")]) == 0
    (cli,) = read_rows(tmp_path / "cli.jsonl")
    ev = Evaluator(str(ref), "fid", extractor="domain", weights_dir=weights, cache=False)
    for samples, kw in ((str(npz), {}), (images, {}), (images.permute(0, 2, 3, 1).numpy(), {}),
                        (images.split(64), {}), (list(images.split(64)), {}), (((x, None) for x in images.split(7)),
                                                                              dict(num_samples=300))):
        (row,) = ev.measure(ev.source(samples, **kw))
        assert row["value"] == pytest.approx(cli["value"], rel=1e-9) and row["num_samples"] == 300
    table = images.clone()

    def model(seeds, labels):  # a "model" that returns stored images: seed s -> image s
        assert labels is not None and len(labels) == len(seeds)
        return table[seeds]

    (row,) = evaluate(model, str(ref), num_samples=300, num_classes=16, extractor="domain", weights_dir=weights,
                      name="lookup")
    assert row["value"] == pytest.approx(cli["value"], rel=1e-9) and row["model"] == "lookup"
    assert row["method"] == "callable" and row["seed"] == 0 and row["extra"]["labels"] == "seed"


def test_bad_input_is_one_line(weights, ref, images):
    ev = Evaluator(str(ref), "fid", extractor="domain", weights_dir=weights, cache=False)
    cases = [
        (lambda: ev.source(iter(images.split(10))), "num_samples"),
        (lambda: ev.measure(ev.source(iter(images.split(10)), num_samples=400)), "fewer than the num_samples=400"),
        (lambda: ev.source(images.float()), "not uint8"),
        (lambda: ev.source(np.zeros((4, 3, 16, 16), np.uint8)), r"uint8 \[N, H, W, 3\]"),
        (lambda: ev.source(lambda s, y: torch.zeros(len(s), 16, 16), num_classes=0), "must return uint8 images"),
        (lambda: ev.source(42), "cannot measure a int"),
        (lambda: Evaluator(str(ref), "fid,nope", extractor="domain", weights_dir=weights), "nope"),
        (lambda: Evaluator(str(ref), "is", extractor="dinov2", weights_dir=weights), "logits"),
        (lambda: Evaluator("imagenet65", "fid", weights_dir=weights), "neither a file nor a named reference"),
        (lambda: Evaluator(str(ref), "fid", extractor="foo"), "unknown extractor 'foo'"),
        (lambda: ev.source(images, num_samples=0), "num_samples=0"),
        (lambda: Evaluator(str(ref), "fid", extractor={"bogus": "x"}), "roles bogus"),
        (lambda: Evaluator(str(ref), "fid", estimator="kid_subset=0"), "must be >= 1"),
    ]
    for call, match in cases:
        with pytest.raises(UserError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def readme_python() -> str:
    """The README's one ```python block (its 'From Python' examples)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has one Python example block"
    return blocks[0]


def test_readme_examples_run(weights, ref, images, tmp_path, monkeypatch):
    """The README's examples, verbatim, in a folder holding what they name (the demo's reference and teacher
    file, a zip of samples); the domain net from the weights cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PAGODA_WEIGHTS", str(weights))
    refs = tmp_path / "runs" / "demo" / "refs"
    refs.mkdir(parents=True)
    (refs / ref.name).write_bytes(ref.read_bytes())
    with zipfile.ZipFile("samples.zip", "w") as z:
        for i, img in enumerate(images[:200]):
            png = tmp_path / "x.png"
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(png)
            z.write(png, f"{i:06d}.png")
    cfg = PRESETS["photos"].teacher
    torch.manual_seed(0)
    net = UNet(**{k: getattr(cfg.network, k) for k in cfg.network.__dataclass_fields__})
    (tmp_path / "runs" / "demo" / "teacher").mkdir()
    save_model("runs/demo/teacher/teacher.safetensors", net.state_dict(),
               model_meta(kind="teacher", stage="teacher", config=replace(cfg), step=0, ema_rate=0.999))
    scope = {}
    exec(compile(readme_python(), "README.md", "exec"), scope)  # noqa: S102 (the README's own examples)
    assert scope["rows"][0]["metric"] == "fid" and scope["rows"][1]["metric"] == "is"
    assert scope["rows"][0]["num_samples"] == 500 and scope["rows"][0]["value"] > 0


def test_extractor_spec_grammar():
    import argparse

    from eval.run import extractor_spec

    assert extractor_spec("domain") == ({"main": "domain"}, None)
    assert extractor_spec("inception,dinov2=dinov2-vitb14,resize=edm2-torch") == (
        {"main": "inception", "dinov2": "dinov2-vitb14"}, "edm2-torch")
    for bad in (",", "", "domain,foo=bar", "domain,resize=", "domain,dinov2=a,dinov2=b", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            extractor_spec(bad)
