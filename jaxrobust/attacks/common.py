"""Shared attack pieces: steepest-ascent steps per norm and keep-best bookkeeping."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrobust.threat import ThreatModel, lp_norm


def _bcast(v, x):
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def steepest_ascent_step(grad, x, x0, threat: ThreatModel, step_size, l1_sparsity: float = 0.95):
    """Normalised steepest-ascent direction for the threat's norm, scaled by ``step_size`` (B,)
    (in units of the budget's norm, scaled by ε⃗ when per-feature budgets are set).

    l_inf: sign(g). l_2: g / ||g||_2. l_1: the sparse step of APGD-L1/SLIDE: only the top
    (1 - l1_sparsity) fraction of coordinates by |g| that can still move inside the box, sign(g) on
    them, normalised to unit l_1 norm (a dense sign step would waste the l_1 budget).
    """
    pf = threat.per_feature_eps
    g = grad if pf is None else grad * jnp.asarray(pf, grad.dtype)  # steepest ascent in scaled space
    if threat.norm == "linf":
        d = jnp.sign(g)
    elif threat.norm == "l2":
        d = g / jnp.maximum(_bcast(lp_norm(g, "l2"), g), 1e-12)
    else:
        flat = g.reshape(g.shape[0], -1)
        if threat.box is not None:
            xf = x.reshape(x.shape[0], -1)
            movable = ~(((xf <= threat.box[0]) & (flat < 0)) | ((xf >= threat.box[1]) & (flat > 0)))
            flat = jnp.where(movable, flat, 0.0)
        n = flat.shape[1]
        k = max(1, int(round((1.0 - l1_sparsity) * n)))
        thresh = jax.lax.top_k(jnp.abs(flat), k)[0][:, -1:]
        sel = (jnp.abs(flat) >= thresh) & (flat != 0)
        d = jnp.where(sel, jnp.sign(flat), 0.0)
        d = d / jnp.maximum(jnp.sum(jnp.abs(d), axis=1, keepdims=True), 1.0)
        d = d.reshape(g.shape)
    if pf is not None:
        d = d * jnp.asarray(pf, d.dtype)
    return x + _bcast(step_size, x) * d


def update_best(best_x, best_val, x, val):
    """Keeps, per example, the point with the larger objective value."""
    better = val > best_val
    return jnp.where(_bcast(better, x), x, best_x), jnp.where(better, val, best_val)
