"""data.py: every format written here in its real layout, batches, sharding, resume, and bad input."""
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# writers of the real formats


def py2_pickle(d):
    """A protocol-2 pickle as Python 2's cPickle wrote the official CIFAR batches: strings as
    BINSTRING (bytes on load), arrays through numpy.core.multiarray._reconstruct."""
    def s(b):
        return b"T" + struct.pack("<I", len(b)) + b
    def value(v):
        if isinstance(v, bytes):
            return s(v)
        if isinstance(v, list):
            return b"](" + b"".join(value(x) for x in v) + b"e"
        if isinstance(v, int):
            return b"J" + struct.pack("<i", v)
        dtype = b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        shape = b"(" + b"".join(value(n) for n in v.shape) + b"t"
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R(K\x01" + shape
                + dtype + b"\x89" + s(v.tobytes()) + b"tb")
    return b"\x80\x02}(" + b"".join(value(k) + value(v) for k, v in d.items()) + b"u."


def fake_cifar(n, classes, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, classes, n).tolist()


def write_cifar10_python(folder, n=6, py2=True):
    """cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta; returns {file: (data, labels)}."""
    os.makedirs(folder)
    dump = py2_pickle if py2 else (lambda d: pickle.dumps(d, protocol=2))
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = fake_cifar(n, 10, i)
        written[name] = (x, y)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(dump({b"batch_label": name.encode(), b"labels": y, b"data": x, b"filenames": [b"a.png"] * n}))
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        f.write(dump({b"label_names": [c.encode() for c in data.CIFAR10_CLASSES], b"num_vis": 3072}))
    return written


