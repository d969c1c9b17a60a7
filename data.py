"""
Data sets as uint8 tensors, training batches on the device, and sharding by rank.

Every script gets its data from here: `load` returns images (uint8, N x C x H x W), labels and class
names for the built-in `shapes` set, CIFAR-10/100 (python or binary version, tarball or folder),
Tiny-ImageNet, any image folder, or a latents file written by `vae.py encode`; dense sets carry per-pixel
`masks` (CelebAMask-HQ face parsing, `shapes-seg`) or `keypoints` (WFLW landmarks, `shapes-landmarks`). `Loader` keeps the
data on the device and makes deterministic, augmented, rank-sharded batches; `iterate` is the
evaluation pass; `stream` decodes folders too large for memory with DataLoader workers.

    import data
    ds = data.load("shapes")                          # built in: 10 classes, 5000 train / 1000 test
    ds = data.load("digits")                          # real, ships with scikit-learn: 1442 train / 355 test
    ds = data.load("cifar10", split="test")           # finds the official files in $DATA_DIR
    ds = data.load("photos/", image_size=64)          # class sub-folders, ADM center crop to 64
    ds = data.load("CelebAMask-HQ/", split="val")     # images + masks (N, 512, 512), the official partition
    ds = data.load("WFLW/", split="test")             # 256 x 256 face crops + keypoints (N, 98, 2)
    loader = data.Loader(ds, batch_size=256, device="cuda", seed=0)
    x, y = loader.batch(step)                         # float32 in [-1, 1], a pure function of (seed, step)

    python data.py --data cifar10 --split test --grid preview.png
"""
import argparse
import dataclasses
import functools
import io
import itertools
import json
import os
import pickle
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cli import HelpFormatter, UserError  # UserError: every module's one-line error (data.UserError)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Load a data set, print a summary and optionally save a preview grid.",
                                formatter_class=HelpFormatter)
    p.add_argument("--data", default="shapes", help="shapes | digits | shapes-seg | shapes-landmarks | cifar10 | cifar100 | tinyimagenet | "
                                                    "celebamask-hq | wflw | a path")
    p.add_argument("--split", default="train", choices=["train", "test", "val"])
    p.add_argument("--image-size", type=int, default=None, help="resize (ADM center crop) to this many pixels")
    p.add_argument("--grid", default=None, help="write a preview grid PNG here")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help, or a line argparse refuses, answered before the imports below (torch: about 2 s)

import numpy as np
import torch
from PIL import Image


def _one_line(e):
    return " ".join(str(e).split())


@dataclass
class Dataset:
    images: torch.Tensor | None      # uint8 (N, C, H, W); None for a latents file
    labels: torch.Tensor | None      # int64 (N,), or None for unlabeled data
    classes: list[str]               # class names ([] when unlabeled)
    latents: dict | None = None      # latents file only: mean, std, mean_flip, std_flip, float32 (N, c, h, w)
    scaling_factor: float | None = None
    # dense targets (segmentation and landmark sets; see "dense data sets" below)
    masks: torch.Tensor | None = None        # uint8 (N, H, W): class of each pixel, IGNORE_INDEX (255) = not scored
    keypoints: torch.Tensor | None = None    # float32 (N, K, 2): (x, y) in pixels, pixel centres at integers
    flip_pairs: tuple = ()                   # keypoint index pairs that a horizontal flip swaps (left <-> right)
    norm_pair: tuple | None = None           # the two keypoints whose distance normalises the NME (WFLW: 60, 72)
    attributes: torch.Tensor | None = None   # uint8 (N, A) per-sample flags (WFLW: pose, expression, ...)
    attribute_names: tuple = ()

    def __len__(self):
        return len(self.images) if self.images is not None else len(self.latents["mean"])

    @property
    def sample_shape(self):
        return tuple((self.images if self.images is not None else self.latents["mean"]).shape[1:])

    @property
    def num_classes(self):
        return len(self.classes)

    def _map(self, fn):
        opt = lambda t: fn(t) if t is not None else None
        return dataclasses.replace(self, images=opt(self.images), labels=opt(self.labels), classes=list(self.classes),
                                   latents={k: fn(v) for k, v in self.latents.items()} if self.latents is not None else None,
                                   masks=opt(self.masks), keypoints=opt(self.keypoints), attributes=opt(self.attributes))

    @property
    def task(self):
        """'seg' (masks), 'landmarks' (keypoints) or 'classes' (labels or none)."""
        return "seg" if self.masks is not None else "landmarks" if self.keypoints is not None else "classes"

    def subset(self, idx):
        idx = torch.as_tensor(idx)
        return self._map(lambda t: t[idx.to(t.device)])

    def to(self, device):
        return self._map(lambda t: t.to(device))


def to_float(images):
    """uint8 (N, C, H, W) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(x):
    """float in [-1, 1] -> uint8, clamped; inverts to_float exactly."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

# -----------------------------------------------------------------------------
# image files: decoding, ADM center crop, a thread pool for many files

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def center_crop(img, size):
    """ADM's center_crop_arr: halve with BOX while that keeps the short side >= size (cheap and
    alias-free), BICUBIC to make the short side exactly `size`, then crop the center square."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white, the page most viewers draw them on
_HIGH_BIT = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}  # full scale of each mode


def to_rgb(img):
    """A PIL image -> the 8-bit RGB picture a viewer shows (PIL.Image, mode "RGB").

    - EXIF orientation is applied (phones store rotated pixels plus a tag);
    - 16-bit and 32-bit integer greyscale (PNG/TIFF modes I;16*, I) is scaled from 0..65535 to 0..255, not clipped;
      float greyscale (F) from 0..1 when its maximum is at most 1, else it is taken as 0..255;
    - an embedded ICC profile other than sRGB (Adobe RGB, Display P3, CMYK press profiles) is converted to sRGB;
      LAB pixels are converted through the CIE LAB profile;
    - transparency (an alpha channel, a palette's or a colour key's tRNS) is composited onto BACKGROUND, white, so
      every fully transparent pixel is the same whatever colour the file hides there;
    - every other mode (1, L, P, CMYK, YCbCr, HSV, ...) goes through Pillow's own conversion."""
    from PIL import ImageCms, ImageOps
    img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_BIT or img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        full = _HIGH_BIT.get(img.mode) or (1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0)
        img = Image.fromarray(np.clip(np.rint(np.nan_to_num(a) * (255.0 / full)), 0, 255).astype(np.uint8), "L")
    if img.mode == "LAB":
        lab = ImageCms.createProfile("LAB")
        img = ImageCms.applyTransform(img, ImageCms.buildTransform(lab, ImageCms.createProfile("sRGB"), "LAB", "RGB"))
    if img.mode in ("P", "1", "L", "RGB") and "transparency" in img.info or img.mode in ("LA", "La", "PA", "RGBa", "P"):
        img = img.convert("RGBA")
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "RGBA", "CMYK"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            if not ImageCms.getProfileDescription(src).strip().startswith("sRGB"):  # sRGB is already what we want
                img = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGBA" if img.mode == "RGBA" else "RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a profile LittleCMS cannot read is ignored, as viewers do
    if img.mode == "RGBA":
        out = Image.new("RGB", img.size, BACKGROUND)
        out.paste(img, mask=img.getchannel("A"))
        return out
    return img.convert("RGB")


def open_rgb(path):
    """One image file -> an RGB PIL image, as a viewer shows it (to_rgb); a file that does not decode in full is one
    UserError line naming it."""
    try:
        with Image.open(path) as img:
            img.load()  # the full decode: truncated files fail here
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {_one_line(e)})") from None


