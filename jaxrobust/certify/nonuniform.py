"""Non-uniform certified regions (thesis §3.2.1, problem 3.9–3.11, Algorithm 3.3).

Find the largest-volume region S_ε⃗ = {ε⃗ ⊙ v : ||v||_p <= 1} (volume ∝ Π ε⃗_i) in which every margin
lower bound is at least δ:  min_ε⃗ -Σ log ε⃗_i  s.t.  d(ε⃗) := lower(z_y - z_j) - δ >= 0.
Augmented Lagrangian (3.11) with the slack's closed form c = max(0, d + λ/ρ); ε⃗ = ζ² keeps ε⃗
positive; the inner minimisation takes Adam steps on ζ with the gradient rescaled to a maximum l_2
norm; ρ grows geometrically (non-decreasing, bounded); λ ← λ + ρ (d - c). A final loop shrinks ε⃗ by
η (0.99) until every constraint holds, so the output is always certified. ``uniform=True`` optimises
one scalar per example (ε⃗ = ζ² 1): the uniform bound of Table 3.2.

The margin bounds use elision of the last layer (tighter than the thesis's z̲_y - z̄_j).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from jaxrobust.bounds.linear import margin_bounds
from jaxrobust.certify.pec import check_entry_point
from jaxrobust.threat import ThreatModel


class NonUniformResult(NamedTuple):
    eps: jax.Array  # (B, *f) certified per-feature radii ε⃗ (uniform: all equal)
    eps_avg: jax.Array  # (B,) geometric mean (Π ε⃗_i)^(1/M)
    certified: jax.Array  # (B,) every margin bound >= δ at the returned ε⃗
    shrink_steps: jax.Array  # (B,) iterations of the final η-loop


def _margins(fn, x, y, eps_vec, norm, box, method, delta):
    t = ThreatModel(norm, 1.0, per_feature_eps=eps_vec, box=box)
    mb = margin_bounds(fn, x, y, t, method=method)
    is_y = jax.nn.one_hot(y, mb.lower.shape[-1], dtype=bool)
    return jnp.where(is_y, jnp.inf, mb.lower - delta), is_y


def nonuniform_bounds(fn: Callable, x, y, *, norm: str = "linf", box=(0.0, 1.0), eps0: float = 0.01,
                      init: Optional[jax.Array] = None, iterations: int = 300, lr: Optional[float] = None,
                      rho0: float = 1.0, rho_growth: float = 1.03, rho_max: float = 100.0,
                      delta: float = 1e-4, eta: float = 0.99, max_grad_norm: float = 1.0,
                      method: str = "crown", uniform: bool = False,
                      max_shrink: int = 3000, fallback: Optional[jax.Array] = None) -> NonUniformResult:
    """Algorithm 3.3 for a batch (B, *f); jit-able (static: norm, box, method, iterations, uniform).

    Args:
      eps0: initial radius of every feature (ε⃗_0 = eps0 · 1) unless ``init`` (B,*f) or (*f) is given
        (e.g. the mean direction of earlier bounding maps, as the thesis suggests, or the uniform
        solution).
      fallback: optional certified ε⃗ (B,*f) (e.g. the uniform solution, which is feasible for the
        non-uniform problem); kept for an example when its volume is larger than the optimised one.
      delta: δ of (3.9), the required margin lower bound.
      lr: Adam step on the scaled ζ (default 0.02 uniform, 0.005 non-uniform).
    """
    check_entry_point("nonuniform_bounds", fn, x, y, ThreatModel(norm, eps0, box=box))
    dt = x.dtype
    B = x.shape[0]
    feat = x.shape[1:]
    if init is not None and jnp.shape(init) not in ((B,) + tuple(feat), tuple(feat)):
        raise ValueError(f"nonuniform_bounds: init must have shape {(B,) + tuple(feat)} or {tuple(feat)}, "
                         f"got {jnp.shape(init)}.")
    if fallback is not None:
        chex.assert_shape(fallback, (B,) + tuple(feat))
    if init is None:
        eps_init = jnp.full((B,) + feat, eps0, dt)
    else:
        eps_init = jnp.broadcast_to(jnp.asarray(init, dt), (B,) + feat)
    # ε⃗ = (s ζ)² with a per-example scale s = sqrt(geometric mean of ε⃗_0) and ζ initialised near 1:
    # Adam's steps have a fixed size in parameter space, so without s examples whose radius is 1e-4
    # and 1e-1 would need learning rates 1000x apart.
    log_init = jnp.log(jnp.maximum(eps_init.reshape(B, -1), 1e-30))
    s = jnp.sqrt(jnp.exp(jnp.mean(log_init, axis=1)))[:, None]
    if uniform:
        zeta0 = jnp.ones((B, 1), dt)
    else:
        zeta0 = jnp.sqrt(jnp.exp(log_init)) / s
    M = int(jnp.size(x[0]))

    def eps_of(zeta):
        e = (s * zeta) ** 2
        return jnp.broadcast_to(e, (B, M)).reshape((B,) + feat)

    def lagrangian(zeta, lam, rho):
        eps_vec = eps_of(zeta)
        d, is_y = _margins(fn, x, y, eps_vec, norm, box, method, delta)
        d = jnp.where(is_y, 0.0, d)
        c = jnp.maximum(0.0, d + lam / rho)
        c = jnp.where(is_y, 0.0, c)
        # -Σ log ε over all M features (uniform: M log ε) so both cases optimise the same volume
        vol = -jnp.sum(jnp.log(eps_vec.reshape(B, -1)), axis=1)
        per_ex = vol + jnp.sum(lam * (d - c), -1) + 0.5 * rho * jnp.sum((d - c) ** 2, -1)
        return jnp.sum(per_ex), (d, c)

    # Adam on ζ with per-example gradient rescaling (gradient explosion when ε or ρ is large).
    # One scalar per example (uniform) tolerates larger steps than M coupled ones.
    opt = optax.adam(lr if lr is not None else (0.02 if uniform else 0.005))

    def step(carry, i):
        zeta, lam, ostate = carry
        rho = jnp.minimum(rho0 * rho_growth ** i, rho_max)
        (_, (d, c)), g = jax.value_and_grad(lagrangian, has_aux=True)(zeta, lam, rho)
        gn = jnp.linalg.norm(g, axis=1, keepdims=True)
        g = g * jnp.minimum(1.0, max_grad_norm / jnp.maximum(gn, 1e-12))
        upd, ostate = opt.update(g, ostate, zeta)
        zeta = zeta + upd
        # dual ascent with the new ε⃗ (line 6 of Alg. 3.3)
        _, (d, c) = lagrangian(zeta, lam, rho)
        lam = lam + rho * (d - c)
        return (zeta, lam, ostate), None

    lam0 = jnp.zeros((B, _num_classes(fn, x)), dt)
    (zeta, lam, _), _ = jax.lax.scan(step, (zeta0, lam0, opt.init(zeta0)), jnp.arange(iterations, dtype=dt))
    eps_vec = eps_of(zeta)

    # Lines 8-10: shrink by η until every constraint holds (per example).
    def ok_of(e):
        d, _ = _margins(fn, x, y, e, norm, box, method, delta)
        return jnp.all(d >= 0, axis=-1)

    def cond(s):
        e, ok, n, it = s
        return jnp.any(~ok) & (it < max_shrink)

    def body(s):
        e, ok, n, it = s
        e = jnp.where(ok.reshape((B,) + (1,) * len(feat)), e, eta * e)
        n = n + (~ok).astype(jnp.int32)
        return e, ok_of(e), n, it + 1

    eps_vec, ok, n, _ = jax.lax.while_loop(cond, body, (eps_vec, ok_of(eps_vec), jnp.zeros((B,), jnp.int32), 0))
    eps_vec = jnp.where(ok.reshape((B,) + (1,) * len(feat)), eps_vec, 0.0)
    eps_avg = jnp.exp(jnp.mean(jnp.log(jnp.maximum(eps_vec.reshape(B, -1), 1e-30)), axis=1))
    eps_avg = jnp.where(ok, eps_avg, 0.0)
    if fallback is not None:
        fb = jnp.broadcast_to(jnp.asarray(fallback, dt), (B,) + feat)
        fb_ok = ok_of(jnp.maximum(fb, 1e-30)) & jnp.all(fb.reshape(B, -1) > 0, axis=1)
        fb_avg = jnp.where(fb_ok, jnp.exp(jnp.mean(jnp.log(jnp.maximum(fb.reshape(B, -1), 1e-30)), 1)), 0.0)
        use_fb = fb_avg > eps_avg
        eps_vec = jnp.where(use_fb.reshape((B,) + (1,) * len(feat)), fb, eps_vec)
        eps_avg = jnp.maximum(eps_avg, fb_avg)
        ok = ok | fb_ok
    return NonUniformResult(eps_vec, eps_avg, ok, n)


def _num_classes(fn, x):
    return jax.eval_shape(fn, x).shape[-1]


def cosine_similarity_stats(eps_vecs, mask=None):
    """Mean and minimum pairwise cosine similarity of bounding maps ε⃗ (Table 3.3). (N, *f) ->
    (mean, min) over pairs i < j of the rows selected by ``mask``."""
    v = eps_vecs.reshape(eps_vecs.shape[0], -1)
    if mask is not None:
        v = v[jnp.asarray(mask)]
    n = v.shape[0]
    if n < 2:
        return float("nan"), float("nan")
    u = v / jnp.maximum(jnp.linalg.norm(v, axis=1, keepdims=True), 1e-30)
    s = u @ u.T
    iu = jnp.triu_indices(n, k=1)
    pairs = s[iu]
    return float(jnp.mean(pairs)), float(jnp.min(pairs))
