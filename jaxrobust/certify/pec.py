"""Polyhedral Envelope Certification (thesis §3.3.1–3.3.2: Lemma 3.1, eqs 3.12–3.15, Algorithms 3.4–3.5).

The margin bounds of eq. (3.12), z_y(x') - z_i(x') >= U_i x' + p_i for x' in S_ε(x), define K-1
hyperplanes whose positive side is certified. PEC certifies the l_p ball of radius min(ε, d_y) where
d_y = min_{i≠y} d_iy and d_iy is the l_p distance from x to the hyperplane *inside the input box*
(problem 3.14). Algorithm 3.4 solves (3.14) by clipping and re-solving eq. (3.15); we solve it exactly
by sorting the break points of the same dual path (:func:`jaxrobust.bounds.geometry.min_norm_for_gain`),
for l_inf, l_2 and l_1 (l_1 is absent from the thesis's code).

With per-feature ε⃗ the distances are measured in the scaled norm ||Δ ⊘ ε⃗||_p (the threat's
``perturbation_norm``), so the radius is comparable with ``threat.eps``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxrobust.bounds import geometry
from jaxrobust.bounds.linear import MarginBounds, margin_bounds
from jaxrobust.threat import ThreatModel, lp_norm


def _flat(a):
    return a.reshape(a.shape[:2] + (-1,))


def _scale_and_box(x, threat: ThreatModel):
    scale = threat.per_feature_eps
    scale = jnp.ones_like(x) if scale is None else jnp.broadcast_to(jnp.asarray(scale, x.dtype), x.shape)
    lo, hi = threat.box_arrays(x)
    vlo, vhi = geometry.scaled_box(x, scale, lo, hi)
    return scale, vlo, vhi


def hyperplane_distances(mb: MarginBounds, x, y, threat: ThreatModel, *, use_box: bool = True):
    """d_iy of problem (3.14): min ||Δ||_p s.t. U_i (x + Δ) + p_i <= 0, x + Δ in the box. (B, K).

    0 where the hyperplane's condition already fails at x, +inf where the box never reaches the
    hyperplane (and for i = y)."""
    scale, vlo, vhi = _scale_and_box(x, threat)
    B, K = mb.lower.shape
    b = jnp.sum(_flat(mb.U) * x.reshape(B, 1, -1), axis=-1) + mb.p  # U_i x + p_i
    a = _flat(mb.U) * scale.reshape(B, 1, -1)  # gradient in the scaled coordinates v
    if use_box:
        w, c = geometry.descent_caps(a, vlo.reshape(B, 1, -1), vhi.reshape(B, 1, -1))
    else:
        w, c = jnp.abs(a), jnp.full_like(a, 1e15)
    d = geometry.min_norm_for_gain(w, c, b, threat.norm)
    return jnp.where(jax.nn.one_hot(y, K, dtype=bool), jnp.inf, d)


def signed_distances(mb: MarginBounds, x, y, norm: str):
    """(U_i x + p_i) / ||U_i||_q without the box: differentiable, negative on the wrong side (for
    PER training, §3.3.3). Row y is +inf."""
    B, K = mb.lower.shape
    b = jnp.sum(_flat(mb.U) * x.reshape(B, 1, -1), axis=-1) + mb.p
    dual = {"linf": "l1", "l2": "l2", "l1": "linf"}[norm]
    q = lp_norm(_flat(mb.U).reshape(B * K, -1), dual).reshape(B, K)
    d = b / jnp.maximum(q, 1e-12)
    return jnp.where(jax.nn.one_hot(y, K, dtype=bool), jnp.inf, d)


def pec_radius(mb: MarginBounds, x, y, threat: ThreatModel):
    """Lemma 3.1 with the box: certified radius min(ε, d_y) per example, (B,)."""
    d = hyperplane_distances(mb, x, y, threat)
    return jnp.minimum(threat.eps_for(x), jnp.min(d, axis=-1))


class Certificate(NamedTuple):
    certified: jax.Array  # (B,) all margin lower bounds > 0 at the budget ε (one-shot)
    radius: jax.Array  # (B,) certified radius: PEC min(ε, d_y) for linear methods, ε·certified for IBP
    lower: jax.Array  # (B, K) margin lower bounds


def certify(fn: Callable, x, y, threat: ThreatModel, *, method: str = "crown") -> Certificate:
    """One-shot certification at the threat's ε: bounds (method) + PEC radius (ACB in Table 3.6)."""
    mb = margin_bounds(fn, x, y, threat, method=method)
    is_y = jax.nn.one_hot(y, mb.lower.shape[-1], dtype=bool)
    certified = jnp.all(is_y | (mb.lower > 0), axis=-1)
    eps = threat.eps_for(x)
    if method == "ibp":  # U = 0: the envelope has no geometry, only the budget itself
        radius = jnp.where(certified, eps, 0.0)
    else:
        radius = jnp.where(certified, eps, pec_radius(mb, x, y, threat))
    return Certificate(certified, radius, mb.lower)