def _decode(path, image_size=None):
    """One image file -> uint8 (H, W, 3), as a viewer shows it (to_rgb), ADM-center-cropped to image_size."""
    img = open_rgb(path)
    if image_size and img.size != (image_size, image_size):
        img = center_crop(img, image_size)
    return np.array(img)  # a writable copy, as torch.from_numpy wants


def _pmap(fn, items):
    """map() over a thread pool, in order; PIL releases the GIL while decoding and resizing."""
    pool = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1))
    try:
        yield from pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, don't decode the rest


def _read_images(files, image_size=None):
    """Image files -> uint8 (N, 3, H, W); all files must have one size unless image_size is given."""
    out = None
    for i, arr in enumerate(_pmap(functools.partial(_decode, image_size=image_size), files)):
        if out is None:
            out = np.empty((len(files), *arr.shape), np.uint8)
        elif arr.shape != out.shape[1:]:
            raise UserError(f"{files[i]}: image is {arr.shape[1]}x{arr.shape[0]} but {files[0]} is "
                            f"{out.shape[2]}x{out.shape[1]}; use --image-size to bring all images to one size")
        out[i] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _resize_all(images, size):
    """uint8 (N, C, H, W) -> (N, C, size, size) with the ADM center crop."""
    if images.shape[-2:] == (size, size):
        return images
    arrays = images.permute(0, 2, 3, 1).numpy()
    out = list(_pmap(lambda a: np.asarray(center_crop(Image.fromarray(a), size)), arrays))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()

# -----------------------------------------------------------------------------
# `digits`: a small real data set that ships in a package (no download): scikit-learn's 1,797 handwritten digits
# (the UCI optdigits test set: 8 x 8 pixels, 17 grey levels, 10 classes), read from the package's own file as
# sklearn.datasets.load_digits reads it, without importing scikit-learn. The package has no train/test split; ours is
# fixed and stratified: every fifth image of each class, in file order, is test (355), the rest train (1,442). Grey ink
# on black, as the file holds it, replicated to RGB; default 32 x 32 (as shapes; the ADM resize, bicubic),
# --image-size 8 is the file's resolution.

DIGITS_FILE = ("sklearn", "datasets", "data", "digits.csv.gz")


def _digits_file():
    import importlib.util
    spec = importlib.util.find_spec(DIGITS_FILE[0])
    path = os.path.join(os.path.dirname(spec.origin), *DIGITS_FILE[1:]) if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise UserError("--data digits: the 8 x 8 digits ship with scikit-learn, which is not installed "
                        "(pip install scikit-learn)")
    return path


@functools.lru_cache(maxsize=1)
def _digits_raw():
    """-> uint8 (1797, 8, 8) in [0, 255] (the file's 0..16 scaled by 255 / 16, rounded), int64 labels (1797,)."""
    table = np.loadtxt(_digits_file(), delimiter=",", dtype=np.float64)  # (1797, 65): 64 pixels (row-major) + label
    pixels = np.round(table[:, :64] * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8)
    return pixels, table[:, 64].astype(np.int64)


def _load_digits(split, image_size=None):
    pixels, labels = _digits_raw()
    rank = np.zeros(len(labels), np.int64)  # each image's index among its class's images, in file order
    for k in range(10):
        rank[labels == k] = np.arange((labels == k).sum())
    keep = (rank % 5 == 4) == (split == "test")
    images = torch.from_numpy(np.repeat(pixels[keep][:, None], 3, axis=1))  # (N, 3, 8, 8)
    images = _resize_all(images, image_size or 32)
    return Dataset(images.contiguous(), torch.from_numpy(labels[keep]), [str(k) for k in range(10)])


# -----------------------------------------------------------------------------
# CIFAR-10/100: the official python pickles (through a restricted unpickler) or the binary version

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_FILES = {  # variant: (train files, test files, class-names file)
    "cifar10-python": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"),
    "cifar100-python": (["train"], ["test"], "meta"),
    "cifar10-binary": ([f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"], "batches.meta.txt"),
    "cifar100-binary": (["train.bin"], ["test.bin"], "fine_label_names.txt"),
}


def _latin1(s, encoding="latin1"):
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1"); allow only that
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return s.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the globals that numpy arrays and plain containers need, so a pickle that
    tries to call anything else (os.system via __reduce__, ...) is refused, not run."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype")}
    ALLOWED |= {("builtins", n) for n in ("list", "dict", "tuple", "set", "frozenset", "bytearray",
                                           "bytes", "str", "int", "float", "bool", "complex")}

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if (module, name) not in self.ALLOWED:
            raise UserError(f"{self.where}: refusing to unpickle {module}.{name} (a CIFAR batch holds only numpy "
                            f"arrays and lists; this file is not one)")
        return super().find_class(module, name)


def _unpickle(raw, where):
    unpickler = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes")  # the official files come from Python 2
    unpickler.where = where
    try:
        obj = unpickler.load()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{where}: not a readable CIFAR pickle ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_python(raw, where):
    d = _unpickle(raw, where)
    x = d.get("data")
    y = d.get("labels", d.get("fine_labels"))  # cifar-10 / cifar-100 (fine, 100 classes)
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072):
        raise UserError(f"{where}: 'data' is not a uint8 array of N x 3072 pixels")
    if y is None:
        raise UserError(f"{where}: no 'labels' or 'fine_labels' entry")
    try:
        y = np.asarray(y, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"{where}: the labels are not a list of integers") from None
    if len(y) != len(x):
        raise UserError(f"{where}: {len(y)} labels for {len(x)} images")
    return x.reshape(-1, 3, 32, 32), y


def _cifar_binary(raw, where, fine):
    rec = 3074 if fine else 3073  # [coarse label,] label, 3072 pixels
    if len(raw) == 0 or len(raw) % rec:
        raise UserError(f"{where}: {len(raw)} bytes is not a whole number of {rec}-byte CIFAR records")
    a = np.frombuffer(raw, np.uint8).reshape(-1, rec)
    return a[:, rec - 3072:].reshape(-1, 3, 32, 32), a[:, rec - 3073].astype(np.int64)


def _cifar_classes(variant, raw, where):
    if raw is None:
        return CIFAR10_CLASSES if variant.startswith("cifar10-") else [str(i) for i in range(100)]
    if variant.endswith("binary"):
        return [s.strip() for s in raw.decode().splitlines() if s.strip()]
    names = _unpickle(raw, where).get("label_names" if variant == "cifar10-python" else "fine_label_names")
    if not isinstance(names, list):
        raise UserError(f"{where}: no list of class names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _cifar_variant(names):
    for variant, (train, test, meta) in CIFAR_FILES.items():
        if set(train + test + [meta]) & set(names):
            return variant
    return None


def _load_cifar(path, variant, split, read):
    """read(name) -> bytes or None for a file of the tarball/folder `path`."""
    train, test, meta = CIFAR_FILES[variant]
    xs, ys = [], []
    for name in train if split == "train" else test:
        raw = read(name)
        if raw is None:
            raise UserError(f"{path}: missing {name} (a {variant.replace('-', ' ')} set needs {', '.join(train + test)})")
        where = os.path.join(path, name)
        x, y = _cifar_binary(raw, where, "100" in variant) if variant.endswith("binary") else _cifar_python(raw, where)
        xs.append(x), ys.append(y)
    classes = _cifar_classes(variant, read(meta), os.path.join(path, meta))
    y = np.concatenate(ys)
    if y.min() < 0 or y.max() >= len(classes):
        raise UserError(f"{path}: labels range over {y.min()}..{y.max()} but there are {len(classes)} classes")
    return Dataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(y), classes)


