"""Instance difficulty (thesis §4.3.1, eq. 4.30), the D-distance between two difficulty functions
(eq. 4.31) and the difficulty groups G0..G9 (eq. 4.32). Pure numpy on per-instance arrays indexed by
dataset index; NaN marks an instance without a value (not in the split, never visited).

- ``ĝ(x)``: the average over training of the instance's loss under the run's perturbation (the
  training loop accumulates it at no extra forward pass, :mod:`jaxrobust.train.difficulty`);
- ``d(x) = P(ĝ(x) < ĝ(x̂)) + ½ P(ĝ(x) = ĝ(x̂))``, x̂ ~ U(D) (x itself included): the fraction of the
  set that is harder; close to 0 for the hardest instances and to 1 for the easiest;
- ``D(d1, d2) = E_x |d1(x) − d2(x)|`` over the instances both functions know. Two independent
  difficulty functions (uniform ranks) are 1/3 apart on average (the thesis says 0.375);
- ``G_i = {x : 0.1 i ≤ d(x) < 0.1 (i + 1)}`` (d = 1 belongs to G9): G0 the hardest, G9 the easiest.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence

import numpy as np

DIFFICULTY_FILE = "difficulty.npy"  # RUN/difficulty.npy: d of eq. 4.30 per dataset index (NaN: none)
STATS_FILE = "instance_stats.npz"  # RUN/instance_stats.npz: mean loss, mean 0-1 error, visits
SUMMARY_FILE = "difficulty.json"
NUM_GROUPS = 10


def difficulty_from_losses(mean_loss) -> np.ndarray:
    """Eq. 4.30 from the average losses ĝ (N,) (NaN entries are left out of the set and stay NaN):
    ``d_i = (#{j : ĝ_j > ĝ_i} + ½ #{j : ĝ_j = ĝ_i}) / n`` over the n finite entries."""
    g = np.asarray(mean_loss, np.float64)
    if g.ndim != 1:
        raise ValueError(f"mean_loss must be 1-d (one value per instance), got shape {g.shape}.")
    out = np.full(g.shape, np.nan)
    ok = np.isfinite(g)
    v = g[ok]
    n = v.size
    if n == 0:
        return out
    s = np.sort(v)
    lo = np.searchsorted(s, v, side="left")
    hi = np.searchsorted(s, v, side="right")
    out[ok] = ((n - hi) + 0.5 * (hi - lo)) / n
    return out


def _check_difficulty(d, name: str) -> np.ndarray:
    d = np.asarray(d, np.float64)
    if d.ndim != 1:
        raise ValueError(f"{name} must be a 1-d difficulty array, got shape {d.shape}.")
    ok = np.isfinite(d)
    if np.any((d[ok] < 0) | (d[ok] > 1)):
        raise ValueError(f"{name} has values outside [0, 1]: not a difficulty function (eq. 4.30).")
    return d


def d_distance(d1, d2) -> float:
    """Eq. 4.31: ``mean |d1 − d2|`` over the instances finite in both (arrays indexed alike; the
    shorter one is compared with the head of the longer one, as index spaces of one dataset)."""
    a, b = _check_difficulty(d1, "d1"), _check_difficulty(d2, "d2")
    n = min(a.size, b.size)
    a, b = a[:n], b[:n]
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        raise ValueError("the two difficulty functions share no instance (no index finite in both).")
    return float(np.mean(np.abs(a[ok] - b[ok])))


def d_distance_matrix(runs: Dict[str, Sequence[np.ndarray]]) -> Dict[str, Dict[str, float]]:
    """Table 4.3's matrix: ``runs`` maps a setting to its runs' difficulty arrays (one per seed).
    Off-diagonal: the mean D over every pair (run of A, run of B); diagonal: the mean over the pairs
    of distinct runs of the same setting (NaN with a single run)."""
    out: Dict[str, Dict[str, float]] = {}
    for a, ra in runs.items():
        out[a] = {}
        for b, rb in runs.items():
            vals = [d_distance(x, y) for i, x in enumerate(ra) for j, y in enumerate(rb)
                    if a != b or i < j]
            out[a][b] = float(np.mean(vals)) if vals else float("nan")
    return out


def difficulty_groups(d, num_groups: int = NUM_GROUPS) -> np.ndarray:
    """Eq. 4.32: group of each instance, ``floor(num_groups·d)`` clipped to ``num_groups − 1``
    (int (N,), −1 where d is NaN)."""
    d = _check_difficulty(d, "d")
    g = np.full(d.shape, -1, np.int64)
    ok = np.isfinite(d)
    g[ok] = np.minimum((d[ok] * num_groups).astype(np.int64), num_groups - 1)
    return g


def group_means(values, groups, num_groups: int = NUM_GROUPS, mask=None) -> np.ndarray:
    """Mean of ``values`` (..., N) within each group (groups (N,) from :func:`difficulty_groups`):
    (..., num_groups), NaN for an empty group. ``mask`` (N,) restricts the instances."""
    values = np.asarray(values, np.float64)
    groups = np.asarray(groups)
    keep = groups >= 0 if mask is None else (groups >= 0) & np.asarray(mask, bool)
    out = np.full(values.shape[:-1] + (num_groups,), np.nan)
    for i in range(num_groups):
        sel = keep & (groups == i)
        if sel.any():
            out[..., i] = values[..., sel].mean(-1)
    return out


def instance_statistics(loss_sum, correct_sum, count) -> Dict[str, np.ndarray]:
    """Per-instance averages of the training loop's sums: ``mean_loss`` ĝ, ``mean_error`` (average
    0-1 error), NaN where never visited; ``difficulty`` (eq. 4.30 from ĝ) and ``difficulty_01`` (the
    same from the 0-1 error, the alternative of Fig. 4.15)."""
    count = np.asarray(count, np.float64)
    seen = count > 0
    safe = np.where(seen, count, 1.0)
    mean_loss = np.where(seen, np.asarray(loss_sum, np.float64) / safe, np.nan)
    mean_error = np.where(seen, 1.0 - np.asarray(correct_sum, np.float64) / safe, np.nan)
    return {"mean_loss": mean_loss, "mean_error": mean_error, "count": count,
            "difficulty": difficulty_from_losses(mean_loss),
            "difficulty_01": difficulty_from_losses(mean_error)}


def summarize(stats: Dict[str, np.ndarray]) -> Dict[str, float]:
    """JSON summary of :func:`instance_statistics`: instances, visits, mean loss/error, and the
    correlation between the loss-based and the 0-1-based difficulty (thesis Fig. 4.15: 0.95)."""
    d, d01 = stats["difficulty"], stats["difficulty_01"]
    ok = np.isfinite(d) & np.isfinite(d01)
    corr = float(np.corrcoef(d[ok], d01[ok])[0, 1]) if ok.sum() > 1 and np.std(d01[ok]) > 0 \
        and np.std(d[ok]) > 0 else float("nan")
    c = stats["count"][stats["count"] > 0]
    return {"instances": int(ok.sum()), "visits_mean": float(c.mean()) if c.size else 0.0,
            "visits_min": int(c.min()) if c.size else 0,
            "mean_loss": float(np.nanmean(stats["mean_loss"])) if ok.any() else float("nan"),
            "mean_error": float(np.nanmean(stats["mean_error"])) if ok.any() else float("nan"),
            "loss_vs_01_correlation": corr}


def write_difficulty(workdir: str, stats: Dict[str, np.ndarray], extra: Optional[dict] = None,
                     prefix: str = "") -> Dict[str, float]:
    """Writes ``RUN/<prefix>difficulty.npy`` (float32, NaN where unknown), ``<prefix>instance_stats.npz``
    and ``<prefix>difficulty.json`` (:func:`summarize` + ``extra``) atomically; returns the summary."""
    def atomic(path, write):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)

    atomic(os.path.join(workdir, prefix + DIFFICULTY_FILE),
           lambda f: np.save(f, stats["difficulty"].astype(np.float32)))
    atomic(os.path.join(workdir, prefix + STATS_FILE),
           lambda f: np.savez_compressed(f, **{k: np.asarray(v, np.float32) for k, v in stats.items()}))
    summary = {**summarize(stats), **(extra or {})}
    from jaxrobust.train.metrics import round_floats
    atomic(os.path.join(workdir, prefix + SUMMARY_FILE),
           lambda f: f.write(json.dumps(round_floats(summary), indent=2).encode()))
    return summary


