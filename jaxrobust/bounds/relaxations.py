"""Linear relaxations of activations and max pooling as pure functions of their input bounds (l, u).

Each returns lines ``a_l z + b_l <= φ(z) <= a_u z + b_u`` valid on [l, u] (thesis eq. 3.3 / 3.6),
element-wise, jit-able and differentiable w.r.t. (l, u) (the bisection of the tangent modes is a
fixed 40-step loop; its result is treated as a constant by autodiff). The linear bound passes
(:mod:`~jaxrobust.bounds.backward`, :mod:`~jaxrobust.bounds.patches`) and certified training use them.

ReLU (:func:`relu_lines`, eq. 3.4): ``'adaptive'`` (CROWN: lower slope 1 if u > -l else 0) or
``'same_slope'`` (Fast-Lin / Algorithm 3.1: lower slope = upper slope u / (u - l)).

Sigmoid / tanh (:func:`sigmoid_lines`), modes :data:`SIGMOID_RELAXATIONS`:

* ``'midpoint_tangent'`` (default for verification): per side, the chord where it is sound, else the
  tangent at the interval's midpoint m where that tangent is sound, else the tangent at the nearest
  sound point (the tangent through the far end point, as in CROWN / auto_LiRPA). Among the sound
  lines this minimises the area between the line and φ on [l, u] (a tangent of a convex piece has
  area ∝ its value at m), so it is never looser in that sense than the other two modes.
* ``'endpoint_tangent'`` (CROWN's original lines, formerly called ``'tight'``): chord where sound,
  else the tangent through the far end point; the tangent at m on the fully convex / concave side.
* ``'analytic'`` (eq. 3.5 and Table 3.1): both lines with the chord's slope, tangent at the points
  where φ' equals it; closed form and smooth in (l, u), used by the thesis for training.

Float rounding: the sigmoid lines are exact in real arithmetic and widened by a few ulps of the
output range; the ReLU lines need no slack.
"""
from __future__ import annotations

import itertools
from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrobust.bounds.tape import UnsupportedPrimitiveError

RELU_RELAXATIONS = ("adaptive", "same_slope")
SIGMOID_RELAXATIONS = ("midpoint_tangent", "endpoint_tangent", "analytic")
_RENAMED = {"tight": "endpoint_tangent"}

Lines = Tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def check_sigmoid_mode(mode: str) -> str:
    if mode in _RENAMED:
        raise ValueError(f"sigmoid/tanh relaxation {mode!r} was renamed {_RENAMED[mode]!r} (it is not the "
                         f"tightest); the tightest sound one is 'midpoint_tangent' (the default). Choose "
                         f"from {SIGMOID_RELAXATIONS}.")
    if mode not in SIGMOID_RELAXATIONS:
        raise ValueError(f"sigmoid/tanh relaxation must be one of {SIGMOID_RELAXATIONS}, got {mode!r}")
    return mode


def check_relu_mode(mode: str) -> str:
    if mode not in RELU_RELAXATIONS:
        raise ValueError(f"relu relaxation must be one of {RELU_RELAXATIONS}, got {mode!r}")
    return mode


def relu_lines(l, u, mode: str = "adaptive") -> Lines:
    """Lines (al, bl, au, bu) with al z + bl <= relu(z) <= au z + bu on [l, u] (eq. 3.4)."""
    check_relu_mode(mode)
    unstable = (l < 0) & (u > 0)
    s = jnp.where(unstable, u / jnp.where(unstable, u - l, 1.0), (l >= 0).astype(l.dtype))
    au, bu = s, jnp.where(unstable, -l * s, 0.0)
    al = jnp.where(unstable, (u > -l).astype(l.dtype), s) if mode == "adaptive" else s
    return al, jnp.zeros_like(l), au, bu