class EpsSearch(NamedTuple):
    radius: jax.Array  # (B,) certified radius (ε_low at the end: every value is sound)
    estimate: jax.Array  # (B,) Algorithm 3.5's output (ε_low + ε_up) / 2
    upper: jax.Array  # (B,) ε_up
    bound_computations: jax.Array  # (B,) number of bound computations (T_PEC or T_Lin of Table 3.9)


def optimal_eps_search(fn: Callable, x, y, threat: ThreatModel, *, eps_high: float, eps_low: float = 0.0,
                       tol: float = 1e-3, method: str = "crown", use_pec: bool = True,
                       max_iterations: int = 64) -> EpsSearch:
    """Algorithm 3.5 (``use_pec=True``) or plain binary search (``use_pec=False``, Fast-Lin/CROWN).

    Each iteration bounds every still-searching example at ε_try = (ε_low + ε_up)/2 (one batched
    bound computation, compiled once); PEC raises ε_low to the certified radius even when ε_try is not
    fully certified, so the interval at least halves every step and Alg. 3.5 never needs more
    bound computations than binary search. ``threat.eps`` is ignored (the search sets it).
    """
    threat.validate_inputs(x, y)
    if not (eps_high > eps_low >= 0 and tol > 0):
        raise ValueError(f"need eps_high > eps_low >= 0 and tol > 0, got {eps_high}, {eps_low}, {tol}")
    B = x.shape[0]
    dt = x.dtype

    def cert_at(eps_try):
        t = threat.replace(eps=eps_try)
        mb = margin_bounds(fn, x, y, t, method=method)
        is_y = jax.nn.one_hot(y, mb.lower.shape[-1], dtype=bool)
        ok = jnp.all(is_y | (mb.lower > 0), axis=-1)
        if use_pec and method != "ibp":
            return jnp.where(ok, eps_try, pec_radius(mb, x, y, t))
        return jnp.where(ok, eps_try, 0.0)

    def cond(s):
        lo, up, n, it = s
        return jnp.any(up - lo > tol) & (it < max_iterations)

    def body(s):
        lo, up, n, it = s
        active = up - lo > tol
        eps_try = 0.5 * (lo + up)
        cert = jnp.minimum(cert_at(eps_try), eps_try)
        lo2 = jnp.where(active, jnp.maximum(lo, cert), lo)
        up2 = jnp.where(active & (eps_try > cert), eps_try, up)
        return lo2, up2, n + active.astype(jnp.int32), it + 1

    init = (jnp.full((B,), eps_low, dt), jnp.full((B,), eps_high, dt), jnp.zeros((B,), jnp.int32),
            jnp.asarray(0))
    lo, up, n, _ = jax.lax.while_loop(cond, body, init)
    return EpsSearch(lo, 0.5 * (lo + up), up, n)


def certified_radius_curve(fn: Callable, x, y, threat: ThreatModel, eps_values, *, method: str = "crown"):
    """Certified radius of PEC and of the plain certifier as a function of the budget ε (Fig. 3.6).
    Returns (pec (E, B), plain (E, B))."""
    pecs, plains = [], []
    run = jax.jit(lambda e: certify(fn, x, y, threat.replace(eps=e), method=method))
    for e in eps_values:
        c = run(jnp.asarray(e, x.dtype))
        pecs.append(c.radius)
        plains.append(jnp.where(c.certified, e, 0.0))
    return jnp.stack(pecs), jnp.stack(plains)