def write_image(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def rand_image(rng, h=8, w=8):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def toy_dataset(n=40, size=8, labeled=True):
    """Images whose pixels encode their index, labels = index: batches show which samples they hold."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return data.Dataset(images, torch.arange(n) if labeled else None, [str(i) for i in range(n)] if labeled else [])


def write_latents(path, n=12, shape=(4, 2, 2), labels=True, fmt="repcond-latents-v1"):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn((n, *shape), generator=g).half() for k in ("mean", "mean_flip")}
    t.update({k: torch.rand((n, *shape), generator=g).half() for k in ("std", "std_flip")})
    if labels:
        t["labels"] = torch.arange(n) % 3
    meta = {"format": fmt, "scaling_factor": "0.18215", "classes": json.dumps(["a", "b", "c"]),
            "image_size": "16", "source": "shapes"}
    save_file(t, str(path), metadata=meta)
    return t


def assert_user_error(fn, *needles):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg

# -----------------------------------------------------------------------------
# shapes


def test_shapes_deterministic_balanced_and_split():
    train, test = data.load("shapes"), data.load("shapes", "test")
    assert train.images.shape == (5000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (1000, 3, 32, 32)
    assert train.classes == test.classes and train.num_classes >= 10
    assert torch.bincount(train.labels).tolist() == [500] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    x, y = data._shapes.__wrapped__("test", 32)  # drawn again, bypassing the cache
    assert np.array_equal(x, test.images.permute(0, 2, 3, 1).numpy()) and np.array_equal(y, test.labels.numpy())
    assert not torch.equal(train.images[:1000], test.images)  # different seeds per split
    big = data.load("shapes", "test", image_size=64)
    assert big.images.shape == (1000, 3, 64, 64) and torch.equal(big.labels, test.labels)


def test_shapes_not_readable_from_pixels_or_mean_colour():
    train, test = data.load("shapes"), data.load("shapes", "test")
    feats = lambda ds: torch.cat([data.to_float(ds.images).flatten(1), torch.ones(len(ds), 1)], 1).double()
    def ridge(a, at, lam):  # least squares onto one-hot labels, a cheap linear classifier
        w = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=a.dtype), a.T @ F.one_hot(train.labels, 10).double())
        return ((at @ w).argmax(1) == test.labels).float().mean().item()
    pixel_acc = ridge(feats(train), feats(test), 300.0)
    assert 0.15 < pixel_acc < 0.45, pixel_acc  # documented at about 25%
    # mean colour, with squares and products so a quadratic boundary is allowed too
    mc = lambda ds: data.to_float(ds.images).mean((2, 3)).double()
    poly = lambda m: torch.cat([m, m ** 2, m[:, [0, 0, 1]] * m[:, [1, 2, 2]], torch.ones(len(m), 1, dtype=m.dtype)], 1)
    colour_acc = ridge(poly(mc(train)), poly(mc(test)), 1e-3)
    assert colour_acc < 0.17, colour_acc  # chance is 0.10


def test_digits_are_scikit_learns_with_a_fixed_stratified_split(monkeypatch):
    """The built-in real set: the same pixels and labels as sklearn.datasets.load_digits (the reference reader of the
    file), split 1,442 / 355 with every class in both, RGB, 32 px by default."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    ref = sklearn_datasets.load_digits()
    train, test = data.load("digits", image_size=8), data.load("digits", "test", image_size=8)
    assert (len(train), len(test)) == (1442, 355) and train.classes == [str(k) for k in range(10)]
    assert torch.bincount(test.labels).min() >= 34 and torch.bincount(train.labels).min() >= 140
    ours = torch.cat([train.images, test.images])  # (1797, 3, 8, 8) uint8
    assert torch.equal(ours[:, 0], ours[:, 2])
    ref_images = torch.from_numpy(np.round(ref.images * 255 / 16).astype(np.uint8))
    order = torch.from_numpy(np.concatenate(_digits_split_indices(ref.target)))  # train, then test, in file order
    assert torch.equal(ours[:, 0], ref_images[order]) and torch.equal(torch.cat([train.labels, test.labels]),
                                                                      torch.from_numpy(ref.target)[order])
    assert data.load("digits").images.shape == (1442, 3, 32, 32)
    monkeypatch.setattr(data, "DIGITS_FILE", ("not_a_package_xyz", "digits.csv.gz"))
    data._digits_raw.cache_clear()
    try:
        assert_user_error(lambda: data.load("digits"), "pip install scikit-learn")
    finally:
        data._digits_raw.cache_clear()


def _digits_split_indices(labels):
    """-> (train indices, test indices): every fifth image of each class (in file order) is test."""
    test = np.concatenate([np.nonzero(labels == k)[0][4::5] for k in range(10)])
    return np.setdiff1d(np.arange(len(labels)), test), np.sort(test)

# -----------------------------------------------------------------------------
# CIFAR


def test_cifar10_python_folder_py2_pickles(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar10_python(str(folder), py2=True)
    ds = data.load(str(folder))
    x = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)])
    y = sum((written[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert ds.images.shape == (30, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert np.array_equal(ds.images.numpy(), x.reshape(-1, 3, 32, 32)) and ds.labels.tolist() == y
    assert ds.classes == data.CIFAR10_CLASSES and ds.labels.dtype == torch.int64
    test = data.load(str(folder), "test")
    assert np.array_equal(test.images.flatten(1).numpy(), written["test_batch"][0])
    monkeypatch.setenv("DATA_DIR", str(tmp_path))  # the name finds the official folder in $DATA_DIR
    assert torch.equal(data.load("cifar10", "test").images, test.images)


def test_cifar10_python_tarball_and_resize(tmp_path):
    folder = tmp_path / "src" / "cifar-10-batches-py"
    written = write_cifar10_python(str(folder), py2=False)
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    ds = data.load(str(tar_path), "test")
    assert np.array_equal(ds.images.flatten(1).numpy(), written["test_batch"][0])
    assert ds.labels.tolist() == written["test_batch"][1] and ds.classes == data.CIFAR10_CLASSES
    big = data.load(str(tar_path), "test", image_size=48)
    assert big.images.shape == (6, 3, 48, 48) and torch.equal(big.labels, ds.labels)


def test_cifar100_python_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    os.makedirs(folder)
    x, y = fake_cifar(7, 100, 1)
    coarse = [v // 5 for v in y]
    for name in ("train", "test"):
        (folder / name).write_bytes(py2_pickle({b"data": x, b"fine_labels": y, b"coarse_labels": coarse}))
    names = [f"class{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(py2_pickle({b"fine_label_names": names, b"coarse_label_names": names[:20]}))
    ds = data.load(str(folder), "test")
    assert ds.labels.tolist() == y and ds.num_classes == 100 and ds.classes[3] == "class3"
    assert np.array_equal(ds.images.flatten(1).numpy(), x)


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_binary(tmp_path, hundred):
    folder = tmp_path / ("cifar-100-binary" if hundred else "cifar-10-batches-bin")
    os.makedirs(folder)
    x, y = fake_cifar(5, 100 if hundred else 10, 2)
    head = [[v // 5, v] if hundred else [v] for v in y]
    raw = b"".join(bytes(h) + row.tobytes() for h, row in zip(head, x))
    names = ["train.bin", "test.bin"] if hundred else [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        (folder / name).write_bytes(raw)
    meta = "fine_label_names.txt" if hundred else "batches.meta.txt"
    (folder / meta).write_text("\n".join(f"c{i}" for i in range(100 if hundred else 10)) + "\n\n")
    ds = data.load(str(folder), "test")
    assert ds.labels.tolist() == y and np.array_equal(ds.images.flatten(1).numpy(), x)
    assert ds.num_classes == (100 if hundred else 10)
    assert len(data.load(str(folder), "train")) == (5 if hundred else 25)

# -----------------------------------------------------------------------------
# Tiny-ImageNet, image folders, latents


def test_tinyimagenet_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    os.makedirs(root)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\nn03\tother\n")
    train = {}
    for w in wnids:
        for k in range(3):  # the first image of a class as PNG (exact pixels), the others as JPEG
            train[(w, k)] = rand_image(rng, 64, 64)
            write_image(str(root / "train" / w / "images" / f"{w}_{k}.{'png' if k == 0 else 'JPEG'}"), train[(w, k)])
    val = [rand_image(rng, 64, 64) for _ in range(3)]
    for k, img in enumerate(val):
        write_image(str(root / "val" / "images" / f"val_{k}.png"), img)
    (root / "val" / "val_annotations.txt").write_text("".join(f"val_{k}.png\t{wnids[k % 2]}\t0\t0\t63\t63\n" for k in range(3)))
    ds = data.load(str(root))
    assert ds.classes == ["n01", "n02"] and ds.images.shape == (6, 3, 64, 64)  # wnids: they name ImageNet classes
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(ds.images[0].permute(1, 2, 0).numpy(), train[("n01", 0)])
    v = data.load(str(root), "val", image_size=32)
    assert v.images.shape == (3, 3, 32, 32) and v.labels.tolist() == [1, 0, 1]


def test_image_folder_labeled_flat_and_split(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {}
    for c in ("dog", "cat"):
        for k in range(2):
            imgs[(c, k)] = rand_image(rng)
            write_image(str(tmp_path / "lab" / c / f"{k}.png"), imgs[(c, k)])
    (tmp_path / "lab" / "notes.txt").write_text("not an image")
    ds = data.load(str(tmp_path / "lab"))
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1, 1]
    assert np.array_equal(ds.images[2].permute(1, 2, 0).numpy(), imgs[("dog", 0)])
    # a flat folder is unlabeled; RGBA and grey images become RGB
    write_image(str(tmp_path / "flat" / "a.png"), imgs[("cat", 0)])
    Image.fromarray(imgs[("cat", 1)][..., 0]).save(str(tmp_path / "flat" / "b.png"))
    flat = data.load(str(tmp_path / "flat"))
    assert flat.labels is None and flat.classes == [] and flat.images.shape == (2, 3, 8, 8)
    # train/ and test/ sub-folders make a split-aware folder
    for split in ("train", "test"):
        write_image(str(tmp_path / "split" / split / "x" / "0.png"), imgs[("dog", split == "test")])
    assert np.array_equal(data.load(str(tmp_path / "split"), "test").images[0].permute(1, 2, 0).numpy(), imgs[("dog", 1)])


def test_mixed_sizes_need_image_size(tmp_path):
    rng = np.random.default_rng(0)
    write_image(str(tmp_path / "a.png"), rand_image(rng, 20, 30))
    write_image(str(tmp_path / "b.png"), rand_image(rng, 40, 40))
    assert_user_error(lambda: data.load(str(tmp_path)), "b.png", "--image-size")
    assert data.load(str(tmp_path), image_size=16).images.shape == (2, 3, 16, 16)


def test_center_crop_adm():
    # 200x100: halved once (BOX) to 100x50, then bicubic to 64x32, then the center 32x32
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, 50:150] = 255  # the center square is white, the sides black
    out = data.center_crop(Image.fromarray(arr), 32)
    assert out.size == (32, 32)
    assert np.asarray(out)[:, 2:-2].min() >= 250  # only the center survived
    assert data.center_crop(Image.fromarray(arr), 7).size == (7, 7)


def test_latents_file_loader_and_iterate(tmp_path):
    path = tmp_path / "lat.safetensors"
    t = write_latents(path)
    ds = data.load(str(path))
    assert ds.images is None and ds.sample_shape == (4, 2, 2) and len(ds) == 12
    assert ds.latents["mean"].dtype == torch.float32 and torch.equal(ds.latents["std"], t["std"].float())
    assert ds.classes == ["a", "b", "c"] and ds.scaling_factor == pytest.approx(0.18215)
    assert torch.equal(ds.labels, t["labels"])
    # iterate: the posterior mean, scaled, in order
    xs, ys, idx = zip(*data.iterate(ds, 5, "cpu"))
    assert torch.allclose(torch.cat(xs), t["mean"].float() * 0.18215) and torch.cat(idx).tolist() == list(range(12))
    # Loader: z = (mean + std * eps) * scale, the flipped arrays for a random half when augmenting
    ds.latents["std"].zero_(), ds.latents["std_flip"].zero_()
    ds.labels = torch.arange(12)  # labels that name the sample
    for augment in (False, True):
        x, y = data.Loader(ds, 12, "cpu", augment=augment).batch(0)
        m, mf = ds.latents["mean"][y] * 0.18215, ds.latents["mean_flip"][y] * 0.18215
        plain = torch.isclose(x, m).flatten(1).all(1)
        flipped = torch.isclose(x, mf).flatten(1).all(1)
        assert (plain | flipped).all() and flipped.any() == augment
    unlabeled = tmp_path / "u.safetensors"
    write_latents(unlabeled, labels=False)
    assert data.load(str(unlabeled)).labels is None

# -----------------------------------------------------------------------------
# Loader, iterate, stream


def test_loader_determinism_resume_and_epochs():
    ds = toy_dataset(40)
    a, b = data.Loader(ds, 8, "cpu", seed=3), data.Loader(ds, 8, "cpu", seed=3)
    assert a.steps_per_epoch == 5
    for step in (0, 7, 3):  # b jumps straight to a step, as a resumed run does
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(data.Loader(ds, 8, "cpu", seed=4).batch(0)[1], a.batch(0)[1])
    # one epoch holds each sample once; the next epoch is another order
    epoch0 = torch.cat([a.batch(s)[1] for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(40))
    assert not torch.equal(epoch0, torch.cat([a.batch(s)[1] for s in range(5, 10)]))


def test_loader_augmentation():
    ds = toy_dataset(40)
    plain, y = data.Loader(ds, 40, "cpu", augment=False).batch(0)
    assert torch.equal(plain, data.to_float(ds.images[y]))
    x, y2 = data.Loader(ds, 40, "cpu").batch(0)
    assert torch.equal(y, y2) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and not torch.equal(x, plain)
    # flip only: each image is the original or its mirror, and both occur
    x, _ = data.Loader(ds, 40, "cpu", crop_padding=0).batch(0)
    same = (x == plain).flatten(1).all(1)
    mirrored = (x == plain.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_crop_flip_matches_reflect_pad_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), generator=g, dtype=torch.uint8)
    shift = torch.randint(0, 9, (16, 2), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    out = data.crop_flip(x, shift, flip, 4)
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    for i in range(16):
        ref = padded[i, :, shift[i, 0]:shift[i, 0] + 8, shift[i, 1]:shift[i, 1] + 8]
        assert torch.equal(out[i].float(), ref.flip(2) if flip[i] else ref)


@pytest.mark.parametrize("latents", [False, True])
def test_rank_shards_make_the_single_process_batch(tmp_path, latents):
    if latents:
        write_latents(tmp_path / "l.safetensors", n=24)
        ds = data.load(str(tmp_path / "l.safetensors"))
    else:
        ds = toy_dataset(24)
    for step in (0, 4):
        x, y = data.Loader(ds, 8, "cpu", seed=1).batch(step)
        parts = [data.Loader(ds, 8, "cpu", seed=1, rank=r, world_size=2).batch(step) for r in range(2)]
        assert parts[0][0].shape[0] == 4
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_iterate_in_order_and_sharded():
    ds = toy_dataset(11, labeled=False)
    batches = list(data.iterate(ds, 4, "cpu"))
    assert [len(b[2]) for b in batches] == [4, 4, 3] and batches[0][1] is None
    assert torch.equal(torch.cat([b[0] for b in batches]), data.to_float(ds.images))
    r1 = torch.cat([b[2] for b in data.iterate(ds, 4, "cpu", rank=1, world_size=2)])
    assert r1.tolist() == [1, 3, 5, 7, 9]


def test_labeled_subset_balanced_and_deterministic():
    ds = data.load("shapes", "test")
    sub = data.labeled_subset(ds, labels_per_class=7, seed=1)
    assert torch.bincount(sub.labels).tolist() == [7] * 10
    assert torch.equal(sub.images, data.labeled_subset(ds, labels_per_class=7, seed=1).images)
    assert not torch.equal(sub.images, data.labeled_subset(ds, labels_per_class=7, seed=2).images)
    assert torch.bincount(data.labeled_subset(ds, fraction=0.1).labels).tolist() == [10] * 10
    assert_user_error(lambda: data.labeled_subset(ds, 5, 0.1), "exactly one")
    assert_user_error(lambda: data.labeled_subset(ds, labels_per_class=101), "101", "circle")


def test_to_float_to_uint8_round_trip():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    f = data.to_float(u)
    assert f.min() == -1 and f.max() == 1 and torch.equal(data.to_uint8(f), u)
    assert data.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_stream_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for k in range(5):
            write_image(str(tmp_path / "f" / c / f"{k}.png"), rand_image(rng, 12, 10))
    ds = data.load(str(tmp_path / "f"), image_size=8)
    # one ordered pass equals load
    xs, ys = zip(*data.stream(str(tmp_path / "f"), 4, image_size=8, workers=0, shuffle=False))
    assert torch.equal(torch.cat(xs), ds.images) and torch.equal(torch.cat(ys), ds.labels)
    # shuffled: endless, ranks split each global batch, workers decode
    it = data.stream(str(tmp_path / "f"), 4, image_size=8, workers=2, seed=5)
    full = [next(it) for _ in range(3)]  # 2 batches an epoch, then a new epoch
    assert all(x.shape == (4, 3, 8, 8) and x.dtype == torch.uint8 for x, _ in full)
    r0 = data.stream(str(tmp_path / "f"), 4, image_size=8, workers=0, seed=5, rank=0, world_size=2)
    r1 = data.stream(str(tmp_path / "f"), 4, image_size=8, workers=0, seed=5, rank=1, world_size=2)
    for x, y in full:
        (x0, y0), (x1, y1) = next(r0), next(r1)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # a corrupt file is named, not a worker traceback
    (tmp_path / "f" / "a" / "9.png").write_bytes(b"garbage")
    assert_user_error(lambda: list(data.stream(str(tmp_path / "f"), 4, image_size=8, workers=1, shuffle=False)), "9.png")

# -----------------------------------------------------------------------------
# bad input: one clear line naming the file


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_inputs(tmp_path, monkeypatch):
    assert_user_error(lambda: data.load(str(tmp_path / "missing")), "missing", "no such file")
    os.makedirs(tmp_path / "empty")
    assert_user_error(lambda: data.load(str(tmp_path / "empty")), "empty", "no images")
    assert_user_error(lambda: data.load("shapes", "validation"), "--split")
    (tmp_path / "notes.txt").write_text("hello")
    assert_user_error(lambda: data.load(str(tmp_path / "notes.txt")), "notes.txt", "unknown format")
    # a corrupt image among good ones
    rng = np.random.default_rng(0)
    write_image(str(tmp_path / "imgs" / "c" / "good.png"), rand_image(rng))
    (tmp_path / "imgs" / "c" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert_user_error(lambda: data.load(str(tmp_path / "imgs")), "bad.png", "cannot read image")
    # a class folder without images
    os.makedirs(tmp_path / "imgs2" / "c1")
    write_image(str(tmp_path / "imgs2" / "c0" / "0.png"), rand_image(rng))
    assert_user_error(lambda: data.load(str(tmp_path / "imgs2")), "c1", "no")
    # images beside sub-folders: neither a class layout nor a flat folder
    write_image(str(tmp_path / "mixed" / "a.png"), rand_image(rng))
    write_image(str(tmp_path / "mixed" / "sub" / "b.png"), rand_image(rng))
    assert_user_error(lambda: data.load(str(tmp_path / "mixed")), "mixed", "sub-folders")
    assert_user_error(lambda: data.stream("shapes", 4), "stream")
    # a CIFAR batch whose labels do not match its rows
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(str(folder), n=4, py2=False)
    x, y = fake_cifar(4, 10, 0)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": x, b"labels": y[:3]}, protocol=2))
    assert_user_error(lambda: data.load(str(folder), "test"), "test_batch", "3 labels for 4 images")
    (folder / "test_batch").write_bytes(b"\x80\x02}(truncated")
    assert_user_error(lambda: data.load(str(folder), "test"), "test_batch")
    os.remove(folder / "data_batch_3")
    assert_user_error(lambda: data.load(str(folder)), "data_batch_3")
    # a truncated binary batch, a tarball without CIFAR inside
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "test_batch.bin").write_bytes(b"\x01" * 3000)
    assert_user_error(lambda: data.load(str(tmp_path / "bin"), "test"), "test_batch.bin", "3073")
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    assert_user_error(lambda: data.load(str(tmp_path / "other.tar.gz")), "other.tar.gz", "no CIFAR")
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tarball")
    assert_user_error(lambda: data.load(str(tmp_path / "broken.tar.gz")), "broken.tar.gz")
    # latents: wrong format tag, not safetensors at all
    write_latents(tmp_path / "w.safetensors", fmt="something-else")
    assert_user_error(lambda: data.load(str(tmp_path / "w.safetensors")), "w.safetensors", "repcond-latents-v1")
    (tmp_path / "z.safetensors").write_bytes(b"\x00" * 20)
    assert_user_error(lambda: data.load(str(tmp_path / "z.safetensors")), "z.safetensors")
    # flags
    assert_user_error(lambda: data.Loader(toy_dataset(8), 16, "cpu"), "--batch-size 16")
    assert_user_error(lambda: data.Loader(toy_dataset(8), 6, "cpu", world_size=4), "--batch-size 6")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "nothing"))
    assert_user_error(lambda: data.load("cifar100"), "cifar-100-python.tar.gz", "nothing")


def test_pickle_that_runs_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(str(folder), n=2)
    marker = tmp_path / "pwned"
    RunsCode.marker = str(marker)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": RunsCode(), b"labels": [0]}, protocol=2))
    assert_user_error(lambda: data.load(str(folder), "test"), "test_batch", "system")
    assert not marker.exists()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [RunsCode()]}, protocol=4))
    assert_user_error(lambda: data.load(str(folder)), "batches.meta", "refusing")
    assert not marker.exists()


def test_cli(tmp_path, capsys):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--data", str(tmp_path / "missing")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    grid = tmp_path / "grid.png"  # the rest in-process: same code, without another torch import
    data.main(data.parse_args(["--data", "shapes", "--split", "test", "--grid", str(grid)]))
    out = capsys.readouterr().out
    assert "1000 images" in out and "10 classes" in out and Image.open(grid).size == (8 * 34 + 2, 10 * 34 + 2)

# -----------------------------------------------------------------------------
# Files as people have them: every mode comes out as the picture a viewer shows; hidden files are not data;
# class names, not folder order, define labels across splits


def decode(path):
    return data._decode(str(path))


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65,520
    Image.fromarray(ramp).save(tmp_path / "r16.png")
    assert Image.open(tmp_path / "r16.png").mode == "I;16"
    x = decode(tmp_path / "r16.png")
    assert x.shape == (8, 8, 3) and abs(x.mean() - 127.5) < 0.1  # was 251: nearly white
    assert np.array_equal(x[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    f = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)  # float greyscale in [0, 1]
    Image.fromarray(f, "F").save(tmp_path / "f.tif")
    assert decode(tmp_path / "f.tif")[..., 0].tolist() == [[0, 128], [255, 64]]


def test_transparency_is_composited_onto_white_whatever_colour_hides_there(tmp_path):
    rng = np.random.default_rng(0)
    rgba = np.concatenate([rng.integers(0, 256, (4, 4, 3)), np.zeros((4, 4, 1))], -1).astype(np.uint8)
    rgba[2:, :, 3] = 255  # bottom half opaque, top half fully transparent with random hidden colours
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = decode(tmp_path / "a.png")
    assert (x[:2] == 255).all() and np.array_equal(x[2:], rgba[2:, :, :3])
    half = rgba.copy()
    half[..., 3] = 128  # half transparent: the usual "over" blend with the white background
    Image.fromarray(half, "RGBA").save(tmp_path / "h.png")
    want = np.rint((half[..., :3].astype(float) * 128 + 255 * 127) / 255)
    assert np.abs(decode(tmp_path / "h.png").astype(float) - want).max() <= 1
    p = Image.new("P", (2, 2))  # a palette with a transparent index (tRNS), and greyscale + alpha
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putdata([0, 1, 0, 1])
    p.save(tmp_path / "p.png", transparency=0)
    assert decode(tmp_path / "p.png").reshape(-1, 3).tolist() == [[255, 255, 255], [0, 255, 0]] * 2
    la = np.stack([np.full((2, 2), 100, np.uint8), np.array([[0, 255], [0, 255]], np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert decode(tmp_path / "la.png")[..., 0].tolist() == [[255, 100], [255, 100]]


def test_exif_orientation_cmyk_lab_and_profiles_give_what_a_viewer_shows(tmp_path):
    upright = np.zeros((2, 3, 3), np.uint8)
    upright[0, 0] = 255  # a white top-left pixel in an otherwise black 3-wide, 2-high picture
    stored = np.rot90(upright, 1).copy()  # a camera stores the pixels rotated and tags orientation 6 (rotate 90 cw)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rot.png", exif=exif)
    assert np.array_equal(decode(tmp_path / "rot.png"), upright)
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    assert decode(tmp_path / "cmyk.tif")[0, 0].tolist() == [255, 0, 0]  # no ink but magenta + yellow: red
    Image.new("LAB", (2, 2), (128, 128, 128)).save(tmp_path / "lab.tif")  # L* 50, a* = b* = 0: mid grey
    assert np.abs(decode(tmp_path / "lab.tif")[0, 0].astype(int) - 119).max() <= 1
    from PIL import ImageCms
    rgb = np.random.default_rng(1).integers(0, 256, (4, 4, 3)).astype(np.uint8)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(rgb).save(tmp_path / "tagged.png", icc_profile=srgb)
    assert np.array_equal(decode(tmp_path / "tagged.png"), rgb)  # an sRGB profile changes nothing


def test_hidden_files_and_archive_leftovers_are_not_data(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for k in range(4):
            write_image(str(tmp_path / "train" / c / f"{k}.png"), rand_image(rng))
    write_image(str(tmp_path / "train" / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png"), rand_image(rng))
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # resource-fork sidecar
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    write_image(str(tmp_path / "train" / "__MACOSX" / "cat" / "._1.png"), rand_image(rng))
    write_image(str(tmp_path / "train" / ".hidden_class" / "x.png"), rand_image(rng))
    ds = data.load(str(tmp_path), "train")
    assert ds.classes == ["cat", "dog"] and len(ds) == 8 and ds.labels.tolist() == [0] * 4 + [1] * 4


def test_test_split_labels_index_the_training_classes_by_name(tmp_path):
    rng = np.random.default_rng(0)
    for split, classes in (("train", ["cat", "dog", "fox"]), ("test", ["cat", "fox"])):
        for c in classes:
            for k in range(2):
                write_image(str(tmp_path / split / c / f"{k}.png"), rand_image(rng))
    test = data.load(str(tmp_path), "test")
    assert test.classes == ["cat", "dog", "fox"] and test.labels.tolist() == [0, 0, 2, 2]  # fox is 2, as in train
    write_image(str(tmp_path / "test" / "owl" / "0.png"), rand_image(rng))
    assert_user_error(lambda: data.load(str(tmp_path), "test"), "['owl']", "not classes of", "train")
