"""Square attack (Andriushchenko et al., ECCV 2020): score-based, gradient-free; Table 4.2's
Square5K and AutoAttack's fourth attack.

Random-search over square-shaped updates with the margin loss z_y - max_{i≠y} z_i (minimised). The
square side follows AutoAttack's p schedule with ``resc_schedule=False`` (p halves at queries 10, 50,
200, 500, 1000, 2000, 4000, 6000, 8000 from p_init = 0.8). The loop is a fixed-shape `fori_loop`;
points already fooled are masked (their queries are not counted and they no longer move), so only
still-robust points are effectively queried. NHWC images only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrobust.attacks import losses
from jaxrobust.attacks.common import _bcast
from jaxrobust.threat import ThreatModel

_P_BREAKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, it):
    """AutoAttack's schedule (resc_schedule=False): p_init / 2^j after the j-th breakpoint."""
    j = sum(jnp.where(it > b, 1, 0) for b in _P_BREAKS)
    return p_init / (2.0 ** j)


def _square_side(p, h, w, c):
    s = jnp.round(jnp.sqrt(p * h * w * c / c)).astype(jnp.int32)
    return jnp.clip(s, 1, h - 1)


def _window_mask(key, h, w, s):
    """A random s x s window mask (H, W), shared by the batch as in the reference code."""
    k1, k2 = jax.random.split(key)
    vh = jax.random.randint(k1, (), 0, h - s + 1)
    vw = jax.random.randint(k2, (), 0, w - s + 1)
    rows = jnp.arange(h)
    cols = jnp.arange(w)
    return ((rows >= vh) & (rows < vh + s))[:, None] & ((cols >= vw) & (cols < vw + s))[None, :], vh, vw


def square(logits_fn, x, y, key, threat: ThreatModel, *, n_queries: int = 5000,
           p_init: float = 0.8, return_queries: bool = False):
    """Untargeted Square attack for l_inf and l_2 (ε scalar or per example; box respected).

    Args: x (B, H, W, C) in the box; y (B,). Returns x_adv (and the number of queries per example
    when ``return_queries``). The model is only queried, never differentiated.
    """
    if threat.norm not in ("linf", "l2"):
        raise ValueError(f"Square attack supports 'linf' and 'l2', got {threat.norm!r}.")
    if x.ndim != 4:
        raise ValueError(f"Square attack needs NHWC images, got shape {x.shape}.")
    threat.validate_inputs(x, y)
    b, h, w, c = x.shape
    eps = threat.eps_for(x)
    lo, hi = threat.box_arrays(x)

    def margin_of(xa):
        return losses.margin(jax.lax.stop_gradient(logits_fn(xa)), y)

    k_init, k_loop = jax.random.split(key)
    if threat.norm == "linf":
        # vertical stripes of ±ε
        stripes = jax.random.choice(k_init, jnp.array([-1.0, 1.0]), (b, 1, w, c))
        x_best = jnp.clip(x + _bcast(eps, x) * stripes, lo, hi)
    else:
        # l2 init: a grid of pseudo-gaussian blocks with random signs, rescaled to norm ε
        delta = jax.random.normal(k_init, x.shape)
        delta = delta / jnp.sqrt(jnp.sum(delta ** 2, axis=(1, 2, 3), keepdims=True))
        x_best = jnp.clip(x + _bcast(eps, x) * delta, lo, hi)
    margin_min = margin_of(x_best)
    queries = jnp.ones((b,), jnp.int32)

    def body(i, carry):
        x_best, margin_min, queries = carry
        active = margin_min > 0
        k = jax.random.fold_in(k_loop, i)
        k_win, k_sign, k_win2 = jax.random.split(k, 3)
        p = p_selection(p_init, i)
        s = _square_side(p, h, w, c)
        win, _, _ = _window_mask(k_win, h, w, s)
        win = win[None, :, :, None]
        if threat.norm == "linf":
            signs = jax.random.choice(k_sign, jnp.array([-1.0, 1.0]), (b, 1, 1, c))
            x_new = jnp.where(win, x + _bcast(eps, x) * signs, x_best)
            x_new = jnp.clip(x_new, jnp.maximum(lo, x - _bcast(eps, x)),
                             jnp.minimum(hi, x + _bcast(eps, x)))
        else:
            # l2 (a simplified form of the reference's update): the energy of two windows is
            # re-spent on a fresh random-sign, centre-weighted bump in the first one, so the
            # perturbation keeps l2 norm ε. The reference uses meta-pseudo-Gaussian bumps.
            delta = x_best - x
            win2, _, _ = _window_mask(k_win2, h, w, s)
            win2 = win2[None, :, :, None]
            both = win | win2
            norm_rest = jnp.sqrt(jnp.sum(jnp.where(both, 0.0, delta) ** 2, axis=(1, 2, 3)))
            budget = jnp.sqrt(jnp.maximum(eps ** 2 - norm_rest ** 2, 0.0))
            signs = jax.random.choice(k_sign, jnp.array([-1.0, 1.0]), (b, 1, 1, c))
            rr = jnp.arange(h)[:, None]
            cc = jnp.arange(w)[None, :]
            bump = win[..., 0] * 1.0 / (1.0 + jnp.abs(rr - rr.mean()) + jnp.abs(cc - cc.mean()))
            new_part = signs * bump[..., None]
            new_part = new_part / jnp.maximum(
                jnp.sqrt(jnp.sum(new_part ** 2, axis=(1, 2, 3), keepdims=True)), 1e-12)
            delta_new = jnp.where(both, 0.0, delta) + _bcast(budget, x) * new_part
            # ||delta_new|| <= ε by construction; clipping to the box (x is inside it) only
            # shrinks coordinates, so it stays in the ball: no bisection needed per query.
            x_new = jnp.clip(x + delta_new, lo, hi)
        m_new = margin_of(x_new)
        improved = active & (m_new < margin_min)
        x_best = jnp.where(_bcast(improved, x), x_new, x_best)
        margin_min = jnp.where(improved, m_new, margin_min)
        queries = queries + active.astype(jnp.int32)
        return x_best, margin_min, queries

    x_best, margin_min, queries = jax.lax.fori_loop(0, n_queries - 1, body,
                                                    (x_best, margin_min, queries))
    # Points clean-misclassified need no perturbation.
    clean_wrong = margin_of(x) <= 0
    x_best = jnp.where(_bcast(clean_wrong, x), x, x_best)
    if return_queries:
        return x_best, jnp.where(clean_wrong, 0, queries)
    return x_best
