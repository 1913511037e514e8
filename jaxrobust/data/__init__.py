"""Data: named sources (offline local + TFDS with download=False), seeded splits carrying dataset
indices, deterministic batching with static shapes (train drops the remainder, eval pads and masks),
on-device augmentation with inverse, and batches placed sharded over the device mesh.

Sources: ``mnist5k``, ``fashion_mnist_local``, ``digits``, ``synthetic2d`` (offline) and the TFDS
names ``mnist, fashion_mnist, svhn_cropped, cifar10, cifar100, cifar10_corrupted/<corruption>_<1..5>,
imagenet2012, imagenet100``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, Optional

import jax
import numpy as np

from jaxrobust.data import augment
from jaxrobust.data.sources import (CIFAR10_C_CONFIGS, CIFAR10_CORRUPTIONS, IMAGENET100_CLASSES,
                                    LOCAL_SOURCES, TFDS_SOURCES, DatasetInfo, Split,
                                    class_balanced_subset, in_memory_split, read_idx,
                                    stratified_split, synthetic2d_seeds, _tfds_split)


def list_datasets():
    return sorted(list(LOCAL_SOURCES) + list(TFDS_SOURCES))


@dataclasses.dataclass
class Dataset:
    info: DatasetInfo
    splits: Dict[str, Split]

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise ValueError(f"Dataset {self.info.name!r} has no split {name!r}; "
                             f"available: {sorted(self.splits)}.")
        return self.splits[name]


def _carve_validation(splits: Dict[str, Split], val_fraction: float, seed: int):
    if val_fraction == 0.0:
        return splits
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    train = splits["train"]
    tr, va = stratified_split(train.labels(), val_fraction, seed + 12345)
    out = dict(splits)
    out["train"], out["val"] = train.subset(tr), train.subset(va)
    return out


def load_dataset(name: str, *, data_dir: Optional[str] = None, val_fraction: float = 0.0,
                 seed: int = 0, pixel_range=(0.0, 1.0), image_size: Optional[int] = None,
                 **kwargs) -> Dataset:
    """Loads a named dataset. ``val_fraction`` carves a stratified validation split from train.

    ``pixel_range`` is (0, 1) (default) or (-1, 1) (the thesis's §3.2.2 convention). Unknown names
    raise a ValueError listing what exists; unprepared TFDS datasets raise FileNotFoundError with the
    preparation recipe.
    """
    pixel_range = tuple(float(v) for v in pixel_range)
    if pixel_range not in ((0.0, 1.0), (-1.0, 1.0)):
        raise ValueError(f"pixel_range must be (0, 1) or (-1, 1), got {pixel_range}.")
    base, _, config = name.partition("/")
    if base in LOCAL_SOURCES:
        arrays, (nm, k, shape, mean, std) = LOCAL_SOURCES[base](seed=seed, data_dir=data_dir, **kwargs)
        rng_range = (-1.0, 1.0) if base == "synthetic2d" else pixel_range
        splits = {s: in_memory_split(x, y, rng_range if base != "synthetic2d" else (0.0, 1.0))
                  for s, (x, y) in arrays.items()}
        info_range = rng_range
    elif base in TFDS_SOURCES:
        tfds_name, split_names, k, shape, mean, std = TFDS_SOURCES[base]
        if base == "cifar10_corrupted":
            if config not in CIFAR10_C_CONFIGS:
                raise ValueError("cifar10_corrupted needs a config '<corruption>_<severity 1..5>', e.g. "
                                 f"cifar10_corrupted/gaussian_noise_3; corruptions: {CIFAR10_CORRUPTIONS}.")
            tfds_name = f"cifar10_corrupted/{config}"
        class_map = None
        if base == "imagenet100":
            class_map = {c: i for i, c in enumerate(IMAGENET100_CLASSES)}
        if image_size is not None:
            shape = (image_size, image_size, 3)
        size = shape[0] if base.startswith("imagenet") else None
        splits = {}
        for s in split_names:
            sp = _tfds_split(tfds_name, s, data_dir, size, class_map)
            sp.pixel_range = pixel_range
            splits["test" if s == "validation" else s] = sp
        nm, info_range = name, pixel_range
    else:
        raise ValueError(f"Unknown dataset {name!r}. Available datasets: {', '.join(list_datasets())}.")
    splits = _carve_validation(splits, val_fraction, seed)
    info = DatasetInfo(name=nm, num_classes=k, image_shape=tuple(shape), mean=tuple(mean),
                       std=tuple(std), splits=tuple(sorted(splits)), pixel_range=info_range)
    return Dataset(info, splits)


def num_batches(split_or_len, batch_size: int, drop_remainder: bool) -> int:
    n = split_or_len if isinstance(split_or_len, int) else len(split_or_len)
    return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The example order of one epoch: a pure function of (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_iterator(split: Split, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                   drop_remainder: bool, start_batch: int = 0, sharding=None
                   ) -> Iterator[Dict[str, np.ndarray]]:
    """Yields fixed-shape batches ``{'image','label','index','mask'}`` of one epoch.

    Train (``drop_remainder=True``): the last incomplete batch is dropped. Eval: the last batch is
    padded (repeating the first example) with ``mask=False`` so every example counts exactly once.
    ``start_batch`` resumes mid-epoch. With ``sharding`` (a NamedSharding over the batch axis) each
    process reads only its contiguous slice of every global batch and the result is a global jax.Array.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    n = len(split)
    # a split may order its own epochs (data.extra's half-and-half batches, jaxrobust.data.subsets)
    custom = getattr(split, "epoch_order", None)
    order = custom(seed, epoch, shuffle) if custom is not None else epoch_order(n, seed, epoch, shuffle)
    nb = num_batches(n, batch_size, drop_remainder)
    pc, pi = jax.process_count(), jax.process_index()
    if batch_size % pc:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {pc} processes.")
    local = batch_size // pc
    for b in range(start_batch, nb):
        pos = order[b * batch_size:(b + 1) * batch_size]
        mask = np.ones(batch_size, bool)
        if len(pos) < batch_size:
            mask[len(pos):] = False
            pos = np.concatenate([pos, np.full(batch_size - len(pos), order[0])])
        lo, hi = pi * local, (pi + 1) * local
        batch = split.get(pos[lo:hi])
        batch["mask"] = mask[lo:hi]
        if sharding is not None:
            batch = {k: jax.make_array_from_process_local_data(sharding, v,
                                                               (batch_size,) + v.shape[1:])
                     for k, v in batch.items()}
        yield batch


__all__ = ["load_dataset", "list_datasets", "Dataset", "DatasetInfo", "Split", "batch_iterator",
           "num_batches", "epoch_order", "augment", "class_balanced_subset", "stratified_split",
           "in_memory_split", "read_idx", "synthetic2d_seeds", "CIFAR10_C_CONFIGS",
           "CIFAR10_CORRUPTIONS", "IMAGENET100_CLASSES"]