def _sigmoid_like(name):
    """(φ, φ', tangent points of a slope (Table 3.1), chord slope without cancellation)."""
    if name == "logistic":
        phi = jax.nn.sigmoid
        dphi = lambda z: jax.nn.sigmoid(z) * (1 - jax.nn.sigmoid(z))

        def tangent_points(d):  # Table 3.1: φ'(t) = d  ⇔  φ(t) = (1 ± sqrt(1-4d)) / 2
            s = jnp.sqrt(jnp.clip(1 - 4 * d, 1e-30, 1.0))  # (floored: finite gradient at d = 1/4)
            p = 2 * d / (1 + s)  # = (1 - s) / 2 without cancellation
            t1 = jnp.log(p) - jnp.log1p(-p)
            return t1, -t1

        def chord_slope(l, u):
            # σ(u) - σ(l) = -expm1(-(u-l)) σ(u) σ(-l): no cancellation for narrow intervals.
            w = u - l
            ratio = jnp.where(w > 1e-12, -jnp.expm1(-w) / jnp.where(w > 1e-12, w, 1.0), 1.0)
            return ratio * jax.nn.sigmoid(u) * jax.nn.sigmoid(-l)
    elif name == "tanh":
        phi = jnp.tanh
        dphi = lambda z: 1 - jnp.tanh(z) ** 2

        def tangent_points(d):  # φ'(t) = d  ⇔  φ(t) = ± sqrt(1 - d)
            t2 = jnp.arctanh(jnp.clip(jnp.sqrt(jnp.clip(1 - d, 1e-30, 1.0)), 0.0, 1 - 1e-7))  # (finite at d = 1)
            return -t2, t2

        def chord_slope(l, u):
            # tanh(u) - tanh(l) = sinh(u-l) / (cosh u cosh l), with 1/cosh(a) = 2 e^{-|a|} / (1 + e^{-2|a|}).
            # Wide intervals (w > 1) have no cancellation: use the plain difference there (sinh overflows).
            w = u - l
            small = w <= 1.0
            ws = jnp.where(small, w, 0.5)
            ratio = jnp.where(ws > 1e-12, jnp.sinh(ws) / jnp.where(ws > 1e-12, ws, 1.0), 1.0)
            inv_cosh = lambda a: 2 * jnp.exp(-jnp.abs(a)) / (1 + jnp.exp(-2 * jnp.abs(a)))
            wide = (jnp.tanh(u) - jnp.tanh(l)) / jnp.where(small, 1.0, w)
            return jnp.where(small, ratio * inv_cosh(u) * inv_cosh(l), wide)
    else:
        raise ValueError(f"no sigmoid-like relaxation for {name!r}; expected 'logistic' or 'tanh'")
    return phi, dphi, tangent_points, chord_slope


def _bisect(h, lo, hi, keep_hi):
    """40 bisection steps for the sign change of an increasing (h(lo) < 0 <= h(hi)) function."""
    def body(_, c):
        a, b = c
        mid = 0.5 * (a + b)
        pos = h(mid) >= 0
        return (jnp.where(pos, a, mid), jnp.where(pos, mid, b))
    a, b = lax.fori_loop(0, 40, body, (lo, hi))
    return b if keep_hi else a


def sigmoid_lines(name: str, l, u, mode: str = "midpoint_tangent") -> Lines:
    """Lines (al, bl, au, bu) around φ = sigmoid (``name='logistic'``) or tanh on [l, u]; ``mode`` in
    :data:`SIGMOID_RELAXATIONS` (see the module docstring)."""
    check_sigmoid_mode(mode)
    phi, dphi, tangent_points, chord_slope = _sigmoid_like(name)
    # The chord's slope in closed form (no φ(u) - φ(l) cancellation) and its intercept through
    # (l, φ(l)); exact in real arithmetic, within a few ulps in float32 for any width.
    k = chord_slope(l, u)
    if mode == "analytic":
        # eq. 3.5: slope of the chord; tangents of that slope at t1 < 0 < t2 where curvature changes.
        d = jnp.maximum(k, 1e-10)  # saturated ends: keeps log(d) finite
        t1, t2 = tangent_points(d)
        chord_b = phi(l) - d * l
        bl = jnp.where(l < 0, phi(t1) - t1 * d, chord_b)
        bu = jnp.where(u > 0, phi(t2) - t2 * d, chord_b)
        al = au = d
    else:
        m = 0.5 * (l + u)
        chord_b = phi(l) - k * l
        tangent = lambda t: (dphi(t), phi(t) - dphi(t) * t)
        # φ is convex on (-inf, 0] and concave on [0, inf). Upper side: a tangent at t >= 0 lies above
        # φ on [l, u] iff it passes above (l, φ(l)), i.e. iff hu(t) >= 0 (hu increases on [0, inf));
        # the chord is sound iff no such t <= u exists (hu(u) <= 0).
        hu = lambda t: phi(t) + dphi(t) * (l - t) - phi(l)
        du = _bisect(hu, jnp.zeros_like(l), jnp.maximum(u, 0.0), keep_hi=True)
        chord_ok_u = hu(u) <= 0
        # Lower side, mirrored: a tangent at t <= 0 is below φ iff it passes below (u, φ(u)).
        hl = lambda t: phi(u) - (phi(t) + dphi(t) * (u - t))
        dl = _bisect(lambda t: -hl(t), jnp.minimum(l, 0.0), jnp.zeros_like(l), keep_hi=False)
        chord_ok_l = hl(l) <= 0
        convex, concave = u <= 0, l >= 0
        if mode == "midpoint_tangent":
            # the sound tangent nearest to the midpoint (the tangent at m itself when it is sound)
            tu, tl = jnp.maximum(m, du), jnp.minimum(m, dl)
        else:  # endpoint_tangent: the tangent through the far end point
            tu, tl = du, dl
        au, bu = tangent(tu)
        au = jnp.where(convex | chord_ok_u, k, au)
        bu = jnp.where(convex | chord_ok_u, chord_b, bu)
        al, bl = tangent(tl)
        al = jnp.where(concave | chord_ok_l, k, al)
        bl = jnp.where(concave | chord_ok_l, chord_b, bl)
        # the concave side's upper / convex side's lower line: the tangent at the midpoint
        ma, mb = tangent(m)
        au, bu = jnp.where(concave, ma, au), jnp.where(concave, mb, bu)
        al, bl = jnp.where(convex, ma, al), jnp.where(convex, mb, bl)
    # Float slack: the lines are exact in real arithmetic; widen by a few ulps of the output range.
    slack = 2e-7 * (1.0 + jnp.abs(l) + jnp.abs(u))
    return al, bl - slack, au, bu + slack