def _load_cifar_folder(path, split):
    files = [n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))]

    def read(name):
        if name in files:
            with open(os.path.join(path, name), "rb") as f:
                return f.read()
    return _load_cifar(path, _cifar_variant(files), split, read)


def _load_tarball(path, split):
    try:
        with tarfile.open(path) as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            variant = _cifar_variant(members)
            if variant is None:
                raise UserError(f"{path}: no CIFAR batches in this tarball (expected the official "
                                f"cifar-10-python.tar.gz, cifar-100-python.tar.gz or a binary version)")
            return _load_cifar(path, variant, split, lambda n: tar.extractfile(members[n]).read() if n in members else None)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read tarball ({_one_line(e)})") from None

# -----------------------------------------------------------------------------
# Tiny-ImageNet and image folders: lists of files, decoded all at once (load) or lazily (stream)


ARCHIVE_LEFTOVERS = {"__MACOSX", "$RECYCLE.BIN", "System Volume Information", "@eaDir", "lost+found"}


def is_hidden(name):
    """Not data: hidden files and folders (.DS_Store, .ipynb_checkpoints/, AppleDouble ._x.png sidecars, ...) and the
    folders operating systems and NAS boxes leave in archives and on drives (__MACOSX/, @eaDir/, ...)."""
    return name.startswith(".") or name.startswith("~$") or name in ARCHIVE_LEFTOVERS


def _images_in(folder):
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))  # pruned in place: os.walk does not enter them
        files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTS) and not is_hidden(n)]
    return files


def _class_files(folders, labels_of=None):
    """One folder of images (searched recursively) per class -> files, labels (labels_of[i], default i)."""
    files, labels = [], []
    for i, folder in enumerate(folders):
        found = _images_in(folder)
        if not found:
            raise UserError(f"{folder}: class folder has no PNG/JPEG images")
        files += found
        labels += [i if labels_of is None else labels_of[i]] * len(found)
    return files, labels


def _class_dirs(root):
    return sorted(e for e in os.listdir(root) if not is_hidden(e) and os.path.isdir(os.path.join(root, e)))


def _tinyimagenet_files(root, split):
    def rows(name):
        with open(os.path.join(root, name)) as f:
            return [line.rstrip("\n").split("\t") for line in f if line.strip()]
    if os.path.exists(os.path.join(root, "wnids.txt")):
        wnids = sorted(r[0].strip() for r in rows("wnids.txt"))
    else:
        wnids = _class_dirs(os.path.join(root, "train"))
    classes = wnids  # the wnids themselves ("n01443537"): they name the class for ImageNet models (imagenet_index)
    if split == "train":
        return (*_class_files([os.path.join(root, "train", w) for w in wnids]), classes)
    ann = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.exists(ann):
        raise UserError(f"{ann}: missing (Tiny-ImageNet's val split needs it)")
    index, files, labels = {w: i for i, w in enumerate(wnids)}, [], []
    for n, row in enumerate(rows(ann), 1):
        if len(row) < 2 or row[1] not in index:
            raise UserError(f"{ann}:{n}: expected 'filename<TAB>wnid' with a wnid of wnids.txt, got {row[:2]}")
        files.append(os.path.join(root, "val", "images", row[0]))
        labels.append(index[row[1]])
    return files, labels, classes


def _folder_files(root, split):
    """Class sub-folders (labels: sorted folder names) or a flat folder of images (unlabeled).
    A folder with train/ and test/ (or val/) sub-folders is split-aware; else it is one split. The test split's
    labels index the TRAINING split's class list, by name: test/ may hold fewer classes, never another one."""
    top = root
    named = [n for n in (["train"] if split == "train" else ["test", "val"]) if os.path.isdir(os.path.join(root, n))]
    if named and os.path.isdir(os.path.join(root, "train")):
        root = os.path.join(root, named[0])
    elif split != "train":
        print(f"warning: {root} has no test/ or val/ sub-folder; its images serve as the {split} split too",
              file=sys.stderr)
    entries = sorted(e for e in os.listdir(root) if not is_hidden(e))
    flat = [os.path.join(root, e) for e in entries if e.lower().endswith(IMAGE_EXTS)]
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    if flat and classes:
        raise UserError(f"{root}: has both images and sub-folders (expected class sub-folders, or a flat folder of images)")
    if flat:
        return flat, None, []
    if not classes:
        raise UserError(f"{root}: no images (expected class sub-folders of PNG/JPEG files, or a flat folder of them)")
    train_classes = classes
    if root != top and split != "train":
        train_classes = _class_dirs(os.path.join(top, "train"))
        unknown = [c for c in classes if c not in train_classes]
        if unknown:
            raise UserError(f"{root}: class folders {unknown} are not classes of {os.path.join(top, 'train')} "
                            f"(its classes: {train_classes[:10]}{' ...' if len(train_classes) > 10 else ''})")
    index = {c: i for i, c in enumerate(train_classes)}
    return (*_class_files([os.path.join(root, c) for c in classes], [index[c] for c in classes]), train_classes)


def _list_files(path, split):
    """(files, labels or None, classes) for a folder-based set, or None for anything else."""
    if not os.path.isdir(path) or _cifar_variant([n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))]):
        return None
    if os.path.exists(os.path.join(path, "wnids.txt")) or os.path.exists(os.path.join(path, "val", "val_annotations.txt")):
        return _tinyimagenet_files(path, split)
    return _folder_files(path, split)

# -----------------------------------------------------------------------------
# latents written by `vae.py encode`: one safetensors file per split


def _load_latents(path, image_size=None, split=None, flag="--test-data"):
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta, t = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
    if meta.get("format") != "repcond-latents-v1":
        raise UserError(f"{path}: not a latents file (metadata format is {meta.get('format')!r}, "
                        f"expected 'repcond-latents-v1' as written by `vae.py encode`)")
    held = {"val": "test"}.get(meta.get("split"), meta.get("split"))
    if split is not None and held is not None and held != split:  # one file, one split: never train and test on it both
        raise UserError(f"{path}: a latents file holds one split, this one the {held} split; the {split} split is another "
                        f"file (vae.py encode --split train test writes both): pass it with {flag}")
    keys = ("mean", "std", "mean_flip", "std_flip")
    missing = [k for k in keys if k not in t]
    if missing:
        raise UserError(f"{path}: missing tensors {', '.join(missing)}")
    latents = {k: t[k].float() for k in keys}
    if any(v.shape != latents["mean"].shape or v.ndim != 4 for v in latents.values()):
        raise UserError(f"{path}: mean, std, mean_flip, std_flip must have one (N, c, h, w) shape")
    labels = t["labels"].long() if "labels" in t else None
    if labels is not None and labels.shape != (len(latents["mean"]),):
        raise UserError(f"{path}: {len(labels)} labels for {len(latents['mean'])} latents")
    if image_size and meta.get("image_size") and int(meta["image_size"]) != image_size:
        raise UserError(f"{path}: latents of {meta['image_size']}px images, but --image-size is {image_size}")
    try:
        classes, scale = json.loads(meta.get("classes", "[]")), float(meta["scaling_factor"])
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: bad metadata 'classes' or 'scaling_factor' ({_one_line(e)})") from None
    return Dataset(None, labels, classes if labels is not None else [], latents, scale)

