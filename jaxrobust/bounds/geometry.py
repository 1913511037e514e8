"""Exact l_p geometry of linear functions over an l_p ball intersected with a box.

Both questions reduce to the same capped problem over "movements" m_j >= 0 along the descent
direction of a linear function with weights w_j = |a_j|, where the box caps m_j <= c_j:

* ``max_capped_gain(w, c, t, norm)``: max Σ w_j m_j  s.t. ||m||_p <= t, 0 <= m <= c. This is
  the worst-case decrease of <a, Δ> over {||Δ||_p <= t} ∩ box, used to concretise linear bounds
  (for l_inf it is the usual interval rule; l_2 and l_1 are exact here, not only the dual norm).
* ``min_norm_for_gain(w, c, b, norm)``: min ||m||_p s.t. Σ w_j m_j >= b, 0 <= m <= c. This is problem
  (3.14) of the thesis (distance from x to the hyperplane a·Δ + b = 0 inside the box). Algorithm 3.4
  approaches its optimum by clipping and re-solving eq. (3.15) repeatedly (Theorem 3.1); here the
  optimum is found in one shot by sorting the break points of the same dual path, so there is no
  iteration cap, and l_1 (absent from the thesis's code) is the fractional-knapsack greedy.

Everything works on the last axis and broadcasts over leading axes; jit/vmap/grad-able.
"""
from __future__ import annotations

import jax.numpy as jnp

_BIG = 1e30


def _exclusive_cumsum(a):
    """Σ_{j<k} a_j along the last axis, without the cancellation of ``cumsum(a) - a`` once a huge
    entry (an unbounded cap) has been summed."""
    c = jnp.cumsum(a, axis=-1)
    return jnp.concatenate([jnp.zeros_like(c[..., :1]), c[..., :-1]], axis=-1)


def _sorted_by(key, *arrays):
    order = jnp.argsort(key, axis=-1)
    return [jnp.take_along_axis(a, order, axis=-1) for a in (key,) + arrays]


def max_capped_gain(w, c, t, norm: str):
    """max Σ w m s.t. ||m||_p <= t, 0 <= m <= c (w, c >= 0; t >= 0 broadcast over leading axes)."""
    t = jnp.asarray(t, w.dtype)[..., None]
    if norm == "linf":
        return jnp.sum(w * jnp.minimum(t, c), axis=-1)
    if norm == "l1":
        # Greedy: spend the budget on the steepest coordinates first (fractional knapsack).
        _, cs, ws = _sorted_by(-w, c, w)
        spent_before = _exclusive_cumsum(cs)
        m = jnp.clip(t - spent_before, 0.0, cs)
        return jnp.sum(ws * m, axis=-1)
    if norm == "l2":
        # m_j(λ) = min(λ w_j, c_j); ||m(λ)||² grows with λ; coordinates cap at λ_j = c_j / w_j.
        lam_j = jnp.where(w > 0, c / jnp.where(w > 0, w, 1.0), _BIG)
        lam_s, cs, ws = _sorted_by(lam_j, c, w)
        c2_before = _exclusive_cumsum(cs ** 2)  # capped mass before each break point
        w2_from = jnp.flip(jnp.cumsum(jnp.flip(ws ** 2, -1), -1), -1)  # free mass from it on
        # ||m||² at break point k (coordinates < k capped, others free at λ = lam_k).
        norm2_at = c2_before + jnp.minimum(lam_s, _BIG ** 0.5) ** 2 * w2_from
        k = jnp.sum(norm2_at <= t ** 2, axis=-1, keepdims=True)  # break points inside the ball
        n = w.shape[-1]
        idx = jnp.minimum(k, n - 1)
        c2_k = jnp.where(k < n, jnp.take_along_axis(c2_before, idx, -1), jnp.sum(cs ** 2, -1, keepdims=True))
        w2_k = jnp.where(k < n, jnp.take_along_axis(w2_from, idx, -1), 0.0)
        gain_capped = jnp.sum(jnp.where(jnp.arange(n) < k, ws * cs, 0.0), axis=-1, keepdims=True)
        lam = jnp.sqrt(jnp.maximum(t ** 2 - c2_k, 0.0) / jnp.where(w2_k > 0, w2_k, 1.0))
        return (gain_capped + jnp.where(w2_k > 0, lam * w2_k, 0.0))[..., 0]
    raise ValueError(f"unknown norm {norm!r}")


