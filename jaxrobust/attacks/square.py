"""Square attack (Andriushchenko et al., ECCV 2020): score-based, gradient-free; Table 4.2's
Square5K and AutoAttack's fourth attack.

Random-search over square-shaped updates with the margin loss z_y - max_{i≠y} z_i (minimised). The
square side follows AutoAttack's p schedule with ``resc_schedule=False`` (p halves at queries 10, 50,
200, 500, 1000, 2000, 4000, 6000, 8000 from p_init = 0.8). The loop is a fixed-shape `fori_loop`;
points already fooled are masked (their queries are not counted and they no longer move), so only
still-robust points are effectively queried. The l_2 version follows the reference's
meta-pseudo-Gaussian windows; window sizes are traced values, so windows are masks.

Inputs are NHWC images ``(B, H, W, C)`` or flat vectors ``(B, d)``. The reference implementation
only handles images; a vector is treated here as a ``1 x d x 1`` image whose "square" is a
contiguous segment of ``round(p · d)`` features (the same fraction p of the input as an s x s
square with s² ≈ p·H·W), and the l_2 window profile is the 1-D cut of the meta-pseudo-Gaussian.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrobust.attacks import losses
from jaxrobust.attacks.common import _bcast, check_attack_inputs
from jaxrobust.threat import ThreatModel

_P_BREAKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, it):
    """AutoAttack's schedule (resc_schedule=False): p_init / 2^j after the j-th breakpoint."""
    j = sum(jnp.where(it > b, 1, 0) for b in _P_BREAKS)
    return p_init / (2.0 ** j)


def _square_side(p, h, w, c):
    s = jnp.round(jnp.sqrt(p * h * w * c / c)).astype(jnp.int32)
    return jnp.clip(s, 1, h - 1)


def _segment_length(p, d):
    """Vector inputs: the window is a segment holding the fraction p of the d features."""
    return jnp.clip(jnp.round(p * d).astype(jnp.int32), 1, d - 1)


def _window_mask(key, h, w, s, sw=None):
    """A random s x sw window mask (H, W) (sw = s: a square), shared by the batch as in the
    reference code."""
    sw = s if sw is None else sw
    k1, k2 = jax.random.split(key)
    vh = jax.random.randint(k1, (), 0, jnp.maximum(h - s, 1))
    vw = jax.random.randint(k2, (), 0, jnp.maximum(w - sw, 1))
    rows = jnp.arange(h)
    cols = jnp.arange(w)
    return ((rows >= vh) & (rows < vh + s))[:, None] & ((cols >= vw) & (cols < vw + sw))[None, :], vh, vw