def load_difficulty(workdir: str, source: str = "") -> np.ndarray:
    """A run's difficulty: ``source=''`` the training-time one (``RUN/difficulty.npy``), otherwise that
    of a periodic per-instance evaluation source (``RUN/instance_eval/<source>.npz``, eq. 4.30 from its
    average loss over the evaluations)."""
    if not source:
        path = os.path.join(workdir, DIFFICULTY_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: train the run with "
                                    "--config.train.difficulty.enabled=True.")
        return np.load(path).astype(np.float64)
    hist = load_instance_history(workdir, source)
    mean = np.full(int(hist["num_indices"]), np.nan)
    mean[hist["index"]] = hist["loss"].mean(0)
    return difficulty_from_losses(mean)


def instance_eval_path(workdir: str, tag: str) -> str:
    return os.path.join(workdir, "instance_eval", tag.replace("/", "+").replace(":", "_") + ".npz")


def load_instance_history(workdir: str, tag: str) -> Dict[str, np.ndarray]:
    """The periodic per-instance evaluations of one source: ``steps`` (T,), ``index`` (N,) dataset
    indices, ``loss`` / ``correct`` (T, N), ``num_indices``."""
    path = instance_eval_path(workdir, tag)
    if not os.path.exists(path):
        have = sorted(os.listdir(os.path.dirname(path))) if os.path.isdir(os.path.dirname(path)) else []
        raise FileNotFoundError(f"{path} not found: the run has no per-instance evaluation {tag!r} "
                                f"(train.instance_eval.sources; it has {have}).")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


__all__ = ["difficulty_from_losses", "d_distance", "d_distance_matrix", "difficulty_groups",
           "group_means", "instance_statistics", "summarize", "write_difficulty", "load_difficulty",
           "load_instance_history", "instance_eval_path", "NUM_GROUPS", "DIFFICULTY_FILE"]
