"""pagoda.data: ADM crop, conversions, folder / npz / photos data sets, and their one-line errors."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from pagoda.config import PHOTOS_NUM_CLASSES
from pagoda.data import (
    PHOTO_CLASSES,
    PHOTOS_CROPS,
    ImageFolderDataset,
    NpzDataset,
    PhotosDataset,
    _build_photos,
    _photos,
    adm_center_crop,
    build_dataset,
    load_image,
    photo_crop_boxes,
    to_model,
    to_uint8,
)
from pagoda.errors import UserError


def _save_rgb(path, seed=0, size=(20, 12)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


# ---- pixels ----------------------------------------------------------------------------------

def test_adm_center_crop_size_and_constant():
    arr = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    for r in (8, 16, 32, 64):
        assert adm_center_crop(Image.fromarray(arr), r).size == (r, r)
    const = Image.new("RGB", (97, 41), (77, 140, 3))
    out = np.asarray(adm_center_crop(const, 16))
    assert (out == np.array([77, 140, 3], dtype=np.uint8)).all()


def test_adm_center_crop_box_halving_by_hand():
    # 8 x 4 (W x H) to R = 2: one BOX halving (short side 4 >= 2R) gives 4 x 2 block means, the
    # bicubic step is the identity (short side already 2), then columns 1..2 are kept.
    blocks = np.array([[10, 50, 90, 130], [170, 210, 250, 30]], dtype=np.uint8)
    grey = np.kron(blocks, np.ones((2, 2), dtype=np.uint8))
    grey[0::2, 0::2] += 2  # block means stay integers: each 2x2 block is v+2, v, v, v-2
    grey[1::2, 1::2] -= 2
    img = Image.fromarray(np.stack([grey] * 3, axis=2))
    out = np.asarray(adm_center_crop(img, 2))[:, :, 0]
    np.testing.assert_array_equal(out, blocks[:, 1:3])


def test_to_model_to_uint8_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    m = to_model(x)
    assert m.dtype == torch.float32 and m.min() == -1 and m.max() == 1
    assert torch.equal(to_uint8(m), x)
    assert to_uint8(torch.tensor([-3.0, 2.0, 0.0])).tolist() == [0, 255, 128]  # clamp; 127.5 rounds to even


# ---- folders and flips -----------------------------------------------------------------------

def test_image_folder_labels_follow_sorted_folder_names(tmp_path):
    for name, n in (("zebra", 2), ("ant", 1), ("moth", 3)):
        (tmp_path / name / "deeper").mkdir(parents=True)
        for i in range(n):
            _save_rgb(tmp_path / name / ("deeper" if i else "") / f"{i}.png", seed=i)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, 8)
    assert ds.class_names == ["ant", "moth", "zebra"] and ds.num_classes == 3 and len(ds) == 6
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert ds.class_names[int(y)] == ds.files[i].relative_to(tmp_path).parts[0]


def test_flat_folder_and_flips(tmp_path):
    for i in range(3):
        _save_rgb(tmp_path / f"img{i}.jpg", seed=i, size=(30, 17))
    ds = ImageFolderDataset(tmp_path, 16, xflip=True)
    assert ds.num_classes == 0 and ds.class_names == [] and len(ds) == 6
    for i in range(3):
        x, y = ds[i]
        xf, yf = ds[i + 3]
        assert int(y) == int(yf) == 0
        assert torch.equal(xf, x.flip(-1)) and not torch.equal(xf, x)
        assert torch.equal(ds[i + 3][0], xf)  # deterministic per index
    assert torch.equal(ds[-1][0], ds[5][0])
    with pytest.raises(IndexError):
        ds[6]
    assert ds.fingerprint() == ImageFolderDataset(tmp_path, 16, xflip=True).fingerprint()
    assert ds.fingerprint() != ImageFolderDataset(tmp_path, 8, xflip=True).fingerprint()


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    labels = np.array([3, 0, 1, 3, 2])
    np.savez(tmp_path / "s.npz", images, labels)
    ds = build_dataset(str(tmp_path / "s.npz"), 16, xflip=True)
    assert isinstance(ds, NpzDataset) and len(ds) == 10 and ds.num_classes == 4
    for i in range(5):
        x, y = ds[i]
        assert torch.equal(x, torch.from_numpy(images[i]).permute(2, 0, 1)) and int(y) == labels[i]
        assert torch.equal(ds[i + 5][0], x.flip(-1))
    small = NpzDataset(tmp_path / "s.npz", 8)
    expect = np.array(adm_center_crop(Image.fromarray(images[2]), 8))
    assert torch.equal(small[2][0], torch.from_numpy(expect).permute(2, 0, 1))
    np.savez(tmp_path / "u.npz", images)
    assert NpzDataset(tmp_path / "u.npz", 16).num_classes == 0 and int(NpzDataset(tmp_path / "u.npz", 16)[4][1]) == 0


# ---- photos ----------------------------------------------------------------------------------

def test_photos_all_resolutions():
    assert len(PHOTO_CLASSES) == PHOTOS_NUM_CLASSES and list(PHOTO_CLASSES) == sorted(PHOTO_CLASSES)
    for r in (8, 16, 32, 64):
        for split in ("train", "heldout"):
            ds = build_dataset("photos", r, split=split)
            assert ds.num_classes == len(PHOTO_CLASSES) and ds.class_names == list(PHOTO_CLASSES)
            assert ds.images.shape == (PHOTOS_CROPS[split] * len(PHOTO_CLASSES), 3, r, r)
            assert ds.images.dtype == torch.uint8
            assert torch.equal(ds.labels.bincount(), torch.full((len(PHOTO_CLASSES),), PHOTOS_CROPS[split]))
    flipped = PhotosDataset(16, xflip=True)
    assert len(flipped) == 2 * len(PhotosDataset(16)) and torch.equal(flipped[len(flipped) // 2 + 7][0],
                                                                     flipped[7][0].flip(-1))


def test_photos_deterministic():
    first = PhotosDataset(16, "heldout")
    digest = hashlib.sha256(first.images.numpy().tobytes()).hexdigest()
    fp = first.fingerprint()
    _build_photos.cache_clear()
    again = PhotosDataset(16, "heldout")
    assert again.images is not first.images
    assert hashlib.sha256(again.images.numpy().tobytes()).hexdigest() == digest and again.fingerprint() == fp
    assert fp != PhotosDataset(16, "train").fingerprint() != PhotosDataset(32, "train").fingerprint()


def test_photos_train_and_heldout_disjoint():
    for c, arr in enumerate(_photos()[0]):
        h, w = arr.shape[:2]
        boxes = {s: photo_crop_boxes(h, w, s, np.random.default_rng([0, c, i]), 200)
                 for i, s in enumerate(("train", "heldout"))}
        assert boxes["train"][:, 2].max() <= boxes["heldout"][:, 0].min()  # columns never shared
        for b in boxes.values():
            assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
            assert (b[:, 2] - b[:, 0] == b[:, 3] - b[:, 1]).all()
    train = {bytes(x) for x in PhotosDataset(16, "train").images.numpy()}
    assert not any(bytes(x) in train for x in PhotosDataset(16, "heldout").images.numpy())


# ---- bad input -------------------------------------------------------------------------------

def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="nowhere.*does not exist"):
        ImageFolderDataset(tmp_path / "nowhere", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty holds no images.*\.png"):
        build_dataset(str(tmp_path / "empty"), 8)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="file.txt"):
        build_dataset(str(tmp_path / "file.txt"), 8)
    with pytest.raises(UserError, match="nothing_here"):
        build_dataset(str(tmp_path / "nothing_here"), 8)
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "dog").mkdir()
    _save_rgb(tmp_path / "classes" / "cat" / "a.png")
    with pytest.raises(UserError, match="class folder .*dog has no images"):
        ImageFolderDataset(tmp_path / "classes", 8)
    _save_rgb(tmp_path / "classes" / "dog" / "b.png")
    _save_rgb(tmp_path / "classes" / "stray.png")
    with pytest.raises(UserError, match="classes mixes images .stray.png"):
        ImageFolderDataset(tmp_path / "classes", 8)


def test_not_an_image_and_truncated(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a PNG")
    with pytest.raises(UserError, match="fake.png is not an image"):
        load_image(fake)
    with pytest.raises(UserError, match="fake.png"):
        ImageFolderDataset(tmp_path, 8)[0]
    for ext in ("png", "jpg"):
        good = tmp_path / f"good.{ext}"
        _save_rgb(good, size=(64, 64))
        data = good.read_bytes()
        cut = tmp_path / f"cut.{ext}"
        cut.write_bytes(data[: len(data) * 2 // 3])
        assert load_image(good).size == (64, 64)
        with pytest.raises(UserError, match=f"cut.{ext} is truncated or corrupt"):
            load_image(cut)


def test_alpha_and_greyscale_conversions(tmp_path):
    rgba = np.full((6, 6, 4), 255, dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert np.asarray(load_image(tmp_path / "opaque.png")).shape == (6, 6, 3)
    rgba[2, 3, 3] = 254
    Image.fromarray(rgba).save(tmp_path / "holes.png")
    with pytest.raises(UserError, match="holes.png has transparent pixels: flatten"):
        load_image(tmp_path / "holes.png")
    grey = np.arange(36, dtype=np.uint8).reshape(6, 6) * 7
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    out = np.asarray(load_image(tmp_path / "grey.png"))
    assert out.shape == (6, 6, 3) and all((out[:, :, c] == grey).all() for c in range(3))
    deep = (grey.astype(np.uint16) * 257)
    Image.fromarray(deep).save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "grey16.png"))[:, :, 1], grey)


def test_bad_npz(tmp_path):
    np.savez(tmp_path / "keys.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="keys.npz has no arr_0 .keys: images"):
        NpzDataset(tmp_path / "keys.npz", 8)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(UserError, match="junk.npz is not an npz archive"):
        NpzDataset(tmp_path / "junk.npz", 8)
    np.savez(tmp_path / "float.npz", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match="float.npz: arr_0 is float32"):
        NpzDataset(tmp_path / "float.npz", 8)
    with pytest.raises(UserError, match="absent.npz does not exist"):
        build_dataset(str(tmp_path / "absent.npz"), 8)


def test_native_side_refuses_upscaled_data(tmp_path):
    # Grown generators and super-resolution need images at least as large as their resolution.
    from PIL import Image

    from pagoda.data import check_native_resolution, native_side

    (tmp_path / "a").mkdir()
    Image.new("RGB", (32, 40), (10, 20, 30)).save(tmp_path / "a" / "big.png")
    Image.new("RGB", (12, 12), (10, 20, 30)).save(tmp_path / "a" / "small.png")
    folder = build_dataset(str(tmp_path), 16)
    assert native_side(folder) == (12, "all 2 of its 2 images")
    check_native_resolution(folder, "f", 12, "test")
    with pytest.raises(UserError, match="has images of 12 px .* smaller than the 16 px grown"):
        check_native_resolution(folder, "f", 16, "grown G")
    assert native_side(build_dataset("photos", 16)) is None  # crops of the full photographs, never upscaled
