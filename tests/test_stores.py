"""Sample stores (eval.stores): zip, tar, webdataset shards and EDM2's nested seed folders read the same pixels,
hence the same features, as the flat folder of the same files; each refuses bad input in one line."""

import io
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from eval.pipeline import extract
from eval.sources import FolderSource, open_source
from pagoda.errors import UserError

N = 12


@pytest.fixture(scope="module")
def flat(tmp_path_factory, real_images, write_pngs):
    """A flat folder of N PNGs named as EDM2 names seeds (000000.png ...)."""
    return write_pngs(tmp_path_factory.mktemp("flat"), real_images[:N])


def png_bytes(flat, i: int) -> bytes:
    return (flat / f"{i:06d}.png").read_bytes()


def all_images(source) -> torch.Tensor:
    return torch.cat([x for x, _, _ in source.batches(5, rank=0, world=1)])


def test_every_store_reads_the_flat_folders_pixels(flat, tmp_path, real_images):
    ref = all_images(open_source(str(flat)))
    assert torch.equal(ref, real_images[:N])
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as z:  # nested folders inside the zip
        for i in range(N):
            z.writestr(f"samples/{i // 5:06d}/{i:06d}.png", png_bytes(flat, i))
    with tarfile.open(tmp_path / "s.tar", "w") as t:
        for i in range(N):
            t.add(flat / f"{i:06d}.png", arcname=f"{i:06d}.png")
    for k in range(2):  # webdataset: two shards, KEY.png + KEY.cls
        with tarfile.open(tmp_path / f"shard-{k:03d}.tar", "w") as t:
            for i in range(k * N // 2, (k + 1) * N // 2):
                for name, data in ((f"{i:06d}.png", png_bytes(flat, i)), (f"{i:06d}.cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    edm2 = tmp_path / "edm2"  # EDM2's generate_images.py layout, with 1000 seeds per folder
    for i in range(N):
        seed = i * 400
        (edm2 / f"{seed - seed % 1000:06d}").mkdir(parents=True, exist_ok=True)
        shutil.copy(flat / f"{i:06d}.png", edm2 / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png")
    for spec in ("s.zip", "s.tar", "shard-{000..001}.tar", "shard-*.tar", "edm2"):
        source = open_source(str(tmp_path / spec))
        assert source.num_samples == N and source.resolution == 64, spec
        assert torch.equal(all_images(source), ref), spec
    shards = open_source(str(tmp_path / "shard-{000..001}.tar"))
    assert shards.labels.tolist() == [i % 3 for i in range(N)] and shards.num_classes == 3
    nested = FolderSource(edm2)
    assert nested.num_classes == 0 and nested.layout == "edm2-seed-folders"  # not 5 classes of seeds


def test_zip_features_bit_equal_to_flat_folder(flat, tmp_path, inception_weights):
    from eval.extractors import get_extractor

    with zipfile.ZipFile(tmp_path / "s.zip", "w") as z:
        for i in range(N):
            z.writestr(f"{i:06d}.png", png_bytes(flat, i))
    ex = get_extractor("inception", weights_dir=inception_weights.parent)
    a = extract(open_source(str(flat)), {"inception": ex}, batch=4)["inception"]
    b = extract(open_source(str(tmp_path / "s.zip")), {"inception": ex}, batch=4)["inception"]
    assert np.array_equal(a.stats.mean(), b.stats.mean()) and np.array_equal(a.stats.cov(), b.stats.cov())


def test_bad_stores_fail_in_one_line(flat, tmp_path):
    def refused(spec, match):
        with pytest.raises(UserError, match=match) as e:
            open_source(str(spec))
        assert "\n" not in str(e.value)

    with zipfile.ZipFile(tmp_path / "sizes.zip", "w") as z:
        z.writestr("a.png", png_bytes(flat, 0))
        buf = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buf, "PNG")
        z.writestr("b.png", buf.getvalue())
    refused(tmp_path / "sizes.zip", r"sizes.zip:b.png is 32x32 but .*a.png is 64x64")
    with zipfile.ZipFile(tmp_path / "corrupt.zip", "w") as z:
        z.writestr("a.png", png_bytes(flat, 0))
        z.writestr("b.png", png_bytes(flat, 1)[:200])
    with pytest.raises(UserError, match=r"corrupt.zip:b.png is truncated or corrupt"):
        all_images(open_source(str(tmp_path / "corrupt.zip")))
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as z:
        z.writestr("notes.txt", "no images")
    refused(tmp_path / "empty.zip", "holds no images")
    (tmp_path / "s.tar.gz").write_bytes(b"\x1f\x8b")
    refused(tmp_path / "s.tar.gz", "compressed tar")
    (tmp_path / "fake.zip").write_bytes(b"not an archive")
    refused(tmp_path / "fake.zip", "neither a zip nor a tar")
    refused(tmp_path / "missing-{000..002}.tar", r"missing-000.tar does not exist")
    with tarfile.open(tmp_path / "half.tar", "w") as t:
        for name, data in (("0.png", png_bytes(flat, 0)), ("0.cls", b"1"), ("1.png", png_bytes(flat, 1))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    refused(tmp_path / "half.tar", r"1.png has no .cls label")