# ----------------------------------------------------------------------------- activations by primitive
def _max_lines(l, u, c, relu_mode, sigmoid_mode):  # max(z, c) = relu(z - c) + c
    al, bl, au, bu = relu_lines(l - c, u - c, relu_mode)
    return al, bl - al * c + c, au, bu - au * c + c


def _min_lines(l, u, c, relu_mode, sigmoid_mode):  # min(z, c) = z - relu(z - c)
    al, bl, au, bu = relu_lines(l - c, u - c, relu_mode)
    return 1 - au, -(bu - au * c), 1 - al, -(bl - al * c)


# Piecewise-linear activations: relu of a shift by the constant operand (what a MILP encodes exactly).
RELU_LIKE = {lax.max_p: _max_lines, lax.min_p: _min_lines}
# Lines of every activation primitive: (l, u, constant operand or None, relu_mode, sigmoid_mode).
ACTIVATION_LINES = dict(RELU_LIKE)
ACTIVATION_LINES[lax.logistic_p] = lambda l, u, c, rm, sm: sigmoid_lines("logistic", l, u, sm)
ACTIVATION_LINES[lax.tanh_p] = lambda l, u, c, rm, sm: sigmoid_lines("tanh", l, u, sm)


def activation_lines(prim, l, u, const=None, relu_mode: str = "adaptive",
                     sigmoid_mode: str = "midpoint_tangent") -> Lines:
    """Lines of the activation ``prim`` (max/min with the constant ``const``, logistic, tanh)."""
    if prim not in ACTIVATION_LINES:
        raise UnsupportedPrimitiveError(f"no linear relaxation for primitive '{prim.name}'.")
    if const is not None:
        const = jnp.asarray(const, l.dtype)
    return ACTIVATION_LINES[prim](l, u, const, relu_mode, sigmoid_mode)


# ----------------------------------------------------------------------------- max pooling
def window_patches(x, params, pad_value):
    """Stack of a reduce_window's elements for every output position: shape (n_window, *out)."""
    dims, strides = params["window_dimensions"], params["window_strides"]
    padding, wdil = params["padding"], params.get("window_dilation", (1,) * len(dims))
    if any(d != 1 for d in params.get("base_dilation", (1,) * len(dims))):
        raise UnsupportedPrimitiveError("max pooling with base dilation has no linear rule.")
    xp = lax.pad(x, jnp.asarray(pad_value, x.dtype), [(lo, hi, 0) for lo, hi in padding])
    out_shape = [(xp.shape[i] - (dims[i] - 1) * wdil[i] - 1) // strides[i] + 1 for i in range(x.ndim)]
    pieces = []
    for off in itertools.product(*[range(d) for d in dims]):
        start = [o * wd for o, wd in zip(off, wdil)]
        limit = [s + (n - 1) * st + 1 for s, n, st in zip(start, out_shape, strides)]
        pieces.append(lax.slice(xp, start, limit, strides))
    return jnp.stack(pieces)


def maxpool_lines(lo, hi, params, dtype):
    """Linear relaxation of max pooling from its input bounds [lo, hi]: ``onehot`` (n_window, *out)
    selects the element with the largest lower bound. Lower line: that element. Upper line: that
    element where it dominates (its lower bound >= every other upper bound: the max is exactly it,
    ``dominant`` = 1), else the constant ``upper`` = the largest upper bound (0 where dominant)."""
    lp = window_patches(lo, params, -jnp.inf)
    up = window_patches(hi, params, -jnp.inf)
    star = jnp.argmax(lp, axis=0)
    onehot = (jnp.arange(lp.shape[0]).reshape((-1,) + (1,) * (lp.ndim - 1)) == star).astype(dtype)
    u_others = jnp.max(jnp.where(onehot > 0, -jnp.inf, up), axis=0)
    dominant = jnp.max(lp, axis=0) >= u_others
    return onehot, dominant.astype(dtype), jnp.where(dominant, 0.0, jnp.max(up, axis=0)).astype(dtype)