# -----------------------------------------------------------------------------
# shapes: the built-in data set
#
# 10 classes, each a shape or a texture with random position, size, rotation and colours: 5000
# train images (500 a class), 1000 test, 32x32, drawn with numpy (2x supersampled) in about a second
# for both splits. The class is kept out of the colour statistics: each image has a random mean
# colour, and the background is set so that the image mean equals it exactly whatever the shape's
# area (the foreground is lighter in every channel by a random contrast). Textures fill the image
# with a random period, phase and angle. A linear classifier on pixels can then only use the blurred
# average silhouette of each class. Measured (train on train, accuracy on test, chance 10%):
#   logistic regression on raw pixels (Adam, 300 full-batch steps, best of 6 lr/wd)   27.0%
#   ridge least squares on raw pixels                                                25.7%
#   mean colour (MLP on the 3 channel means)                                          8.8%
#   small CNN (4 conv layers 32-64-128-128 + BN, AdamW, flips; 5 / 10 epochs)   98.0% / 99.9%
# (the CNN costs about 25 CPU-seconds an epoch: 5 epochs are about a minute on 2 idle cores).

SHAPES_CLASSES = ["circle", "square", "triangle", "star", "plus", "ring", "crescent", "stripes", "checkerboard", "dots"]
SHAPES_SPLITS = {"train": (5000, 1), "test": (1000, 2)}  # split: (images, seed)


def _shape_mask(name, px, py, radius, period):
    """Inside-test of one class; (px, py): pixel offsets in the shape's rotated frame."""
    u, v = px / radius, py / radius  # shapes fit in the unit disk
    rho = np.hypot(u, v)
    if name == "circle":
        return rho < 0.8
    if name == "square":
        return np.maximum(abs(u), abs(v)) < 0.62
    if name == "triangle":
        return functools.reduce(np.logical_and, [u * np.cos(a) + v * np.sin(a) < 0.42
                                                 for a in np.pi / 2 + np.arange(3) * 2 * np.pi / 3])
    if name == "star":  # radius goes 0.38 -> 0.98 -> 0.38 around each of 5 points
        t = (np.arctan2(v, u) * (5 / (2 * np.pi))) % 1.0
        return rho < 0.38 + 1.2 * abs(t - 0.5)
    if name == "plus":
        return ((abs(u) < 0.26) & (abs(v) < 0.85)) | ((abs(v) < 0.26) & (abs(u) < 0.85))
    if name == "ring":
        return (rho > 0.5) & (rho < 0.85)
    if name == "crescent":
        return (rho < 0.85) & (np.hypot(u - 0.4, v) > 0.7)
    a, b = px / period, py / period  # textures: the whole image, in units of their period
    if name == "stripes":
        return a % 1.0 < 0.5
    if name == "checkerboard":
        return (np.floor(a) + np.floor(b)) % 2 == 0
    if name == "dots":
        return np.hypot(a % 1.0 - 0.5, b % 1.0 - 0.5) < 0.3
    raise ValueError(name)


@functools.lru_cache(maxsize=8)
def _shapes(split, size, dense=False):
    """-> uint8 (N, size, size, 3), int64 labels, and with dense=True also the coverage alpha (float32 (N, size, size),
    the fraction of each pixel's supersamples inside the shape) and the keypoints (float32 (N, 5, 2): SHAPES_KEYPOINTS,
    NaN for the textures); a pure function of (split, size); the images are the same with or without dense."""
    n, seed = SHAPES_SPLITS[split]
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SHAPES_CLASSES)  # interleaved, so any prefix is class-balanced
    center = rng.uniform(0.25, 0.75, (n, 2)) * size
    radius = rng.uniform(0.22, 0.40, n) * size
    angle = rng.uniform(0, 2 * np.pi, n)
    period = rng.uniform(0.16, 0.28, n) * size
    mean = rng.uniform(0.3, 0.7, (n, 3))
    contrast = rng.uniform(0.12, 0.3, (n, 3))  # mean +- contrast stays inside [0, 1] for any area
    ss = 2 if size <= 64 else 1  # supersampling, for anti-aliased edges
    grid = ((np.arange(size * ss) + 0.5) / ss).astype(np.float32)
    out = np.empty((n, size, size, 3), np.uint8)
    alphas = np.empty((n, size, size), np.float32) if dense else None
    keypoints = np.full((n, len(SHAPES_KEYPOINTS), 2), np.nan, np.float32) if dense else None
    chunk = max(1, 2 ** 22 // (size * ss) ** 2)  # bounds the memory of large image_size
    for start in range(0, n, chunk):
        i = np.arange(start, min(n, start + chunk))
        alpha = np.empty((len(i), size, size), np.float32)
        for k, name in enumerate(SHAPES_CLASSES):
            j = i[labels[i] == k]
            f = lambda a: a[j, None, None].astype(np.float32)
            dx, dy = grid[None, None, :] - f(center[:, 0]), grid[None, :, None] - f(center[:, 1])
            cos, sin = f(np.cos(angle)), f(np.sin(angle))
            mask = _shape_mask(name, cos * dx + sin * dy, cos * dy - sin * dx, f(radius), f(period))
            alpha[j - start] = mask.reshape(len(j), size, ss, size, ss).mean((2, 4))
            if dense and k < SHAPES_N_FIGURES:
                keypoints[j] = _extreme_points(mask, grid, center[j])
        a = alpha[..., None]
        background = mean[i] - contrast[i] * alpha.mean((1, 2))[:, None]
        img = background[:, None, None] + contrast[i, None, None] * a
        img += 0.03 * rng.standard_normal(img.shape, dtype=np.float32)
        out[i] = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
        if dense:
            alphas[i] = alpha
    return (out, labels, alphas, keypoints) if dense else (out, labels)


def _extreme_points(mask, grid, center):
    """Keypoints of drawn figures: the centre, and the leftmost, rightmost, topmost and bottommost points of the drawn
    (supersampled, image-clipped) mask, each the middle of the mask's extreme column/row there. mask: bool (n, S, S)
    over supersample positions `grid` (continuous, pixel i spans [i, i + 1)); -> float32 (n, 5, 2) (x, y) with pixel
    centres at integers (continuous position p is coordinate p - 0.5)."""
    n, S = len(mask), mask.shape[-1]
    rows, cols = mask.any(2), mask.any(1)  # (n, S): which rows / columns hold the figure
    first = lambda a: a.argmax(1)
    last = lambda a: S - 1 - a[:, ::-1].argmax(1)
    at = np.arange(n)
    mid = lambda line: (line * grid).sum(1) / line.sum(1)  # the middle of the figure along one row or column
    left, right, top, bottom = first(cols), last(cols), first(rows), last(rows)
    pts = [np.stack([center[:, 0], center[:, 1]], 1),
           np.stack([grid[left], mid(mask[at, :, left])], 1), np.stack([grid[right], mid(mask[at, :, right])], 1),
           np.stack([mid(mask[at, top, :]), grid[top]], 1), np.stack([mid(mask[at, bottom, :]), grid[bottom]], 1)]
    return np.stack(pts, 1).astype(np.float32) - 0.5


def _load_shapes(split, image_size=None):
    x, y = _shapes(split, image_size or 32)
    return Dataset(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y), list(SHAPES_CLASSES))


# The dense variants of `shapes` (the same images; no download for the dense bare runs and tests):
#   shapes-seg        every image, 11 classes per pixel: background, and the image's class (circle ... dots) where
#                     the figure or texture covers the pixel (alpha >= 0.75); pixels covered half (0.25 < alpha < 0.75,
#                     anti-aliased edges) are IGNORE_INDEX.
#   shapes-landmarks  the 7 figures (no textures: a texture has no centre or extremes), 5 keypoints (SHAPES_KEYPOINTS):
#                     the figure's centre and its leftmost, rightmost, topmost and bottommost drawn points. A horizontal
#                     flip swaps left and right; the NME is normalised by the left-right distance.
SHAPES_N_FIGURES = 7  # SHAPES_CLASSES[:7] are figures, the rest textures
SHAPES_KEYPOINTS = ("centre", "left", "right", "top", "bottom")


