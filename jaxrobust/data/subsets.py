"""Training on part of the data, or on more of it (thesis §4.3.2 and §4.3.4): the ``data.subset`` and
``data.extra`` options of the data layer.

- ``data.subset``: the ``size`` easiest / random / hardest training instances by a reference run's
  difficulty (thesis eq. 4.30, ``RUN/difficulty.npy``, high = easy), class-balanced by default as in
  the thesis ("the easiest 10000 instances consist of the easiest 1000 instances in each class").
  The chosen examples keep their dataset indices, so per-instance state and difficulty stay indexed
  as in the full set.
- ``data.extra``: a second source mixed into every training batch half and half (thesis §4.3.4:
  "half of its instances are sampled from the original training set and the other half from the
  additional data"): ``source='rest'`` is the training examples ``data.subset`` left out, any other
  value a dataset name (its ``data.extra.split``). One epoch is one pass over the extra data; the
  original examples are cycled (each epoch visits them in fresh random orders). Extra examples from
  another dataset get dataset indices offset past the original ones.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from jaxrobust.data.sources import Split

SUBSET_KINDS = ("easy", "random", "hard")
DIFFICULTY_FILE = "difficulty.npy"


def class_quotas(labels: np.ndarray, size: int) -> dict:
    """Examples per class of a class-balanced subset of ``size``: ``size // K`` each, the remainder
    given one by one to the first classes (sorted labels)."""
    classes = np.unique(labels)
    k = len(classes)
    base, rem = divmod(int(size), k)
    return {int(c): base + (1 if i < rem else 0) for i, c in enumerate(classes)}


def select_subset(difficulty: np.ndarray, labels: np.ndarray, kind: str, size: int, *,
                  class_balanced: bool = True, seed: int = 0) -> np.ndarray:
    """Sorted positions of the ``size`` easiest (largest d), random or hardest (smallest d) examples.

    ``difficulty`` (N,) holds eq. 4.30's d of every position (NaN: unknown, never chosen by 'easy' /
    'hard'), ``labels`` (N,). Ties are broken by position, so easy and hard subsets of at most half of
    each class are disjoint. ``class_balanced``: :func:`class_quotas` examples of every class."""
    if kind not in SUBSET_KINDS:
        raise ValueError(f"data.subset.kind must be one of {SUBSET_KINDS} (or '' for the whole set), "
                         f"got {kind!r}.")
    difficulty = np.asarray(difficulty, np.float64)
    labels = np.asarray(labels)
    if difficulty.shape != labels.shape or difficulty.ndim != 1:
        raise ValueError(f"difficulty {difficulty.shape} and labels {labels.shape} must be equal 1-d "
                         "shapes (one value per training example).")
    n = len(labels)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 0 < size <= n:
        raise ValueError(f"data.subset.size must be an integer in [1, {n}] (the training-set size), "
                         f"got {size!r}.")
    rng = np.random.default_rng(seed)
    groups = [(c, np.flatnonzero(labels == c), q) for c, q in class_quotas(labels, size).items()] \
        if class_balanced else [(None, np.arange(n), int(size))]
    chosen = []
    for c, pos, quota in groups:
        if kind == "random":
            if len(pos) < quota:
                raise ValueError(f"class {c} has {len(pos)} examples; the subset needs {quota}.")
            chosen.append(rng.choice(pos, quota, replace=False))
            continue
        known = pos[np.isfinite(difficulty[pos])]
        if len(known) < quota:
            where = f"class {c}" if c is not None else "the training set"
            raise ValueError(f"{where} has {len(known)} examples with a known difficulty; the "
                             f"{kind} subset needs {quota} (was the reference run long enough to "
                             "visit every example?).")
        d = difficulty[known]
        order = np.lexsort((known, -d)) if kind == "easy" else np.lexsort((known, d))
        chosen.append(known[order[:quota]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def load_reference_difficulty(reference: str) -> np.ndarray:
    """``difficulty.npy`` of a reference run (a workdir, or the file itself): d indexed by dataset
    index (NaN where unknown)."""
    path = reference if reference.endswith(".npy") else os.path.join(reference, DIFFICULTY_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: the subset's reference run has no difficulty yet. Train it with "
            "--config.train.difficulty.enabled=True (experiments.train does so itself when "
            "data.subset.reference_config names its config).")
    d = np.load(path)
    if d.ndim != 1:
        raise ValueError(f"{path} must hold a 1-d array of difficulties, got shape {d.shape}.")
    return d


def subset_positions(split: Split, subset_cfg, difficulty: Optional[np.ndarray]) -> np.ndarray:
    """Positions in ``split`` of the ``data.subset`` asked for (``difficulty`` indexed by dataset
    index; unused for 'random')."""
    labels = split.labels()
    if subset_cfg.kind == "random":
        d = np.zeros(len(split))
    else:
        idx = split.dataset_indices
        if difficulty is None or idx.max() >= len(difficulty):
            raise ValueError(f"the reference difficulty covers {0 if difficulty is None else len(difficulty)} "
                             f"dataset indices; the training split has indices up to {idx.max()} "
                             "(was the reference run trained on the same dataset?).")
        d = difficulty[idx]
    return select_subset(d, labels, subset_cfg.kind, int(subset_cfg.size),
                         class_balanced=bool(subset_cfg.class_balanced), seed=int(subset_cfg.seed))


def mixed_split(primary: Split, extra: Split, offset: int) -> Split:
    """``primary`` and ``extra`` in one split whose batches are half and half (thesis §4.3.4).

    Positions ``2j`` are primary examples (``j mod len(primary)``), ``2j + 1`` the extra ones, so
    ``len`` = 2·len(extra) is one pass over the extra data. ``offset`` is added to the extra
    examples' dataset indices (0 when both come from the same index space, e.g. the rest of a
    subset). The split's ``epoch_order(seed, epoch, shuffle)`` interleaves a fresh permutation of
    the even and of the odd positions, so every even-sized batch holds exactly as many of each."""
    n_p, n_e = len(primary), len(extra)
    if n_p == 0 or n_e == 0:
        raise ValueError(f"data.extra: both the training set ({n_p}) and the extra data ({n_e}) "
                         "must be non-empty.")
    p_idx, e_idx = primary.dataset_indices, extra.dataset_indices + offset
    if offset == 0 and np.intersect1d(p_idx, e_idx).size:
        raise ValueError("data.extra.source='rest' overlaps the training subset (internal error).")
    j = np.arange(n_e)
    indices = np.empty(2 * n_e, np.int64)
    indices[0::2] = p_idx[j % n_p]
    indices[1::2] = e_idx
    p_get, e_get = primary._getter, extra._getter
    if offset == 0:
        if p_get is not e_get:
            raise ValueError("mixed_split with offset 0 needs two parts of one source (the rest of a "
                             "subset); give an extra dataset an index offset.")
        getter = p_get
    else:
        def getter(idx):
            idx = np.asarray(idx, np.int64)
            is_extra = idx >= offset
            parts = [(m, f(idx[m] - o)) for m, f, o in ((~is_extra, p_get, 0), (is_extra, e_get, offset))
                     if m.any()]
            shape = np.asarray(parts[0][1][0]).shape[1:]
            images = np.empty((len(idx),) + shape, np.float32)
            labels = np.empty((len(idx),), np.int32)
            for m, (xs, ys) in parts:
                images[m], labels[m] = xs, ys
            return images, labels

    split = Split(getter, 0, indices, primary.pixel_range)

    def order(seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        out = np.arange(2 * n_e)
        if shuffle:
            rng = np.random.default_rng([seed, epoch, 7])
            out[0::2] = 2 * rng.permutation(n_e)
            out[1::2] = 2 * rng.permutation(n_e) + 1
        return out

    split.epoch_order = order
    return split


def apply_data_options(dataset, data_cfg, load_dataset_fn=None):
    """The dataset with ``data.subset`` / ``data.extra`` applied to its training split (a new
    Dataset; other splits unchanged). ``load_dataset_fn(name, split)`` loads an extra source."""
    sub = data_cfg.get("subset", None)
    extra = data_cfg.get("extra", None)
    kind = sub.kind if sub is not None else ""
    source = extra.source if extra is not None else ""
    if not kind and not source:
        return dataset
    train = dataset.split("train")
    splits = dict(dataset.splits)
    rest = None
    if kind:
        difficulty = None if kind == "random" else load_reference_difficulty(sub.reference)
        pos = subset_positions(train, sub, difficulty)
        rest = np.setdiff1d(np.arange(len(train)), pos)
        splits["train"] = train.subset(pos)
    if source:
        if source == "rest":
            if rest is None:
                raise ValueError("data.extra.source='rest' is the part of the training set that "
                                 "data.subset leaves out: set data.subset.kind and size too.")
            extra_split, offset = train.subset(rest), 0
        else:
            if load_dataset_fn is None:
                raise ValueError("data.extra needs a dataset loader.")
            extra_split = load_dataset_fn(source, extra.split)
            offset = int(np.max(train.dataset_indices)) + 1
        if extra.size > 0:
            if extra.size > len(extra_split):
                raise ValueError(f"data.extra.size={extra.size} exceeds the {len(extra_split)} "
                                 "extra examples.")
            keep = np.sort(np.random.default_rng(int(extra.seed)).choice(
                len(extra_split), int(extra.size), replace=False))
            extra_split = extra_split.subset(keep)
        splits["train"] = mixed_split(splits["train"], extra_split, offset)
    return type(dataset)(dataset.info, splits)


def validate_data_options(data_cfg) -> None:
    """One ValueError for bad ``data.subset`` / ``data.extra`` settings, before anything is written."""
    sub, extra = data_cfg.subset, data_cfg.extra
    if sub.kind not in ("",) + SUBSET_KINDS:
        raise ValueError(f"data.subset.kind must be '' (whole set) or one of {SUBSET_KINDS}, got "
                         f"{sub.kind!r}.")
    if sub.kind:
        if isinstance(sub.size, bool) or not isinstance(sub.size, int) or sub.size <= 0:
            raise ValueError(f"data.subset.size must be a positive integer, got {sub.size!r}.")
        if sub.kind != "random" and not sub.reference:
            raise ValueError(f"data.subset.kind={sub.kind!r} needs data.subset.reference (the workdir "
                             "of the run whose difficulty.npy ranks the examples).")
    if not isinstance(extra.source, str):
        raise ValueError(f"data.extra.source must be a string, got {extra.source!r}.")
    if isinstance(extra.size, bool) or not isinstance(extra.size, int):
        raise ValueError(f"data.extra.size must be an integer (<= 0: all), got {extra.size!r}.")


__all__ = ["SUBSET_KINDS", "select_subset", "class_quotas", "load_reference_difficulty",
           "subset_positions", "mixed_split", "apply_data_options", "validate_data_options"]
