"""Per-layer keep counts of a pruned network (thesis §5.1.2, eq. 5.11).

Given the sizes ``n_1..n_L`` of the prunable layers (conv / dense kernels), a keep rate ``1 - r`` and
``γ ∈ [0, 1]``, the *adaptive pruning* strategy keeps ``m_i`` weights per layer with

    Σ m_i = (1 - r) Σ n_i,    m_1 / n_1^γ = m_2 / n_2^γ = ... = m_L / n_L^γ        (eq. 5.11)

and ``m_i ≤ n_i``: a layer whose share would exceed its size is kept whole and the rest of the budget is
re-shared among the other layers with the same rule (γ < 1 favours small layers, so the smallest
layers saturate first). ``γ = 1`` is the *fixed pruning rate* strategy (every layer keeps 1 - r of its
weights, Theorem 5.1); ``γ = 0`` the *fixed number of parameters* strategy (every layer not kept whole
keeps the same number, Theorem 5.2).

Two integer roundings:

- ``'exact'`` (default): the real-valued solution of eq. 5.11 with the caps (water-filling), rounded by
  largest remainders so that ``Σ m_i`` equals the budget ``floor((1 - r) Σ n_i)`` exactly; every layer
  keeps at least ``min_keep`` weights (a layer with none disconnects the network).
- ``'released'``: the rule of the authors' released code (``set_model_prune_rate``): layers in
  ascending size (stable), rate ``c·n^(γ-1)`` capped at 1, ``m_i = floor(rate·n_i)``, and ``c``
  recomputed from the remaining budget after every layer. On cResNet34 at 1% kept and γ = 0.1 it
  gives 212,649 weights in total, conv1 kept whole and the final fc 77.5% kept (the released code's
  printed check count; its masks then keep ``n - floor((1 - rate)·n)`` per layer, 36 more in total,
  because of float truncation; our masks keep exactly ``m_i``).

Pure Python / numpy on static integers: the counts are static shapes of the masks (jit-friendly).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

ROUNDINGS = ("exact", "released")


def _check(sizes: Sequence[int], keep_rate: float, gamma: float, rounding: str) -> List[int]:
    sizes = [int(n) for n in sizes]
    if not sizes:
        raise ValueError("allocate_keep_counts: no prunable layer (sizes is empty).")
    if any(n <= 0 for n in sizes):
        raise ValueError(f"layer sizes must be positive integers, got {sizes}.")
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or \
            not math.isfinite(keep_rate) or not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate (1 - pruning rate r) must be in (0, 1], got {keep_rate!r}.")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) \
            or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma (eq. 5.11) must be in [0, 1], got {gamma!r}.")
    if rounding not in ROUNDINGS:
        raise ValueError(f"Unknown rounding {rounding!r}; expected one of {ROUNDINGS}.")
    return sizes


def adaptive_shares(sizes: Sequence[int], keep_rate: float, gamma: float) -> np.ndarray:
    """Real-valued solution of eq. 5.11 with ``m_i <= n_i``: ``m_i = min(n_i, c·n_i^γ)`` where ``c``
    makes ``Σ m_i = keep_rate·Σ n_i`` (water-filling over the layers in ascending size). Shape (L,)."""
    sizes = _check(sizes, keep_rate, gamma, "exact")
    n = np.asarray(sizes, np.float64)
    budget = keep_rate * n.sum()
    order = np.argsort(n, kind="stable")
    shares = np.zeros_like(n)
    remaining = budget
    for pos, i in enumerate(order):
        rest = order[pos:]
        c = remaining / np.sum(n[rest] ** gamma)
        m = c * n[i] ** gamma
        if m >= n[i]:  # saturated: keep the whole layer, re-share the rest of the budget
            shares[i] = n[i]
            remaining -= n[i]
            continue
        # ratios c·n^(γ-1) decrease with n (γ <= 1): no larger layer saturates either
        shares[rest] = c * n[rest] ** gamma
        break
    return shares


def _released_counts(sizes: List[int], keep_rate: float, gamma: float) -> List[int]:
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    counts_sorted = [sizes[i] for i in order]
    total = int(keep_rate * np.sum(counts_sorted))
    c = keep_rate * np.sum(counts_sorted) / np.sum(np.power(counts_sorted, gamma))
    out = [0] * len(sizes)
    for pos, i in enumerate(order):
        rate = min(c * np.power(sizes[i], gamma - 1.0), 1.0)
        kept = int(rate * sizes[i])
        out[i] = kept
        total -= kept
        rest = counts_sorted[pos + 1:]
        if rest:
            c = total / np.sum(np.power(rest, gamma))
    return out


def allocate_keep_counts(sizes: Sequence[int], keep_rate: float, gamma: float = 1.0, *,
                         rounding: str = "exact", min_keep: int = 1) -> List[int]:
    """Weights kept per prunable layer (eq. 5.11; see the module docstring).

    Args:
      sizes: ``n_i``, the number of weights of each prunable layer (any order).
      keep_rate: ``1 - r`` in (0, 1] (the thesis's pruning rate r = 0.99 keeps 1%).
      gamma: γ in [0, 1]: 1 = fixed pruning rate, 0 = fixed number of parameters.
      rounding: ``'exact'`` (Σ m_i = floor(keep_rate·Σ n_i), every m_i >= min_keep) or ``'released'``
        (the authors' code, for comparison).
    Returns:
      ``[m_1, ..., m_L]`` (ints, ``0 <= m_i <= n_i``), aligned with ``sizes``.
    """
    sizes = _check(sizes, keep_rate, gamma, rounding)
    if rounding == "released":
        return _released_counts(sizes, keep_rate, gamma)
    n = np.asarray(sizes, np.int64)
    budget = int(math.floor(keep_rate * int(n.sum()) + 1e-9))
    min_keep = int(min_keep)
    floor_needed = int(np.minimum(n, min_keep).sum())
    if budget < floor_needed:
        raise ValueError(f"keep_rate {keep_rate} keeps {budget} weights, fewer than min_keep={min_keep} "
                         f"in each of the {len(sizes)} layers ({floor_needed}): raise keep_rate.")
    shares = adaptive_shares(sizes, keep_rate, gamma)
    shares = shares * (budget / shares.sum()) if shares.sum() > 0 else shares
    m = np.minimum(np.floor(shares + 1e-9).astype(np.int64), n)
    # largest remainders first (ties: the earlier layer), never above a layer's size
    frac = shares - m
    for i in sorted(range(len(sizes)), key=lambda i: (-frac[i], i)):
        if m.sum() >= budget:
            break
        if m[i] < n[i]:
            m[i] += 1
    while m.sum() < budget:  # only when remainders were all used up by saturated layers
        i = int(np.argmax(n - m))
        m[i] += 1
    # every layer keeps min_keep weights (or all of them); the difference is taken from the layers
    # with the most kept weights, one at a time, so the total stays the budget
    low = m < np.minimum(n, min_keep)
    deficit = int((np.minimum(n, min_keep) - m)[low].sum())
    m[low] = np.minimum(n, min_keep)[low]
    while deficit > 0:
        i = int(np.argmax(np.where(m > np.minimum(n, min_keep), m, -1)))
        m[i] -= 1
        deficit -= 1
    return [int(v) for v in m]


def keep_fractions(sizes: Sequence[int], counts: Sequence[int]) -> List[float]:
    """``m_i / n_i`` per layer."""
    return [int(m) / int(n) for m, n in zip(counts, sizes)]


__all__ = ["allocate_keep_counts", "adaptive_shares", "keep_fractions", "ROUNDINGS"]