def _load_shapes_dense(task, split, image_size=None):
    x, y, alpha, kp = _shapes(split, image_size or 32, dense=True)
    images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    if task == "seg":
        masks = np.where(alpha >= 0.75, y[:, None, None] + 1, np.where(alpha <= 0.25, 0, IGNORE_INDEX)).astype(np.uint8)
        return Dataset(images, None, ["background", *SHAPES_CLASSES], masks=torch.from_numpy(masks))
    keep = torch.from_numpy(np.nonzero(y < SHAPES_N_FIGURES)[0])
    return Dataset(images[keep], None, [], keypoints=torch.from_numpy(kp)[keep], flip_pairs=((1, 2),), norm_pair=(1, 2))

# -----------------------------------------------------------------------------
# dense data sets: CelebAMask-HQ (face parsing) and WFLW (98 facial landmarks), in their published layouts

IGNORE_INDEX = 255  # a mask pixel that is not scored (mmseg's ignore_index and padding value)

# RepFusion's face parser (segmentation/mmseg/datasets/celebahqmask.py, tools/dataset/process_celebahqmask.py): label
# i + 1 is CELEBAMASK_PARTS[i], 0 is background; the parts are painted in this order, a later part overwriting earlier ones.
CELEBAMASK_PARTS = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
                    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
# The CelebAMask-HQ repository's own g_mask.py paints (and numbers) the parts in another order; its label maps
# (folder CelebAMask-HQ-mask) are renumbered into CELEBAMASK_PARTS on reading.
CELEBAMASK_GMASK_PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                          "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
CELEBAMASK_MAPPING = "CelebA-HQ-to-CelebA-mapping.txt"
CELEBA_VAL_START, CELEBA_TEST_START = 162771, 182638  # g_partition.py: orig_idx >= these is val / test
CELEBAMASK_MERGED = {"mask": CELEBAMASK_PARTS, "CelebAMask-HQ-mask": CELEBAMASK_GMASK_PARTS,
                     "CelebAMaskHQ-mask": CELEBAMASK_GMASK_PARTS}  # folder of merged label maps: its part order


def celebamask_split(root, split):
    """The CelebAMask-HQ ids (ints, the names of CelebA-HQ-img/<id>.jpg) of a split, by the official partition
    (CelebAMask-HQ's face_parsing/Data_preprocessing/g_partition.py): CelebA-HQ-to-CelebA-mapping.txt maps each id to
    its CelebA orig_idx, and CelebA's standard partition puts orig_idx <= 162770 in train, 162771..182637 in val and
    the rest in test (24,183 / 2,993 / 2,824 images). split: train | val | test."""
    path = os.path.join(root, CELEBAMASK_MAPPING)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (the CelebAMask-HQ split is defined by this file of the release)")
    ids = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            tok = line.split()
            if not tok or (n == 1 and not tok[0].isdigit()):  # the header "idx orig_idx orig_file"
                continue
            try:
                idx, orig = int(tok[0]), int(tok[1])
            except (ValueError, IndexError):
                raise UserError(f"{path}:{n}: expected 'idx orig_idx orig_file', got {line.strip()!r}") from None
            part = "test" if orig >= CELEBA_TEST_START else "val" if orig >= CELEBA_VAL_START else "train"
            if part == split:
                ids.append(idx)
    if not ids:
        raise UserError(f"{path}: no image of the {split} split")
    return ids


def _binary_mask(path):
    """A CelebAMask-HQ part annotation (512 x 512 PNG, the part white on black) -> bool (H, W): the non-zero pixels, as
    g_mask.py tests them (RepFusion's `convert('P') == 225` picks the same white pixels of these files)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L")) != 0
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot read mask ({type(e).__name__}: {_one_line(e)})") from None


def celebamask_label_map(root, idx):
    """One CelebAMask-HQ label map, uint8 (512, 512): 0 background, i + 1 = CELEBAMASK_PARTS[i]. Read from a folder of
    merged label maps (<id>.png; `mask/` as RepFusion's process_celebahqmask.py writes it, or CelebAMask-HQ-mask/ from
    g_mask.py, renumbered) if the release holds one, else merged from the per-part masks
    CelebAMask-HQ-mask-anno/<id // 2000>/<id:05d>_<part>.png, later parts of CELEBAMASK_PARTS overwriting earlier ones
    (a part without a file is absent from the image)."""
    for folder, order in CELEBAMASK_MERGED.items():
        if os.path.isdir(os.path.join(root, folder)):
            path = os.path.join(root, folder, f"{idx}.png")
            try:
                with Image.open(path) as img:
                    m = np.asarray(img)
            except (OSError, SyntaxError, ValueError) as e:
                raise UserError(f"{path}: cannot read label map ({type(e).__name__}: {_one_line(e)})") from None
            m = m[..., 0] if m.ndim == 3 else m
            if m.max() > len(order):
                raise UserError(f"{path}: label {int(m.max())} is not one of the {len(order)} parts or background (0)")
            table = np.array([0] + [CELEBAMASK_PARTS.index(p) + 1 for p in order], np.uint8)
            return table[m]
    anno = os.path.join(root, "CelebAMask-HQ-mask-anno")
    if not os.path.isdir(anno):
        raise UserError(f"{root}: neither CelebAMask-HQ-mask-anno/ (the per-part masks) nor a folder of merged label maps "
                        f"({', '.join(CELEBAMASK_MERGED)}/)")
    label = None
    for i, part in enumerate(CELEBAMASK_PARTS, 1):
        path = os.path.join(anno, str(idx // 2000), f"{idx:05d}_{part}.png")
        if os.path.exists(path):
            m = _binary_mask(path)
            label = np.zeros(m.shape, np.uint8) if label is None else label
            if m.shape != label.shape:
                raise UserError(f"{path}: mask is {m.shape[1]}x{m.shape[0]}, the image's other parts {label.shape[1]}x{label.shape[0]}")
            label[m] = i
    return label if label is not None else np.zeros((512, 512), np.uint8)


def _load_celebamask(root, split, image_size=None):
    """CelebAMask-HQ -> Dataset(images uint8 (N, 3, S, S), masks uint8 (N, S, S), classes background + 18 parts).
    S = image_size, default 512 (the masks' size): the 1024-pixel images are resized to it (bilinear), the masks by
    nearest neighbour (as mmseg's Resize does the pair)."""
    size = image_size or 512
    ids = celebamask_split(root, "val" if split == "val" else split)

    def one(idx):
        path = os.path.join(root, "CelebA-HQ-img", f"{idx}.jpg")
        if not os.path.exists(path):
            raise UserError(f"{path}: missing (listed in {CELEBAMASK_MAPPING})")
        img = open_rgb(path)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        m = celebamask_label_map(root, idx)
        if m.shape != (size, size):
            m = np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST))
        return np.asarray(img), m
    images = np.empty((len(ids), size, size, 3), np.uint8)
    masks = np.empty((len(ids), size, size), np.uint8)
    for k, (x, m) in enumerate(_pmap(one, ids)):
        images[k], masks[k] = x, m
    return Dataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), None, ["background", *CELEBAMASK_PARTS],
                   masks=torch.from_numpy(masks))