def _eta_rectangles(i, j, nx, ny, kmax):
    """Reference ``eta_rectangles(nx, ny)`` at local coordinates (i, j): the sum of 1/(k+1)^2 over
    the concentric squares k >= Chebyshev distance to (nx//2, ny//2), k < max(nx//2+1, ny//2+1)."""
    m = jnp.maximum(jnp.abs(i - nx // 2), jnp.abs(j - ny // 2))
    kk = jnp.arange(kmax)
    big_k = jnp.maximum(nx // 2 + 1, ny // 2 + 1)
    terms = jnp.where((kk >= m[..., None]) & (kk < big_k), 1.0 / (kk + 1.0) ** 2, 0.0)
    inside = (i >= 0) & (i < nx) & (j >= 0) & (j < ny)
    return jnp.where(inside, terms.sum(-1), 0.0)


def meta_pseudo_gaussian(rows, cols, vh, vw, s, transpose, kmax):
    """The reference l_2 window perturbation on an s x s square at (vh, vw), laid on the (H, W)
    grid: +eta on the upper half, -eta on the lower half (each unit-normalised), the whole unit
    l_2 norm, transposed when ``transpose``. Zero outside the window."""
    i, j = rows - vh, cols - vw
    i, j = jnp.where(transpose, j, i), jnp.where(transpose, i, j)
    half = s // 2
    top = _eta_rectangles(i, j, half, s, kmax)
    bot = _eta_rectangles(i - half, j, s - half, s, kmax)
    top = top / jnp.maximum(jnp.sqrt(jnp.sum(top ** 2)), 1e-12)
    bot = bot / jnp.maximum(jnp.sqrt(jnp.sum(bot ** 2)), 1e-12)
    pert = top - bot
    return pert / jnp.maximum(jnp.sqrt(jnp.sum(pert ** 2)), 1e-12)


def meta_pseudo_gaussian_1d(cols, vw, s, kmax):
    """Vector inputs: the 1-D cut of :func:`meta_pseudo_gaussian` on the segment [vw, vw + s)
    (+eta on the first half, -eta on the second, unit l_2 norm), shape (1, W)."""
    j = cols - vw
    zero = jnp.zeros_like(j)
    half = s // 2
    first = _eta_rectangles(zero, j, 1, half, kmax)
    second = _eta_rectangles(zero, j - half, 1, s - half, kmax)
    first = first / jnp.maximum(jnp.sqrt(jnp.sum(first ** 2)), 1e-12)
    second = second / jnp.maximum(jnp.sqrt(jnp.sum(second ** 2)), 1e-12)
    pert = first - second
    return pert / jnp.maximum(jnp.sqrt(jnp.sum(pert ** 2)), 1e-12)


def square(logits_fn, x, y, key, threat: ThreatModel, *, n_queries: int = 5000,
           p_init: float = 0.8, return_queries: bool = False):
    """Untargeted Square attack for l_inf and l_2 (ε scalar or per example; box respected).

    Args: x (B, H, W, C) images or (B, d) vectors (a vector is a 1 x d x 1 image with segment
    windows, see the module docstring), in the box; y (B,) int labels. Returns x_adv of x's shape
    (and the number of queries per example when ``return_queries``). The model is only queried,
    never differentiated.
    """
    if threat.per_feature_eps is not None:
        raise ValueError("Square attack does not support per-feature eps.")
    if threat.norm not in ("linf", "l2"):
        raise ValueError(f"Square attack supports 'linf' and 'l2', got {threat.norm!r}.")
    check_attack_inputs(logits_fn, x, y, threat, name="square")
    if x.ndim not in (2, 4):
        raise ValueError(f"Square attack needs NHWC images (B, H, W, C) or flat vectors (B, d), "
                         f"got shape {x.shape}.")
    if x.ndim == 2:
        if x.shape[1] < 2:
            raise ValueError(f"Square attack needs at least 2 features, got shape {x.shape}.")
        out = square(lambda z: logits_fn(z.reshape(z.shape[0], -1)), x.reshape(x.shape[0], 1, -1, 1),
                     y, key, threat, n_queries=n_queries, p_init=p_init, return_queries=return_queries)
        if return_queries:
            return out[0].reshape(x.shape), out[1]
        return out.reshape(x.shape)
    b, h, w, c = x.shape
    vec = h == 1  # a (flattened) vector, or a 1-pixel-high image: segment windows along W
    if vec and w < 2:
        raise ValueError(f"Square attack needs at least 2 features, got shape {x.shape}.")
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
        # l2 init (reference): a grid of s = H//5 meta-pseudo-Gaussian blocks with random signs
        # per (example, channel), normalised to l_2 norm ε.
        rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        delta = jnp.zeros(x.shape)
        if vec:  # segments of length w // 5 (1-D cut of the block grid)
            s0 = max(w // 5, 1)
            start = max((w - 5 * s0) // 2, 0)
            kb = jax.random.split(k_init, w // s0)
            for bb in range(w // s0):
                pert = meta_pseudo_gaussian_1d(cols, start + bb * s0, s0, w)
                sg = jax.random.choice(kb[bb], jnp.array([-1.0, 1.0]), (b, 1, 1, c))
                delta = delta + pert[None, :, :, None] * sg
        else:
            s0 = max(h // 5, 1)  # images smaller than 5 pixels get 1-pixel blocks
            start = max((h - 5 * s0) // 2, 0)
            kb = jax.random.split(k_init, (h // s0) ** 2)
            n_blk = 0
            for a in range(h // s0):
                for bb in range(h // s0):
                    pert = meta_pseudo_gaussian(rows, cols, start + a * s0, start + bb * s0, s0, False, h)
                    sg = jax.random.choice(kb[n_blk], jnp.array([-1.0, 1.0]), (b, 1, 1, c))
                    delta = delta + pert[None, :, :, None] * sg
                    n_blk += 1
        delta = delta / jnp.maximum(_bcast(jnp.sqrt(jnp.sum(delta ** 2, axis=(1, 2, 3))), x), 1e-12)
        x_best = jnp.clip(x + _bcast(eps, x) * delta, lo, hi)
    margin_min = margin_of(x_best)
    queries = jnp.ones((b,), jnp.int32)

    def body(i, carry):
        x_best, margin_min, queries = carry
        active = margin_min > 0
        k = jax.random.fold_in(k_loop, i)
        k_win, k_sign, k_win2 = jax.random.split(k, 3)
        p = p_selection(p_init, i)
        if vec:
            s = _segment_length(p, w)
            win, _, _ = _window_mask(k_win, h, w, 1, s)
        else:
            s = _square_side(p, h, w, c)
            win, _, _ = _window_mask(k_win, h, w, s)
        win = win[None, :, :, None]
        if threat.norm == "linf":
            signs = jax.random.choice(k_sign, jnp.array([-1.0, 1.0]), (b, 1, 1, c))
            x_new = jnp.where(win, x + _bcast(eps, x) * signs, x_best)
            x_new = jnp.clip(x_new, jnp.maximum(lo, x - _bcast(eps, x)),
                             jnp.minimum(hi, x + _bcast(eps, x)))
        else:
            # l2 (reference update): a fresh meta-pseudo-Gaussian window plus the normalised old
            # content of window 1 receives the energy of windows 1 and 2 plus the unused budget
            # (per channel); window 2 is zeroed; the whole perturbation is rescaled to norm ε.
            s = jnp.maximum(s, 3)
            s = jnp.where(s % 2 == 0, s + 1, s)
            s = jnp.minimum(s, (w if vec else h) - 1)
            sh = 1 if vec else s
            win, vh, vw = _window_mask(k_win, h, w, sh, s)
            win = win[None, :, :, None]
            win2, _, _ = _window_mask(k_win2, h, w, sh, s)
            win2 = win2[None, :, :, None]
            delta = x_best - x
            sq = lambda v: jnp.sum(v ** 2, axis=(1, 2), keepdims=True)  # per (example, channel)
            norms_window_1 = jnp.sqrt(sq(jnp.where(win, delta, 0.0)))
            norms_image = jnp.sqrt(jnp.sum(delta ** 2, axis=(1, 2, 3)))
            norms_windows = jnp.sqrt(jnp.sum(jnp.where(win | win2, delta, 0.0) ** 2, axis=(1, 2, 3)))
            rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
            k_tr, k_sg = jax.random.split(k_sign)
            if vec:
                pert = meta_pseudo_gaussian_1d(cols, vw, s, w)
            else:
                pert = meta_pseudo_gaussian(rows, cols, vh, vw, s, jax.random.uniform(k_tr) > 0.5, h)
            signs = jax.random.choice(k_sg, jnp.array([-1.0, 1.0]), (b, 1, 1, c))
            new = pert[None, :, :, None] * signs + jnp.where(win, delta, 0.0) / (1e-12 + norms_window_1)
            scale = jnp.sqrt(jnp.maximum(eps ** 2 - norms_image ** 2, 0.0) / c + norms_windows ** 2)
            new = new / (1e-12 + jnp.sqrt(sq(new))) * _bcast(scale, x)
            delta_new = jnp.where(win, new, jnp.where(win2, 0.0, delta))
            d_norm = jnp.sqrt(jnp.sum(delta_new ** 2, axis=(1, 2, 3)))
            x_new = jnp.clip(x + delta_new / _bcast(jnp.maximum(d_norm, 1e-12), x) * _bcast(eps, x),
                             lo, hi)
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