def min_norm_for_gain(w, c, b, norm: str):
    """min ||m||_p s.t. Σ w m >= b, 0 <= m <= c; 0 where b <= 0, +inf where infeasible (the box
    does not reach the hyperplane: no adversarial example exists for this hyperplane)."""
    b = jnp.asarray(b, w.dtype)[..., None]
    n = w.shape[-1]
    if norm == "linf":
        # G(t) = Σ w min(t, c) is piecewise linear in t with break points at the caps.
        cs, ws = _sorted_by(c, w)
        w_from = jnp.flip(jnp.cumsum(jnp.flip(ws, -1), -1), -1)  # Σ_{j>=k} w_j
        gain_before = _exclusive_cumsum(ws * cs)  # Σ_{j<k} w_j c_j
        g_at = gain_before + cs * w_from  # G(c_k)
        k = jnp.sum(g_at < b, axis=-1, keepdims=True)  # segments fully used
        idx = jnp.minimum(k, n - 1)
        gb, wf = jnp.take_along_axis(gain_before, idx, -1), jnp.take_along_axis(w_from, idx, -1)
        t = (b - gb) / jnp.where(wf > 0, wf, 1.0)
        d = jnp.where((k < n) & (wf > 0), t, jnp.inf)
    elif norm == "l1":
        _, cs, ws = _sorted_by(-w, c, w)
        gain_cum = jnp.cumsum(ws * cs, -1)
        k = jnp.sum(gain_cum < b, axis=-1, keepdims=True)  # coordinates used up completely
        idx = jnp.minimum(k, n - 1)
        spent = jnp.take_along_axis(_exclusive_cumsum(cs), idx, -1)
        gain_before = jnp.take_along_axis(_exclusive_cumsum(ws * cs), idx, -1)
        wk = jnp.take_along_axis(ws, idx, -1)
        d = jnp.where((k < n) & (wk > 0), spent + (b - gain_before) / jnp.where(wk > 0, wk, 1.0), jnp.inf)
    elif norm == "l2":
        lam_j = jnp.where(w > 0, c / jnp.where(w > 0, w, 1.0), _BIG)
        lam_s, cs, ws = _sorted_by(lam_j, c, w)
        gain_before = _exclusive_cumsum(ws * cs)
        c2_before = _exclusive_cumsum(cs ** 2)
        w2_from = jnp.flip(jnp.cumsum(jnp.flip(ws ** 2, -1), -1), -1)
        finite = lam_s < _BIG
        g_at = jnp.where(finite, gain_before + lam_s * w2_from, jnp.inf)  # gain at break point k
        k = jnp.sum(g_at < b, axis=-1, keepdims=True)
        idx = jnp.minimum(k, n - 1)
        gb = jnp.take_along_axis(gain_before, idx, -1)
        c2 = jnp.take_along_axis(c2_before, idx, -1)
        w2 = jnp.take_along_axis(w2_from, idx, -1)
        ok = (k < n) & (w2 > 0) & jnp.take_along_axis(finite, idx, -1)
        lam = (b - gb) / jnp.where(w2 > 0, w2, 1.0)
        d = jnp.where(ok, jnp.sqrt(jnp.maximum(c2 + lam ** 2 * w2, 0.0)), jnp.inf)
    else:
        raise ValueError(f"unknown norm {norm!r}")
    return jnp.where(b <= 0, 0.0, d)[..., 0]


def descent_caps(a, lo, hi):
    """Weights |a| and caps of the movement along -sign(a) inside [lo, hi] (lo <= 0 <= hi)."""
    w = jnp.abs(a)
    c = jnp.where(a > 0, -lo, jnp.where(a < 0, hi, 0.0))
    # Unbounded directions get a large finite cap so that sorted cumulative sums never see inf - inf.
    return w, jnp.clip(c, 0.0, 1e15)


def scaled_box(x, scale, lo, hi):
    """Box of v in x' = x + scale ⊙ v for lo <= x' <= hi: (vlo, vhi), finite (±1e15 where unbounded)
    and with finite gradients (the double ``where`` keeps inf out of both branches' derivatives)."""
    pos = scale > 0
    safe = jnp.where(pos, scale, 1.0)

    def side(bound, default):
        finite = jnp.isfinite(bound) & pos
        b = jnp.where(finite, bound, 0.0)
        return jnp.where(finite, (b - x) / safe, jnp.where(pos, default, 0.0))

    return side(lo, -1e15), side(hi, 1e15)
