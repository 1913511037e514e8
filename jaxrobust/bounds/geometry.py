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

``c=None`` means "no box" (a static choice, made where the threat model has ``box=None``): both problems
then have the closed dual-norm form (Hölder: max_{||m||_p <= t} w·m = t ||w||_q) and no per-row
search runs. ``scaled_box``/``descent_caps`` pass ``None`` bounds through, so a caller writes the same
code with and without a box.

``max_capped_gain`` is the hot path of CROWN concretisation under l_2/l_1 (one row per neuron and
example, each over all input features), so it avoids sorting: l_2 runs Algorithm 3.4's own
clip-and-re-solve iteration on the KKT multiplier (monotone from below and exact once the capped set
stops changing, typically after a handful of passes), l_1 bisects the knapsack threshold on the bits
of its float32 value (exact after 32 passes). Both return the Lagrangian dual value at the multiplier
found, which is never below the maximum (sound for lower bounds in floating point) and equal to it at
the optimum; gradients follow from the dual by the envelope theorem (the search runs on
stop-gradient copies). Peak memory is the inputs w, c: no sorted copies.

Everything works on the last axis and broadcasts over leading axes; jit/vmap/grad-able.
"""
from __future__ import annotations

import jax
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
    """max Σ w m s.t. ||m||_p <= t, 0 <= m <= c (w, c >= 0; t >= 0 broadcast over leading axes).

    ``c=None``: no caps (no box), the dual norm t ||w||_q (eq. 3.7's Hölder step)."""
    t = jnp.asarray(t, w.dtype)
    if norm not in ("linf", "l2", "l1"):
        raise ValueError(f"unknown norm {norm!r}: expected 'linf', 'l2' or 'l1'")
    if c is None:
        if norm == "linf":
            return t * jnp.sum(w, axis=-1)
        if norm == "l2":
            return t * jnp.sqrt(jnp.sum(w * w, axis=-1))
        return t * jnp.max(w, axis=-1)
    t = jnp.broadcast_to(t, jnp.broadcast_shapes(t.shape, w.shape[:-1], c.shape[:-1]))
    if norm == "linf":
        return jnp.sum(w * jnp.minimum(t[..., None], c), axis=-1)
    if norm == "l1":
        return _l1_capped_gain(w, c, t)
    return _l2_capped_gain(w, c, t)


def _l2_capped_gain(w, c, t):
    """l_2: m_j(λ) = min(λ w_j, c_j) (KKT); λ* solves ||m(λ)|| = t unless every coordinate caps first.

    The search is Algorithm 3.4's clip-and-re-solve (Theorem 3.1) on the multiplier: with the set of
    coordinates capped at λ_k (c_j <= λ_k w_j) fixed, eq. (3.15)'s closed form gives
    λ_{k+1} = sqrt((t² - Σ_capped c²) / Σ_free w²). From λ_0 = 0 the iterates never pass λ* and grow
    until the capped set stops changing, at which point λ_k = λ* exactly; every step but the last caps
    at least one more coordinate, so it ends after at most n + 1 steps (in practice a handful). The
    value returned is the Lagrangian dual at λ: Σ w m(λ) + (t² - ||m(λ)||²) / (2λ) >= the maximum for
    every λ > 0 (sound) and equal to it at λ*."""
    ws, cs, ts = (jax.lax.stop_gradient(a) for a in (w, c, t))
    t2 = ts * ts
    n = w.shape[-1]

    def step(lam):
        capped = cs <= lam[..., None] * ws
        c2 = jnp.sum(jnp.where(capped, cs * cs, 0.0), axis=-1)
        w2 = jnp.sum(jnp.where(capped, 0.0, ws * ws), axis=-1)
        free = jnp.sqrt(jnp.maximum(t2 - c2, 0.0) / jnp.where(w2 > 0, w2, 1.0))
        return jnp.where(w2 > 0, free, jnp.inf)  # nothing left to grow: every movement is at its cap

    def cond(s):
        return (s[2] <= n) & jnp.any(s[1] > s[0])

    def body(s):
        _, lam, k = s
        return lam, jnp.maximum(lam, step(lam)), k + 1

    lam0 = jnp.zeros(ts.shape, w.dtype)
    _, lam, _ = jax.lax.while_loop(cond, body, (lam0, step(lam0), jnp.asarray(1)))
    saturated = jnp.isinf(lam)  # ||c|| <= t: every movement at its cap, gain Σ w c
    ok = (lam > 0) & ~saturated
    lam_s = jnp.where(ok, lam, 1.0)[..., None]
    m = jnp.where(saturated[..., None], c, jnp.minimum(lam_s * w, c))
    gain = jnp.sum(w * m, axis=-1)
    slack = (t * t - jnp.sum(m * m, axis=-1)) / (2.0 * lam_s[..., 0])
    return jnp.where(ok, gain + slack, jnp.where(saturated, gain, 0.0))


def _l1_capped_gain(w, c, t):
    """l_1 (fractional knapsack): the dual min_θ>=0 θ t + Σ c_j (w_j - θ)_+ is attained at the
    smallest θ in {0} ∪ {w_j} with Σ_{w_j > θ} c_j <= t (the steepest coordinates are used up first).
    That θ is a float, and the condition is monotone in θ, so bisection on the bits of non-negative
    floats (ordered like their integer bit patterns) finds it exactly, in at most 32 passes for float32
    (64 for float64), none where the steepest coordinates absorb the whole budget (no box). The dual
    value at any θ is >= the maximum (sound)."""
    if w.dtype not in (jnp.float32, jnp.float64):
        return _l1_capped_gain(*(a.astype(jnp.float32) for a in (w, c, t))).astype(w.dtype)
    ibits, steps = (jnp.int32, 32) if w.dtype == jnp.float32 else (jnp.int64, 64)
    ws, cs, ts = (jax.lax.stop_gradient(a) for a in (w, c, t))

    def feasible(theta):  # Σ_{w_j > θ} c_j <= t: the budget reaches down to θ
        return jnp.sum(jnp.where(ws > theta[..., None], cs, 0.0), axis=-1) <= ts

    wmax = jnp.max(ws, axis=-1)
    hi = jax.lax.bitcast_convert_type(wmax, ibits)  # θ = max w is always feasible
    # Where the steepest coordinates alone can absorb the budget (always without a box: caps 1e15),
    # θ = max w is the answer and the row starts closed; the loop ends once every row is closed.
    steepest_absorb = jnp.sum(jnp.where(ws >= wmax[..., None], cs, 0.0), axis=-1) > ts
    lo = jnp.where(steepest_absorb & (hi > 0), hi - 1, -1)  # θ(lo) infeasible (or lo = -1), θ(hi) feasible

    def body(s):
        lo, hi, k = s
        mid = lo + (hi - lo) // 2  # in (lo, hi) while hi - lo >= 2, so >= 0
        open_ = hi - lo >= 2
        f = feasible(jax.lax.bitcast_convert_type(jnp.maximum(mid, 0), w.dtype))
        return jnp.where(open_ & ~f, mid, lo), jnp.where(open_ & f, mid, hi), k + 1

    _, hi, _ = jax.lax.while_loop(lambda s: (s[2] < steps) & jnp.any(s[1] - s[0] >= 2), body,
                                  (lo, hi, jnp.asarray(0)))
    theta = jax.lax.bitcast_convert_type(hi, w.dtype)
    th = theta[..., None]
    # The dual is not differentiable in w_j at the threshold coordinate(s) w_j = θ (θ moves with them);
    # their primal movement (the budget left after the steeper ones, shared in proportion to the
    # caps among ties) is d gain / d w_j, added as a zero-valued term.
    at = ws == th
    rem = ts - jnp.sum(jnp.where(ws > th, cs, 0.0), axis=-1)
    tie = jnp.sum(jnp.where(at, cs, 0.0), axis=-1)
    share = jnp.minimum(rem / jnp.where(tie > 0, tie, 1.0), 1.0)[..., None]
    m_at = jnp.where(at, cs * share, 0.0)
    return (theta * t + jnp.sum(jnp.where(ws > th, c * (w - th), 0.0), axis=-1)
            + jnp.sum((w - ws) * m_at, axis=-1))


def min_norm_for_gain(w, c, b, norm: str):
    """min ||m||_p s.t. Σ w m >= b, 0 <= m <= c; 0 where b <= 0, +inf where infeasible (the box
    does not reach the hyperplane: no adversarial example exists for this hyperplane).

    ``c=None``: no caps (no box), the closed form b / ||w||_q (Hölder; +inf where w = 0)."""
    if norm not in ("linf", "l2", "l1"):
        raise ValueError(f"unknown norm {norm!r}: expected 'linf', 'l2' or 'l1'")
    if c is None:
        b = jnp.asarray(b, w.dtype)
        q = {"linf": lambda v: jnp.sum(v, axis=-1), "l2": lambda v: jnp.sqrt(jnp.sum(v * v, axis=-1)),
             "l1": lambda v: jnp.max(v, axis=-1)}[norm](w)
        d = jnp.where(q > 0, b / jnp.where(q > 0, q, 1.0), jnp.inf)
        return jnp.where(b <= 0, 0.0, d)
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
    return jnp.where(b <= 0, 0.0, d)[..., 0]


def descent_caps(a, lo, hi):
    """Weights |a| and caps of the movement along -sign(a) inside [lo, hi] (lo <= 0 <= hi).
    ``lo = hi = None`` (no box): caps None, for the closed forms of the two solvers."""
    w = jnp.abs(a)
    if lo is None and hi is None:
        return w, None
    c = jnp.where(a > 0, -lo, jnp.where(a < 0, hi, 0.0))
    # Unbounded directions get a large finite cap so that sorted cumulative sums never see inf - inf.
    return w, jnp.clip(c, 0.0, 1e15)


def scaled_box(x, scale, lo, hi):
    """Box of v in x' = x + scale ⊙ v for lo <= x' <= hi: (vlo, vhi), finite (±1e15 where unbounded)
    and with finite gradients (the double ``where`` keeps inf out of both branches' derivatives).
    ``lo = hi = None`` (no box): returns (None, None)."""
    if lo is None and hi is None:
        return None, None
    if lo is None or hi is None:
        raise ValueError("scaled_box needs both box bounds or neither (None, None for no box)")
    pos = scale > 0
    safe = jnp.where(pos, scale, 1.0)

    def side(bound, default):
        finite = jnp.isfinite(bound) & pos
        b = jnp.where(finite, bound, 0.0)
        return jnp.where(finite, (b - x) / safe, jnp.where(pos, default, 0.0))

    return side(lo, -1e15), side(hi, 1e15)