# WFLW (Wu et al., CVPR 2018): list_98pt_rect_attr_{train,test}.txt, one face a line: 98 (x, y) landmarks, the face
# rectangle x_min y_min x_max y_max, six 0/1 attributes, and the image path under WFLW_images/. Flip pairs and the
# inter-ocular normaliser (outer eye corners 60 and 72) as mmpose's configs/_base_/datasets/wflw.py.
WFLW_FLIP_PAIRS = ((0, 32), (1, 31), (2, 30), (3, 29), (4, 28), (5, 27), (6, 26), (7, 25), (8, 24), (9, 23), (10, 22),
                   (11, 21), (12, 20), (13, 19), (14, 18), (15, 17), (33, 46), (34, 45), (35, 44), (36, 43), (37, 42),
                   (38, 50), (39, 49), (40, 48), (41, 47), (55, 59), (56, 58), (60, 72), (61, 71), (62, 70), (63, 69),
                   (64, 68), (65, 75), (66, 74), (67, 73), (76, 82), (77, 81), (78, 80), (83, 87), (84, 86), (88, 92),
                   (89, 91), (93, 95), (96, 97))
WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
WFLW_PADDING = 1.25  # mmpose's TopDownGetBboxCenterScale(padding=1.25)


def parse_wflw_line(line, where):
    """One annotation line -> (keypoints float32 (98, 2), box float32 (4,) x_min y_min x_max y_max, attributes
    uint8 (6,), image path relative to WFLW_images/)."""
    tok = line.split()
    if len(tok) != 98 * 2 + 4 + 6 + 1:
        raise UserError(f"{where}: expected 207 fields (196 coordinates, 4 box, 6 attributes, image path), got {len(tok)}")
    try:
        v = np.array(tok[:206], np.float64)
    except ValueError:
        raise UserError(f"{where}: the first 206 fields must be numbers") from None
    return v[:196].reshape(98, 2).astype(np.float32), v[196:200].astype(np.float32), v[200:206].astype(np.uint8), tok[206]


def face_crop(img, box, size, padding=WFLW_PADDING):
    """The top-down crop of a face: a square of side padding * max(w, h) centred on the box, resized to size x size
    (bilinear). As mmpose's affine warp, the box centre lands on size / 2 and pixel centres sit at integer
    coordinates; -> (uint8 (size, size, 3), (cx, cy, k)) where an image point (x, y) lands at
    ((x - cx) / k + size / 2, (y - cy) / k + size / 2)."""
    x0, y0, x1, y1 = (float(b) for b in box)
    cx, cy = x0 + (x1 - x0) / 2, y0 + (y1 - y0) / 2
    k = padding * max(x1 - x0, y1 - y0, 1.0) / size
    # PIL samples output pixel centres at (j + 0.5) and reads the source at half-integer pixel centres too
    c0 = lambda c: c + 0.5 - (0.5 + size / 2) * k
    crop = img.transform((size, size), Image.AFFINE, (k, 0, c0(cx), 0, k, c0(cy)), resample=Image.BILINEAR)
    return np.asarray(crop), (cx, cy, k)


def _find_file(root, name):
    for base, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        if name in files:
            return os.path.join(base, name)
    return None


def _load_wflw(root, split, image_size=None):
    """WFLW -> Dataset(face crops uint8 (N, 3, S, S), keypoints (N, 98, 2) in crop pixels, attributes (N, 6)), S =
    image_size, default 256 (the official 256 x 256 input); one sample per annotation line, in file order."""
    size = image_size or 256
    name = f"list_98pt_rect_attr_{'train' if split == 'train' else 'test'}.txt"
    ann = _find_file(root, name)
    if ann is None:
        raise UserError(f"{root}: no {name} (WFLW_annotations/list_98pt_rect_attr_train_test/ of the release)")
    images_dir = os.path.join(root, "WFLW_images") if os.path.isdir(os.path.join(root, "WFLW_images")) else root
    with open(ann) as f:
        rows = [parse_wflw_line(line, f"{ann}:{n}") for n, line in enumerate(f, 1) if line.strip()]
    if not rows:
        raise UserError(f"{ann}: no annotation lines")
    by_image = {}
    for i, r in enumerate(rows):
        by_image.setdefault(r[3], []).append(i)
    crops = np.empty((len(rows), size, size, 3), np.uint8)
    kps = np.empty((len(rows), 98, 2), np.float32)

    def one(item):
        rel, faces = item
        path = os.path.join(images_dir, rel)
        if not os.path.exists(path):
            raise UserError(f"{path}: missing (named in {ann})")
        img = open_rgb(path)
        return [(i, *face_crop(img, rows[i][1], size)) for i in faces]
    for done in _pmap(one, list(by_image.items())):
        for i, crop, (cx, cy, k) in done:
            crops[i] = crop
            kps[i] = (rows[i][0] - np.array([cx, cy], np.float32)) / k + size / 2
    return Dataset(torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous(), None, [], keypoints=torch.from_numpy(kps),
                   flip_pairs=WFLW_FLIP_PAIRS, norm_pair=(60, 72),
                   attributes=torch.from_numpy(np.stack([r[2] for r in rows])), attribute_names=WFLW_ATTRIBUTES)


def _dense_kind(path):
    if os.path.isdir(os.path.join(path, "CelebA-HQ-img")):
        return "celebamask"
    if os.path.isdir(path) and (os.path.isdir(os.path.join(path, "WFLW_annotations"))
                                or os.path.isdir(os.path.join(path, "list_98pt_rect_attr_train_test"))):
        return "wflw"
    return None


def flip_keypoints(kp, width, pairs):
    """Keypoints of an image flipped horizontally: x -> width - 1 - x (pixel centres at integers, as mmpose's
    fliplr_joints) and each (i, j) of pairs swapped, so 'left eye' stays the left eye. kp: (..., K, 2)."""
    perm = list(range(kp.shape[-2]))
    for i, j in pairs:
        perm[i], perm[j] = j, i
    out = kp[..., perm, :].clone()
    out[..., 0] = width - 1 - out[..., 0]
    return out


def image_subset(ds, fraction, seed=0):
    """A random subset of round(fraction * N) samples (at least 1), for label budgets of dense data sets."""
    if not 0 < fraction <= 1:
        raise UserError(f"labeled fraction {fraction}: expected a number in (0, 1]")
    k = max(1, round(fraction * len(ds)))
    return ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:k].sort().values)

# -----------------------------------------------------------------------------
# load: names and paths to a Dataset

DATA_NAMES = {  # name: official file or folder names looked up in $DATA_DIR, in order
    "cifar10": ["cifar-10-batches-py", "cifar-10-python.tar.gz", "cifar-10-batches-bin", "cifar-10-binary.tar.gz"],
    "cifar100": ["cifar-100-python", "cifar-100-python.tar.gz", "cifar-100-binary", "cifar-100-binary.tar.gz"],
    "tinyimagenet": ["tiny-imagenet-200"],
    "celebamask-hq": ["CelebAMask-HQ"],
    "wflw": ["WFLW"],
}
DENSE_SHAPES = {"shapes-seg": "seg", "shapes-landmarks": "landmarks"}


def _check_split(split):
    if split not in ("train", "test", "val"):
        raise UserError(f"--split {split}: expected train or test")
    return "test" if split == "val" else split


def _resolve(spec):
    """A data set name or path -> an existing path."""
    if spec in DATA_NAMES:
        root = os.environ.get("DATA_DIR", "datasets")
        for name in DATA_NAMES[spec]:
            if os.path.exists(os.path.join(root, name)):
                return os.path.join(root, name)
        raise UserError(f"--data {spec}: none of {', '.join(DATA_NAMES[spec])} in {root}/ (set $DATA_DIR, "
                        f"or pass the path of the downloaded file or folder)")
    if not os.path.exists(spec):
        raise UserError(f"--data {spec}: no such file or folder (expected shapes, digits, {', '.join(DENSE_SHAPES)}, {', '.join(DATA_NAMES)}, "
                        f"or a path to a CIFAR tarball/folder, image folder or latents .safetensors)")
    return spec


