"""Linear-relaxation bounds (thesis §3.1.1, Algorithm 3.1; CROWN / Fast-Lin; §3.3.1) for any JAX function.

The function is traced once per example shape into a jaxpr; calls are inlined and every equation that
depends on the input becomes a node of a tape. A forward pass over the tape computes interval bounds
of every node (IBP, Algorithm 3.2). Linear bounds are then obtained *backwards*: a specification
matrix Λ (rows = the linear functions of the output to bound) is pulled back through each node:

* affine nodes (dense, conv, BatchNorm in eval mode, reshapes, residual additions, average pooling,
  concatenation, ...) through ``jax.vjp`` of the node's own primitive -- no weight matrix is ever
  materialised (a conv is pulled back by its transpose conv), the constant part ``h(0)`` of the node
  adds <Λ, h(0)> to the bias;
* activation nodes through a per-neuron linear relaxation  a_l z + b_l <= φ(z) <= a_u z + b_u
  (eq. 3.3/3.6): positive rows of Λ take the lower line, negative rows the upper one;
* max pooling through max >= x_{j*} (j* = argmax of the lower bounds in the window) and
  max <= x_{j*} when j* dominates the window, else <= max of the upper bounds.

At the input, <Λ_x, x'> is minimised exactly over S(x) = {x + ε⃗ ⊙ v : ||v||_p <= ε} ∩ box (l_inf, l_2
and l_1, scalar or per-feature ε⃗; see :mod:`jaxrobust.bounds.geometry`) -- tighter than the dual-norm
rule of Algorithm 3.1 whenever the box cuts the ball.

Intermediate bounds (the [l, u] of each activation's input) come from IBP (CROWN-IBP, IBP-inspired
linear bounds) or from the same backward pass with the identity specification (CROWN, Fast-Lin,
Algorithm 3.1's O(L²) scheme); the two are intersected, which is always sound.

Relaxations:
  relu: 'adaptive' (CROWN: lower slope 1 if u > -l else 0) or 'same_slope' (Fast-Lin, eq. 3.4).
  sigmoid/tanh: 'midpoint_tangent' (default of the verification methods: the sound chord/tangent
  closest to φ, see :mod:`jaxrobust.bounds.relaxations`), 'endpoint_tangent' (CROWN's original
  chords and end-point tangents, formerly 'tight') or 'analytic' (eq. 3.5 and Table 3.1: two tangents
  with the chord's slope; closed form, differentiable, used by the thesis for training).

This module is the public API; the tape and its backward pass live in
:mod:`jaxrobust.bounds.backward`, the relaxations in :mod:`jaxrobust.bounds.relaxations`, the
patch form of convolutional layers in :mod:`jaxrobust.bounds.patches`.

Elision of the last layer is implicit: the specification (e.g. z_y - z_i) is pulled back through the
final affine layers exactly, before any relaxation.

Everything runs per example under ``jax.vmap``, is jit-able and differentiable in the parameters.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.bounds import patches as local
from jaxrobust.bounds.backward import (LOOSE, RAW, EXACT, Options, Ref, Tape, backward, concretise,
                                       node_function, pos_neg, trace_tape)
from jaxrobust.bounds.ibp import Ball, check_batch
from jaxrobust.bounds.relaxations import (RELU_RELAXATIONS, SIGMOID_RELAXATIONS, check_relu_mode,
                                          check_sigmoid_mode, maxpool_lines)
from jaxrobust.bounds.tape import Interval, UnsupportedPrimitiveError
from jaxrobust.threat import ThreatModel

__all__ = ["METHODS", "RELU_RELAXATIONS", "SIGMOID_RELAXATIONS", "LinearBounds", "MarginBounds",
           "BoundGraph", "bound_graph", "linear_spec_bounds", "crown_bounds", "margin_spec",
           "margin_bounds", "certified_by_bounds", "node_function", "maxpool_lines", "Interval",
           "UnsupportedPrimitiveError", "Ref"]


# ----------------------------------------------------------------------------- public API
METHODS = {
    # name: (intermediate bounds, relu relaxation, sigmoid relaxation)
    "crown": ("crown", "adaptive", "midpoint_tangent"),
    "fastlin": ("crown", "same_slope", "analytic"),  # Algorithm 3.1 / LA-inspired bounds (L-PER)
    "crown_ibp": ("ibp", "adaptive", "midpoint_tangent"),
    "ibp_linear": ("ibp", "same_slope", "analytic"),  # IBP-inspired linear bounds (§3.3.1, I-PER)
    "ibp": ("ibp", None, None),  # interval bounds with the trailing affine layers elided
}


class LinearBounds(NamedTuple):
    """``spec · f(x') >= <U, x'> + p >= lower`` for every x' in S(x). Shapes (B,R), (B,R,*f), (B,R)."""
    lower: jax.Array
    U: jax.Array
    p: jax.Array


class MarginBounds(NamedTuple):
    """Eq. (3.12): z_y(x') - z_i(x') >= <U_i, x'> + p_i >= lower_i for x' in S(x). Row y is zero."""
    lower: jax.Array
    U: jax.Array
    p: jax.Array


def _resolve(method, relu, sigmoid):
    if method not in METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose from {sorted(METHODS)}")
    inter, r, s = METHODS[method]
    return inter, check_relu_mode(relu or r or "adaptive"), check_sigmoid_mode(sigmoid or s or "midpoint_tangent")


def _single_example_fn(fn, feature_shape, dtype):
    g = lambda x1: fn(x1[None])[0]
    closed = jax.make_jaxpr(g)(jax.ShapeDtypeStruct(feature_shape, dtype))
    out_aval = closed.out_avals[0]
    return closed, tuple(out_aval.shape)


def _build_tape(closed, x, scale, lo, hi, eps, *, norm, intermediate, opts, intersect=True, patches=True):
    """Forward pass for one example: the tape of input-dependent nodes with their intervals
    (IBP, tightened by CROWN before each activation when ``intermediate == 'crown'``).

    ``intersect=False`` replaces the IBP intervals by the CROWN ones instead of intersecting (pure
    CROWN, for cross-checks); ``patches=False`` forces the dense backward pass for every layer."""
    tape = Tape()
    x_ref = tape.new(x.shape, x.dtype)
    # Input interval hull of the set (exact for l_inf).
    tape.iv[x_ref.id] = Interval(jnp.maximum(x - scale * eps, lo), jnp.minimum(x + scale * eps, hi))
    if norm != "linf":  # IBP bounds the first dense/conv layer exactly over the l_2 / l_1 ball
        tape.ball[x_ref.id] = Ball(x, jnp.broadcast_to(scale * eps, x.shape), tape.iv[x_ref.id], norm)
    tape.level[x_ref.id] = RAW if norm == "linf" else LOOSE

    def on_activation(tp: Tape, ref: Ref):
        if intermediate != "crown" or ref.id in tp.done or tp.level[ref.id] <= EXACT:
            return  # IBP is already exact there (e.g. the first layer under l_inf)
        shape = tp.shape[ref.id]
        plan, why = local.plan_or_reason(tp, ref.id, x_ref.id) if patches else (None, None)
        if why is not None:
            local.warn_dense_fallback(why, int(np.prod(shape)), int(np.prod(x.shape)),
                                      jnp.dtype(x.dtype).itemsize)
        if plan is not None:  # convolutional layer: rows on their receptive fields only
            cl, cu = local.intermediate_bounds(tp, ref.id, x_ref.id, plan, opts, x, scale, lo, hi, eps, norm)
        else:
            n = int(np.prod(shape))
            eye = jnp.eye(n, dtype=x.dtype).reshape((n,) + shape)
            lams, bias = backward(tp, ref.id, eye, opts, paired=True)
            lam_x = lams.get(x_ref.id, jnp.zeros((2 * n,) + x.shape, x.dtype))
            low = concretise(lam_x, bias, x, scale, lo, hi, eps, norm, opts.boxed)
            cl, cu = low[:n].reshape(shape), -low[n:].reshape(shape)
        iv = tp.iv[ref.id]
        tp.iv[ref.id] = (Interval(jnp.maximum(iv.lo, cl), jnp.minimum(iv.hi, cu)) if intersect
                         else Interval(cl, cu))
        if ref.id in tp.ball:  # the activation sees the tightened interval
            old = tp.ball[ref.id]
            tp.ball[ref.id] = Ball(old.c, old.s, tp.iv[ref.id], old.norm)
        tp.done.add(ref.id)

    outs = trace_tape(closed.jaxpr, closed.consts, [x_ref], tape, on_activation)
    return tape, x_ref, outs[0]


def _spec_bounds_one(closed, x, scale, lo, hi, eps, spec, *, norm, intermediate, opts, elide_ibp,
                     intersect, patches):
    """Per-example worker (vmapped): lower bounds of spec · f over S(x), (U, p), and the interval
    (IBP) lower bound of spec · f from the output's intervals."""
    tape, x_ref, out = _build_tape(closed, x, scale, lo, hi, eps, norm=norm, intermediate=intermediate,
                                   opts=opts, intersect=intersect, patches=patches)
    R = spec.shape[0]
    if not isinstance(out, Ref):  # the output does not depend on the input
        val = jnp.sum((spec * out).reshape(R, -1), axis=1)
        return val, jnp.zeros((R,) + x.shape, x.dtype), val, val
    pos, neg = pos_neg(spec.astype(x.dtype))
    iv = tape.iv[out.id]
    interval_lower = jnp.sum((pos * iv.lo + neg * iv.hi).reshape(R, -1), axis=1)
    lams, bias = backward(tape, out.id, spec.astype(x.dtype), opts, elide_to_ibp=elide_ibp)
    lam_x = lams.get(x_ref.id, jnp.zeros((R,) + x.shape, x.dtype))
    lower = concretise(lam_x, bias, x, scale, lo, hi, eps, norm, opts.boxed)
    if elide_ibp:  # IBP: constant bound (U = 0, p = lower)
        return lower, jnp.zeros_like(lam_x), lower, interval_lower
    return lower, lam_x, bias, interval_lower


class BoundGraph(NamedTuple):
    """One example's traced function for complete verifiers: ``nodes`` in topological order (each
    with ``kind`` in {'affine', 'act', 'maxpool'}, ``prim``, ``params``, ``ins`` (refs or constants),
    ``out`` (ref)), ``intervals[ref.id]`` (lo, hi), ``shapes[ref.id]``, the input ref and output."""
    nodes: list
    intervals: dict
    shapes: dict
    input: Any
    output: Any


def bound_graph(fn: Callable, x1, threat: ThreatModel, *, method: str = "crown") -> BoundGraph:
    """The tape of one example ``x1`` (shape (*f), no batch axis) with intermediate intervals from
    ``method`` (eager; for MILP encoders and inspection). ``threat.eps`` must be a scalar."""
    x1 = jnp.asarray(x1)
    inter, relu_mode, sig_mode = _resolve(method, None, None)
    closed, _ = _single_example_fn(fn, x1.shape, x1.dtype)
    tb = threat.replace(eps=jnp.reshape(jnp.asarray(threat.eps, x1.dtype), (1,)))
    scale = threat.per_feature_eps
    scale = jnp.ones_like(x1) if scale is None else jnp.broadcast_to(jnp.asarray(scale, x1.dtype), x1.shape)
    lo, hi = tb.box_arrays(x1)
    tape, x_ref, out = _build_tape(closed, x1, scale, lo, hi, jnp.asarray(threat.eps, x1.dtype),
                                   norm=threat.norm, intermediate=("crown" if inter == "crown" else "ibp"),
                                   opts=Options(relu_mode, sig_mode, threat.box is not None))
    return BoundGraph(tape.nodes, {k: (v.lo, v.hi) for k, v in tape.iv.items()}, tape.shape, x_ref, out)


def _check_fn_output(closed):
    if len(closed.out_avals) != 1:
        raise ValueError("fn must return a single array (the logits).")


def linear_spec_bounds(fn: Callable, x, threat: ThreatModel, spec, *, method: str = "crown",
                       relu: Optional[str] = None, sigmoid: Optional[str] = None,
                       intersect_ibp: bool = True, patches: bool = True) -> LinearBounds:
    """Lower bounds of the linear functions ``spec · fn(x')`` over S(x) (Algorithm 3.1 backwards).

    Args:
      fn: maps a batch (B, *f) to outputs (B, *o); examples must not interact (eval-mode BN).
      x: (B, *f) inputs inside the threat's box.
      threat: the set S(x) (l_inf/l_2/l_1, scalar/per-example ε, per-feature ε⃗, box).
      spec: (R, *o) shared or (B, R, *o) per example.
      method: one of :data:`METHODS`.
      intersect_ibp: intersect CROWN intermediate bounds with the IBP ones (``False``: pure CROWN,
        as auto_LiRPA without ``compare_crown_with_ibp``). Usually looser, but not always: tighter
        intermediate intervals can flip an adaptive ReLU slope (or a sigmoid tangent) to a choice that
        happens to be worse for this specification, so neither setting dominates the other.
      patches: compute the intermediate bounds of convolutional layers on receptive-field windows
        (:mod:`jaxrobust.bounds.patches`; same bounds as dense rows, several times faster).
    Returns LinearBounds(lower (B,R), U (B,R,*f), p (B,R)).
    """
    lb, _ = _spec_bounds(fn, x, threat, spec, method, relu, sigmoid, intersect_ibp, patches)
    return lb


def _spec_bounds(fn, x, threat, spec, method, relu, sigmoid, intersect_ibp, patches, traced=None):
    """(LinearBounds, interval lower bound of spec · fn from the output intervals (B, R)).
    ``traced``: fn's ``_single_example_fn`` when the caller already has it (fn is traced once)."""
    check_batch(x)
    threat.validate_inputs(x)
    inter, relu_mode, sig_mode = _resolve(method, relu, sigmoid)
    closed, out_shape = traced or _single_example_fn(fn, x.shape[1:], x.dtype)
    _check_fn_output(closed)
    spec = jnp.asarray(spec, x.dtype)
    if spec.ndim < len(out_shape) + 1 or tuple(spec.shape[spec.ndim - len(out_shape):]) != out_shape:
        raise ValueError(f"spec has shape {spec.shape}; its trailing axes must be fn's output shape "
                         f"{out_shape}.")
    if spec.ndim == len(out_shape) + 1:
        spec = jnp.broadcast_to(spec, (x.shape[0],) + spec.shape)
    if spec.shape[0] != x.shape[0]:
        raise ValueError(f"spec has {spec.shape[0]} rows of examples for a batch of {x.shape[0]}.")
    scale = threat.per_feature_eps
    scale = jnp.ones_like(x) if scale is None else jnp.broadcast_to(jnp.asarray(scale, x.dtype), x.shape)
    lo, hi = threat.box_arrays(x)
    eps = threat.eps_for(x)
    worker = lambda xb, sb, lb, hb, eb, cb: _spec_bounds_one(
        closed, xb, sb, lb, hb, eb, cb, norm=threat.norm, intermediate=inter,
        opts=Options(relu_mode, sig_mode, threat.box is not None), elide_ibp=(method == "ibp"), intersect=intersect_ibp,
        patches=patches)
    lower, U, p, interval_lower = jax.vmap(worker)(x, scale, lo, hi, eps, spec)
    return LinearBounds(lower, U, p), interval_lower


def crown_bounds(fn: Callable, x, threat: ThreatModel, *, method: str = "crown",
                 relu: Optional[str] = None, sigmoid: Optional[str] = None,
                 intersect_ibp: bool = True, patches: bool = True):
    """Element-wise (lower, upper) of fn's output over S(x) by linear relaxation (Algorithm 3.1).

    With ``intersect_ibp`` (default) the output intervals are also intersected with the interval
    (IBP) bounds of the output, which costs nothing more (auto_LiRPA's ``compare_crown_with_ibp``);
    ``False`` returns the pure linear-relaxation bounds. See :func:`linear_spec_bounds`."""
    check_batch(x)
    closed, out_shape = _single_example_fn(fn, x.shape[1:], x.dtype)
    n = int(np.prod(out_shape))
    eye = jnp.eye(n, dtype=x.dtype).reshape((n,) + out_shape)
    b, interval_lower = _spec_bounds(fn, x, threat, jnp.concatenate([eye, -eye]), method, relu, sigmoid,
                                     intersect_ibp, patches, traced=(closed, out_shape))
    lower = jnp.maximum(b.lower, interval_lower) if intersect_ibp else b.lower
    B = x.shape[0]
    return lower[:, :n].reshape((B,) + out_shape), -lower[:, n:].reshape((B,) + out_shape)


def margin_spec(y, num_classes: int, dtype=jnp.float32):
    """(B, K, K): row i is e_y - e_i (zero for i = y)."""
    oh = jax.nn.one_hot(y, num_classes, dtype=dtype)
    return oh[:, None, :] - jnp.eye(num_classes, dtype=dtype)[None]


def margin_bounds(fn: Callable, x, y, threat: ThreatModel, *, method: str = "crown",
                  relu: Optional[str] = None, sigmoid: Optional[str] = None,
                  intersect_ibp: bool = True, patches: bool = True) -> MarginBounds:
    """Eq. (3.12) with elision of the last layer: linear lower bounds of z_y - z_i over S(x).

    For ``method='ibp'`` the bound is IBP up to the last nonlinearity and exact after it (U = 0).
    ``intersect_ibp`` and ``patches``: see :func:`linear_spec_bounds`.
    """
    check_batch(x)
    closed, out_shape = _single_example_fn(fn, x.shape[1:], x.dtype)
    if len(out_shape) != 1:
        raise ValueError(f"margin_bounds needs fn to return logits (B, K); got per-example shape {out_shape}.")
    threat.validate_inputs(x, y, num_classes=out_shape[0])
    y = jnp.asarray(y)
    if y.shape != (x.shape[0],) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must be integer labels of shape (B,) = ({x.shape[0]},), got {y.dtype} {y.shape}.")
    chex.assert_shape(y, (x.shape[0],))
    b, _ = _spec_bounds(fn, x, threat, margin_spec(y, out_shape[0], x.dtype), method, relu, sigmoid,
                        intersect_ibp, patches, traced=(closed, out_shape))
    is_y = jax.nn.one_hot(y, out_shape[0], dtype=bool)
    return MarginBounds(jnp.where(is_y, 0.0, b.lower), b.U, jnp.where(is_y, 0.0, b.p))


def certified_by_bounds(mb: MarginBounds, y) -> jax.Array:
    """(B,) True where every margin lower bound (i != y) is positive."""
    is_y = jax.nn.one_hot(y, mb.lower.shape[-1], dtype=bool)
    return jnp.all(is_y | (mb.lower > 0), axis=-1)