def load(spec, split="train", image_size=None, flag="--test-data"):
    """A data set by name ("shapes", "cifar10", "cifar100", "tinyimagenet") or path; see the module doc. A latents
    file holds the one split its metadata names; asking it for another is refused, naming `flag` (the stage's flag
    for that split's file)."""
    raw_split = split
    split = _check_split(split)
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size {image_size}: expected a positive number of pixels")
    if spec == "shapes":
        return _load_shapes(split, image_size)
    if spec == "digits":
        return _load_digits(split, image_size)
    if spec in DENSE_SHAPES:
        return _load_shapes_dense(DENSE_SHAPES[spec], split, image_size)
    path = _resolve(spec)
    kind = _dense_kind(path)
    if kind == "celebamask":  # three splits: val is its own
        return _load_celebamask(path, raw_split, image_size)
    if kind == "wflw":
        return _load_wflw(path, split, image_size)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return _load_latents(path, image_size, split, flag)
    if (listing := _list_files(path, split)) is not None:  # Tiny-ImageNet or an image folder
        files, labels, classes = listing
        return Dataset(_read_images(files, image_size), torch.tensor(labels) if labels is not None else None, classes)
    if os.path.isdir(path):
        ds = _load_cifar_folder(path, split)
    elif path.endswith((".tar.gz", ".tgz", ".tar")):
        ds = _load_tarball(path, split)
    else:
        raise UserError(f"{path}: unknown format (expected a CIFAR .tar.gz, a latents .safetensors, or a folder)")
    if image_size:
        ds.images = _resize_all(ds.images, image_size)
    return ds


@functools.lru_cache(maxsize=1)
def imagenet_classes():
    """The 1000 ImageNet-1k classes in the index order every ImageNet model uses (sorted wnids):
    [(wnid, name)], read from imagenet1k_classes.tsv beside this file."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet1k_classes.tsv")) as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]


def _norm(name):
    return " ".join(name.replace("_", " ").lower().split())


def relabel(ds, classes, what):
    """ds with its labels re-indexed into `classes` (a model's or the training split's class list) by class identity:
    the same name, or for a 1000-class ImageNet list (wnids, as `imagenet_classes`) the wnid or its unique ImageNet
    name ("goldfish", "tabby"). A class the list lacks, or data without class names, is refused in one line."""
    if ds.labels is None or list(ds.classes) == list(classes):
        return ds
    if not ds.classes:
        raise UserError(f"{what}: its labels carry no class names, so they cannot be matched to the {len(classes)} classes "
                        f"{list(classes)[:5]}{' ...' if len(classes) > 5 else ''}")
    index = {c: i for i, c in enumerate(classes)}
    if len(classes) == 1000 and list(classes) == [w for w, _ in imagenet_classes()]:
        names = {}
        for i, (_, name) in enumerate(imagenet_classes()):
            names.setdefault(_norm(name), []).append(i)
        index.update({n: ix[0] for n, ix in names.items() if len(ix) == 1})  # ambiguous names ("crane") need the wnid
        lookup = [index.get(c, index.get(_norm(c))) for c in ds.classes]
    else:
        lookup = [index.get(c) for c in ds.classes]
    missing = [c for c, i in zip(ds.classes, lookup) if i is None]
    if missing:
        raise UserError(f"{what}: classes {missing[:5]}{' ...' if len(missing) > 5 else ''} are not among the "
                        f"{len(classes)} classes they are compared with ({list(classes)[:5]}{' ...' if len(classes) > 5 else ''})")
    table = torch.tensor(lookup, dtype=torch.long)
    return Dataset(ds.images, table[ds.labels.long().cpu()].to(ds.labels.device), list(classes), ds.latents, ds.scaling_factor)


def labeled_subset(ds, labels_per_class=None, fraction=None, seed=0):
    """A class-balanced subset: labels_per_class images of each class, or that fraction of each class."""
    return ds.subset(labeled_indices(ds, labels_per_class, fraction, seed))


def labeled_indices(ds, labels_per_class=None, fraction=None, seed=0):
    """The indices (sorted, into ds) of `labeled_subset`'s images: a pure function of (labels, counts, seed)."""
    if (labels_per_class is None) == (fraction is None):
        got = "neither" if labels_per_class is None else f"both: {labels_per_class} and {fraction}"
        raise UserError(f"give exactly one of --labels-per-class and --labeled-fraction (got {got})")
    if ds.labels is None:
        raise UserError("a labeled subset needs a labeled data set (this one has no labels)")
    if fraction is not None and not 0 < fraction <= 1:
        raise UserError(f"labeled fraction {fraction}: expected a number in (0, 1]")
    g = torch.Generator().manual_seed(seed)
    labels, keep = ds.labels.cpu(), []
    for c in range(ds.num_classes):
        idx = torch.nonzero(labels == c).flatten()
        k = labels_per_class if labels_per_class is not None else max(1, round(fraction * len(idx)))
        if k > len(idx):
            raise UserError(f"--labels-per-class {k}: class {ds.classes[c]!r} has only {len(idx)} images")
        keep.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(keep).sort().values

# -----------------------------------------------------------------------------
# batches: Loader (training), iterate (evaluation), stream (folders too big for memory)


def keyed_generator(*keys, device="cpu"):
    """A torch.Generator seeded by a tuple of ints; the CPU one gives the same numbers everywhere."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def crop_flip(x, shift, flip, padding, zeros=False):
    """Random crop with reflect padding (zeros=True: zero padding, torchvision's RandomCrop(padding=4) as DDAE's
    official probe uses it), and horizontal flip, in one gather on the device.
    x: uint8 (B, C, H, W); shift: (B, 2) row/column offsets in [0, 2*padding]; flip: bool (B,)."""
    B, C, H, W = x.shape
    rows = torch.arange(H, device=x.device) + (shift[:, :1] - padding)  # (B, H) source row of each output row
    cols = torch.arange(W, device=x.device) + (shift[:, 1:] - padding)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    reflect = lambda i, n: (n - 1) - ((n - 1) - i.abs()).abs()  # -1 -> 1 and n -> n - 2, as reflect padding
    src = reflect(rows, H)[:, :, None] * W + reflect(cols, W)[:, None, :]  # (B, H, W) flat source pixel
    out = x.flatten(2).gather(2, src.flatten(1)[:, None].expand(B, C, H * W)).view(B, C, H, W)
    if zeros:  # a source outside the image is padding: 0
        inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]  # (B, H, W)
        out = out * inside[:, None].to(out.dtype)
    return out


class Loader:
    """Training batches kept on the device; deterministic for (seed, step); sharded by rank.

    Each epoch draws, on the CPU from (seed, epoch), a permutation and one crop offset and flip
    per position, and moves them to the device once; a step takes its slice. batch_size is global:
    rank r gets rows [r * B/world, (r+1) * B/world) of the global batch, so the ranks together see
    exactly what one process would. The last partial batch of an epoch is dropped."""

    def __init__(self, ds, batch_size, device, seed=0, augment=True, crop_padding=4, flip=True, rank=0, world_size=1):
        if batch_size % world_size:
            raise UserError(f"--batch-size {batch_size} is not divisible by the {world_size} processes")
        if len(ds) < batch_size:
            raise UserError(f"--batch-size {batch_size} is larger than the data set ({len(ds)} samples)")
        if ds.images is not None and augment and crop_padding >= min(ds.images.shape[-2:]):
            raise UserError(f"crop padding {crop_padding} must be smaller than the images ({ds.images.shape[-1]}px)")
        self.ds, self.device = ds.to(device), torch.device(device)
        self.batch_size, self.local = batch_size, batch_size // world_size
        self.seed, self.augment, self.crop_padding, self.flip = seed, augment, crop_padding, flip
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = len(ds) // batch_size
        self._epoch, self._plan = None, None

    def _epoch_plan(self, epoch):
        if epoch != self._epoch:
            g, n = keyed_generator(self.seed, epoch), len(self.ds)
            perm = torch.randperm(n, generator=g)
            flip = torch.rand(n, generator=g) < 0.5
            shift = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=g)
            self._epoch, self._plan = epoch, [t.to(self.device) for t in (perm, flip, shift)]
        return self._plan

    def batch(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        start = i * self.batch_size + self.rank * self.local  # this rank's rows of the global batch
        idx, flip, shift = (t[start:start + self.local] for t in self._epoch_plan(epoch))
        flip = flip & (self.augment and self.flip)
        ds = self.ds
        y = ds.labels[idx] if ds.labels is not None else None
        if ds.latents is not None:  # no crop for latents; a flip takes the latents of the flipped image
            pick = lambda k: torch.where(flip[:, None, None, None], ds.latents[k + "_flip"][idx], ds.latents[k][idx])
            # noise for the whole global batch, of which the rank keeps its rows (same numbers on
            # every rank of one device type; CPU and CUDA generators differ)
            g = keyed_generator(self.seed, step, 1, device=self.device)
            eps = torch.randn((self.batch_size, *ds.sample_shape), generator=g, device=self.device)
            eps = eps[self.rank * self.local:(self.rank + 1) * self.local]
            return (pick("mean") + pick("std") * eps) * ds.scaling_factor, y
        x = ds.images[idx]
        if ds.masks is not None:
            y = ds.masks[idx]
        elif ds.keypoints is not None:
            y = ds.keypoints[idx]
        if self.augment:
            x = crop_flip(x, shift, flip, self.crop_padding)
            if ds.masks is not None:  # the same crop and flip (mmseg flips masks without swapping left/right parts)
                y = crop_flip(y[:, None], shift, flip, self.crop_padding)[:, 0]
            elif ds.keypoints is not None:  # follow the crop; a flip mirrors x and swaps the left/right pairs
                y = y - (shift.flip(1) - self.crop_padding)[:, None, :].to(y.dtype)
                y = torch.where(flip[:, None, None], flip_keypoints(y, x.shape[-1], ds.flip_pairs), y)
        return to_float(x), y


def iterate(ds, batch_size, device, rank=0, world_size=1):
    """Evaluation pass in order, no augmentation, every sample once (the last batch may be short);
    yields (x, y, idx), y the labels, or a dense set's masks / keypoints. Latents give the posterior mean *
    scaling_factor. batch_size is global, and
    rank r gets the samples with idx % world_size == r."""
    local = max(1, batch_size // world_size)
    order = torch.arange(rank, len(ds), world_size)
    for start in range(0, len(order), local):
        idx = order[start:start + local]
        if ds.latents is not None:
            mean = ds.latents["mean"]
            x = mean[idx.to(mean.device)].to(device) * ds.scaling_factor
        else:
            x = to_float(ds.images[idx.to(ds.images.device)].to(device))
        target = ds.masks if ds.masks is not None else ds.keypoints if ds.keypoints is not None else ds.labels
        y = target[idx.to(target.device)].to(device) if target is not None else None
        yield x, y, idx.to(device)


class _Images(torch.utils.data.Dataset):
    """Image files decoded in DataLoader workers. A worker's error comes back as a string, so that
    the main process raises one clean line instead of the worker's traceback."""

    def __init__(self, files, labels, image_size):
        self.files, self.labels, self.image_size = files, labels, image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return torch.from_numpy(_decode(self.files[i], self.image_size)).permute(2, 0, 1), i
        except UserError as e:
            return str(e)

    def collate(self, items):
        bad = [it for it in items if isinstance(it, str)]
        if bad:
            return bad[0]
        first = items[0][0].shape
        for x, i in items:
            if x.shape != first:
                return (f"{self.files[i]}: image is {x.shape[2]}x{x.shape[1]}, others are {first[2]}x{first[1]}; "
                        f"use --image-size to bring all images to one size")
        idx = [i for _, i in items]
        return torch.stack([x for x, _ in items]), (self.labels[idx] if self.labels is not None else None)


def stream(spec, batch_size, image_size=None, workers=4, shuffle=True, seed=0, rank=0, world_size=1, split="train"):
    """torch DataLoader with workers, decoding an image folder lazily (folders too big for memory);
    yields (uint8 images (B, C, H, W), labels or None). batch_size is global, as in Loader.
    shuffle=True: endless, each epoch a (seed, epoch) permutation cut into global batches, rank r
    taking its slice. shuffle=False: one pass in order, rank r gets the samples i % world_size == r."""
    listing = _list_files(_resolve(spec), _check_split(split)) if spec != "shapes" else None
    if listing is None:
        raise UserError(f"--data {spec}: stream decodes image folders; load this data set with data.load")
    files, labels, _ = listing
    items = _Images(files, torch.tensor(labels) if labels is not None else None, image_size)
    n, local = len(items), batch_size // world_size
    if batch_size % world_size or (shuffle and n < batch_size):
        raise UserError(f"--batch-size {batch_size}: must be divisible by {world_size} processes and at most {n}")
    if shuffle:  # endless; epoch e is the (seed, e) permutation cut into global batches
        perms = (torch.randperm(n, generator=keyed_generator(seed, e)).tolist() for e in itertools.count())
        epochs = ([p[s + rank * local:s + (rank + 1) * local] for s in range(0, n - batch_size + 1, batch_size)]
                  for p in perms)
    else:
        order = torch.arange(rank, n, world_size).tolist()
        epochs = [[order[s:s + local] for s in range(0, len(order), local)]]
    return _decoded_batches(items, epochs, workers)


def _decoded_batches(items, epochs, workers):
    for batches in epochs:
        loader = torch.utils.data.DataLoader(items, batch_sampler=batches, num_workers=workers, collate_fn=items.collate)
        for b in loader:
            if isinstance(b, str):
                raise UserError(b)
            yield b

# -----------------------------------------------------------------------------


def save_grid(images, path, nrow=8):
    """uint8 (N, C, H, W) -> a PNG grid, nrow images a row, 2px gaps."""
    images = images.cpu()
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(c, rows * (h + 2) + 2, nrow * (w + 2) + 2, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = images[k]
    Image.fromarray(grid.permute(1, 2, 0).squeeze(-1).numpy()).save(path)


def main(args):
    ds = load(args.data, args.split, args.image_size)
    what = "latents" if ds.images is None else "images"
    names = ", ".join(ds.classes[:10]) + (", ..." if ds.num_classes > 10 else "")
    dense = {"seg": f"masks of {ds.num_classes} classes ({names})",
             "landmarks": f"{ds.keypoints.shape[1] if ds.keypoints is not None else 0} keypoints"}.get(ds.task)
    print(f"{args.data} [{args.split}]: {len(ds)} {what} of shape {'x'.join(map(str, ds.sample_shape))}, "
          + (dense or (f"{ds.num_classes} classes ({names})" if ds.labels is not None else "unlabeled")))
    if args.grid:
        if ds.images is None:
            raise UserError("--grid needs images; decode latents with vae.py")
        if ds.labels is not None:  # a row of up to 8 images for each of the first 16 classes
            idx = torch.cat([torch.nonzero(ds.labels == c).flatten()[:8] for c in range(min(16, ds.num_classes))])
        else:
            idx = torch.arange(min(64, len(ds)))
        save_grid(ds.images[idx], args.grid, nrow=8)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
