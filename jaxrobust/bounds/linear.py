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
  sigmoid/tanh: 'analytic' (eq. 3.5 and Table 3.1: two tangents with the chord's slope; closed form,
  differentiable, used for training) or 'tight' (CROWN: chords and tangents found by bisection).

Elision of the last layer is implicit: the specification (e.g. z_y - z_i) is pulled back through the
final affine layers exactly, before any relaxation.

Everything runs per example under ``jax.vmap``, is jit-able and differentiable in the parameters.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.bounds import geometry
from jaxrobust.bounds.ibp import (_CALLS, _RULES, Interval, UnsupportedPrimitiveError, _JaxprEnv,
                                  _where)
from jaxrobust.threat import ThreatModel

# Primitives that are affine in their input-dependent operands (given the others are constants).
_AFFINE = {"add", "add_any", "sub", "neg", "dot_general", "conv_general_dilated", "mul", "div",
           "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "convert_element_type",
           "slice", "concatenate", "pad", "copy", "copy_p", "rev", "reduce_sum", "reduce_window_sum",
           "cumsum", "gather", "dynamic_slice", "select_n", "reduce_precision"}
# Operands that must be constants for the primitive to be affine.
_CONST_OPERANDS = {"dot_general": "one", "conv_general_dilated": "one", "mul": "one", "div": (1,),
                   "gather": (1,), "dynamic_slice": "tail", "select_n": (0,), "pad": (1,)}
_ACTIVATIONS = {"max", "min", "logistic", "tanh"}
# Affine primitives that mix elements (each output combines several input elements).
_MIXING = {"dot_general", "conv_general_dilated", "reduce_sum", "reduce_window_sum", "cumsum"}
# Exactness levels of interval bounds, used to skip CROWN where IBP is already exact:
# 0 = independent coordinates of a box (the l_inf input), 1 = exact per element (one mixing map of a
# box, then element-wise ops), 2 = possibly loose.
_RAW, _EXACT, _LOOSE = 0, 1, 2

RELU_RELAXATIONS = ("adaptive", "same_slope")
SIGMOID_RELAXATIONS = ("analytic", "tight")


class _Node:
    """An input-dependent equation of the flattened function."""
    __slots__ = ("kind", "prim", "params", "ins", "out", "where", "const_arg")

    def __init__(self, kind, prim, params, ins, out, where, const_arg=None):
        self.kind, self.prim, self.params, self.ins, self.out = kind, prim, params, ins, out
        self.where, self.const_arg = where, const_arg


class _Ref:
    """Reference to an input-dependent value (id into the tape's tables)."""
    __slots__ = ("id",)

    def __init__(self, i):
        self.id = i


class _Tape:
    def __init__(self):
        self.nodes: List[_Node] = []
        self.iv: Dict[int, Interval] = {}
        self.shape: Dict[int, tuple] = {}
        self.dtype: Dict[int, Any] = {}
        self.producer: Dict[int, int] = {}
        self.done: set = set()  # refs whose interval was already tightened by CROWN
        self.level: Dict[int, int] = {}  # exactness level of each ref's interval
        self.n = 0

    def new(self, shape, dtype):
        r = _Ref(self.n)
        self.shape[r.id], self.dtype[r.id] = tuple(shape), dtype
        self.n += 1
        return r


def _classify(name, ins, where):
    is_dep = [isinstance(a, _Ref) for a in ins]
    if name in _AFFINE:
        rule = _CONST_OPERANDS.get(name)
        if rule == "one" and sum(is_dep) > 1:
            raise UnsupportedPrimitiveError(
                f"'{name}' of two input-dependent operands (at {where}) is not affine; linear "
                "relaxation bounds support products with constants only.")
        if isinstance(rule, tuple) and any(is_dep[i] for i in rule):
            raise UnsupportedPrimitiveError(
                f"'{name}' with an input-dependent operand {rule} (at {where}) is not affine.")
        if rule == "tail" and any(is_dep[1:]):
            raise UnsupportedPrimitiveError(f"'{name}' with input-dependent indices (at {where}).")
        return "affine"
    if name in _ACTIVATIONS:
        if name in ("max", "min") and all(is_dep):
            raise UnsupportedPrimitiveError(
                f"'{name}' of two input-dependent operands (at {where}) has no linear relaxation; "
                "only max/min with a constant (relu, clipping) is supported.")
        return "act"
    if name == "reduce_window_max":
        return "maxpool"
    raise UnsupportedPrimitiveError(
        f"Linear bound propagation has no rule for primitive '{name}' (at {where}). Supported: "
        f"{', '.join(sorted(_AFFINE | _ACTIVATIONS | {'reduce_window_max'} | set(_CALLS)))}.")


def _exactness(name, kind, dep_levels):
    """Level of IBP's exactness for a node's output given its dependent inputs' levels."""
    worst = max(dep_levels)
    if kind != "affine":  # monotone element-wise map of exact intervals stays exact per element
        return _EXACT if (kind == "act" and worst <= _EXACT) else _LOOSE
    if name in _MIXING or (name in ("add", "add_any", "sub") and len(dep_levels) > 1):
        return _EXACT if worst == _RAW else _LOOSE
    return worst


def _trace_tape(jaxpr, consts, args, tape: _Tape, on_activation, context=""):
    """Interprets ``jaxpr``: constants are evaluated, input-dependent equations recorded as nodes with
    their IBP intervals. ``on_activation(tape, ref)`` may tighten the interval of an activation's
    input before it is used (CROWN intermediate bounds)."""
    env = _JaxprEnv(jaxpr, consts, args)
    read = env.read
    for index, eqn in enumerate(jaxpr.eqns):
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if not any(isinstance(a, _Ref) for a in ins):
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        elif name in _CALLS:
            inner = eqn.params[_CALLS[name]]
            ctx = context or _where(eqn, index)
            if hasattr(inner, "jaxpr"):
                outs = _trace_tape(inner.jaxpr, inner.consts, ins, tape, on_activation, ctx)
            else:
                outs = _trace_tape(inner, [], ins, tape, on_activation, ctx)
        else:
            where = _where(eqn, index)
            if context and where.startswith("unknown location"):
                where = f"{context}, inside that call"
            kind = _classify(name, ins, where)
            if kind in ("act", "maxpool"):
                for a in ins:
                    if isinstance(a, _Ref):
                        on_activation(tape, a)
            iv_ins = [tape.iv[a.id] if isinstance(a, _Ref) else a for a in ins]
            if name in ("select_n", "gather", "dynamic_slice", "reduce_precision"):
                lo = eqn.primitive.bind(*[i.lo if isinstance(i, Interval) else i for i in iv_ins], **eqn.params)
                hi = eqn.primitive.bind(*[i.hi if isinstance(i, Interval) else i for i in iv_ins], **eqn.params)
                out_iv = Interval(lo, hi)
            else:
                out_iv = _RULES[name](eqn.primitive, eqn.params, *iv_ins)
            aval = eqn.outvars[0].aval
            ref = tape.new(aval.shape, aval.dtype)
            tape.iv[ref.id] = out_iv
            tape.producer[ref.id] = len(tape.nodes)
            tape.level[ref.id] = _exactness(name, kind, [tape.level[a.id] for a in ins if isinstance(a, _Ref)])
            tape.nodes.append(_Node(kind, eqn.primitive, eqn.params, ins, ref, where))
            outs = [ref]
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


# ----------------------------------------------------------------------------- relaxations
def _relu_lines(l, u, mode):
    """Lines (al, bl, au, bu) with al z + bl <= relu(z) <= au z + bu on [l, u] (eq. 3.4)."""
    unstable = (l < 0) & (u > 0)
    s = jnp.where(unstable, u / jnp.where(unstable, u - l, 1.0), (l >= 0).astype(l.dtype))
    au, bu = s, jnp.where(unstable, -l * s, 0.0)
    if mode == "adaptive":
        al = jnp.where(unstable, (u > -l).astype(l.dtype), s)
    elif mode == "same_slope":
        al = s
    else:
        raise ValueError(f"relu relaxation must be one of {RELU_RELAXATIONS}, got {mode!r}")
    return al, jnp.zeros_like(l), au, bu


def _sigmoid_like(name):
    if name == "logistic":
        phi = jax.nn.sigmoid
        dphi = lambda z: jax.nn.sigmoid(z) * (1 - jax.nn.sigmoid(z))

        def tangent_points(d):  # Table 3.1: φ'(t) = d  ⇔  φ(t) = (1 ± sqrt(1-4d)) / 2
            s = jnp.sqrt(jnp.clip(1 - 4 * d, 0.0, 1.0))
            p = 2 * d / (1 + s)  # = (1 - s) / 2 without cancellation
            t1 = jnp.log(p) - jnp.log1p(-p)
            return t1, -t1

        def chord_slope(l, u):
            # σ(u) - σ(l) = -expm1(-(u-l)) σ(u) σ(-l): no cancellation for narrow intervals.
            w = u - l
            ratio = jnp.where(w > 1e-12, -jnp.expm1(-w) / jnp.where(w > 1e-12, w, 1.0), 1.0)
            return ratio * jax.nn.sigmoid(u) * jax.nn.sigmoid(-l)
    else:
        phi = jnp.tanh
        dphi = lambda z: 1 - jnp.tanh(z) ** 2

        def tangent_points(d):  # φ'(t) = d  ⇔  φ(t) = ± sqrt(1 - d)
            t2 = jnp.arctanh(jnp.clip(jnp.sqrt(jnp.clip(1 - d, 0.0, 1.0)), 0.0, 1 - 1e-7))
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
    return phi, dphi, tangent_points, chord_slope


def _sigmoid_lines(name, l, u, mode):
    phi, dphi, tangent_points, chord_slope = _sigmoid_like(name)
    m = 0.5 * (l + u)
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
    elif mode == "tight":
        chord_b = phi(l) - k * l
        tan_m_a, tan_m_b = dphi(m), phi(m) - dphi(m) * m

        def bisect(h, lo, hi, keep_hi):
            def body(_, c):
                a, b = c
                mid = 0.5 * (a + b)
                pos = h(mid) >= 0
                return (jnp.where(pos, a, mid), jnp.where(pos, mid, b))
            a, b = jax.lax.fori_loop(0, 40, body, (lo, hi))
            return b if keep_hi else a

        # Upper bound, crossing case: tangent at d_u >= 0 through (l, φ(l)) unless the chord is valid.
        hu = lambda t: phi(t) + dphi(t) * (l - t) - phi(l)  # >= 0 : tangent at t is above φ(l) at l
        du = bisect(hu, jnp.zeros_like(l), jnp.maximum(u, 0.0), keep_hi=True)
        chord_ok_u = hu(u) <= 0
        # Lower bound, crossing case: tangent at d_l <= 0 through (u, φ(u)) unless the chord is valid.
        hl = lambda t: phi(u) - (phi(t) + dphi(t) * (u - t))  # >= 0 : tangent at t is below φ(u) at u
        dl = bisect(lambda t: -hl(t), jnp.minimum(l, 0.0), jnp.zeros_like(l), keep_hi=False)
        chord_ok_l = hl(l) <= 0
        # hl as used by bisect: -hl(t) >= 0 moves the upper end; keep the lower end (hl >= 0 side).
        convex, concave = u <= 0, l >= 0
        au = jnp.where(convex | chord_ok_u, k, jnp.where(concave, tan_m_a, dphi(du)))
        bu = jnp.where(convex | chord_ok_u, chord_b, jnp.where(concave, tan_m_b, phi(du) - dphi(du) * du))
        al = jnp.where(concave | chord_ok_l, k, jnp.where(convex, tan_m_a, dphi(dl)))
        bl = jnp.where(concave | chord_ok_l, chord_b, jnp.where(convex, tan_m_b, phi(dl) - dphi(dl) * dl))
        # the concave case's upper / convex case's lower use the tangent at the centre
        au = jnp.where(concave, tan_m_a, au)
        bu = jnp.where(concave, tan_m_b, bu)
        al = jnp.where(convex, tan_m_a, al)
        bl = jnp.where(convex, tan_m_b, bl)
    else:
        raise ValueError(f"sigmoid/tanh relaxation must be one of {SIGMOID_RELAXATIONS}, got {mode!r}")
    # Float slack: the lines are exact in real arithmetic; widen by a few ulps of the output range.
    slack = 2e-7 * (1.0 + jnp.abs(l) + jnp.abs(u))
    return al, bl - slack, au, bu + slack


def _activation_lines(node, iv, relu_mode, sigmoid_mode):
    """Lines relating the activation's output to its (only) input-dependent operand."""
    name = node.prim.name
    l, u = iv.lo, iv.hi
    if name in ("logistic", "tanh"):
        return _sigmoid_lines(name, l, u, sigmoid_mode)
    dep = 0 if isinstance(node.ins[0], _Ref) else 1
    c = jnp.asarray(node.ins[1 - dep], l.dtype)
    if name == "max":  # max(z, c) = relu(z - c) + c
        al, bl, au, bu = _relu_lines(l - c, u - c, relu_mode)
        return al, bl - al * c + c, au, bu - au * c + c
    # min(z, c) = z - relu(z - c)
    al, bl, au, bu = _relu_lines(l - c, u - c, relu_mode)
    return 1 - au, -(bu - au * c), 1 - al, -(bl - al * c)


def _window_patches(x, params, pad_value):
    """Stack of the window's elements for every output position: shape (n_window, *out)."""
    dims, strides = params["window_dimensions"], params["window_strides"]
    padding, wdil = params["padding"], params.get("window_dilation", (1,) * len(dims))
    if any(d != 1 for d in params.get("base_dilation", (1,) * len(dims))):
        raise UnsupportedPrimitiveError("max pooling with base dilation has no linear rule.")
    xp = jax.lax.pad(x, jnp.asarray(pad_value, x.dtype), [(lo, hi, 0) for lo, hi in padding])
    out_shape = [(xp.shape[i] - (dims[i] - 1) * wdil[i] - 1) // strides[i] + 1 for i in range(x.ndim)]
    pieces = []
    for off in itertools.product(*[range(d) for d in dims]):
        start = [o * wd for o, wd in zip(off, wdil)]
        limit = [s + (n - 1) * st + 1 for s, n, st in zip(start, out_shape, strides)]
        pieces.append(jax.lax.slice(xp, start, limit, strides))
    return jnp.stack(pieces)


def maxpool_lines(iv: Interval, params, dtype):
    """Linear relaxation of max pooling from its input intervals: ``onehot`` (n_window, *out) selects
    the element with the largest lower bound. Lower line: that element. Upper line: that element
    where it dominates (its lower bound >= every other upper bound: the max is exactly it,
    ``dominant`` = 1), else the constant ``upper`` = the largest upper bound (0 where dominant)."""
    lp = _window_patches(iv.lo, params, -jnp.inf)
    up = _window_patches(iv.hi, params, -jnp.inf)
    star = jnp.argmax(lp, axis=0)
    onehot = (jnp.arange(lp.shape[0]).reshape((-1,) + (1,) * (lp.ndim - 1)) == star).astype(dtype)
    u_others = jnp.max(jnp.where(onehot > 0, -jnp.inf, up), axis=0)
    dominant = jnp.max(lp, axis=0) >= u_others
    return onehot, dominant.astype(dtype), jnp.where(dominant, 0.0, jnp.max(up, axis=0)).astype(dtype)


# ----------------------------------------------------------------------------- backward pass
class _Options(NamedTuple):
    relu: str
    sigmoid: str


def node_function(node):
    """(positions of the input-dependent operands, h) with h(*dependent values) = the node's output,
    the constant operands fixed. For an affine node h is affine: h(v) = J v + h(0)."""
    dep_pos = [i for i, a in enumerate(node.ins) if isinstance(a, _Ref)]

    def h(*dep_vals):
        args = list(node.ins)
        for i, v in zip(dep_pos, dep_vals):
            args[i] = v
        return node.prim.bind(*args, **node.params)

    return dep_pos, h


def strided_conv_transpose(rows, kernel, params, in_hw):
    """Pull rows (N, Ho, Wo, Cout) back through an NHWC 2-D convolution with strides > 1 (its
    transpose), as s_h·s_w stride-1 convolutions with the kernel's phases ("polyphase"), or None
    where that does not apply (dilation, groups, negative padding, other layouts).

    ``jax.vjp`` of a strided convolution is a convolution with input dilation, which XLA:CPU runs
    2-3x slower than these stride-1 convolutions (measured on the bound passes' shapes)."""
    dn = params["dimension_numbers"]
    strides = tuple(params["window_strides"])
    if (len(strides) != 2 or max(strides) == 1 or tuple(dn.lhs_spec) != (0, 3, 1, 2)
            or tuple(dn.out_spec) != (0, 3, 1, 2) or any(v != 1 for v in params["lhs_dilation"])
            or any(v != 1 for v in params["rhs_dilation"]) or params["feature_group_count"] != 1
            or params.get("batch_group_count", 1) != 1 or any(lo < 0 for lo, _ in params["padding"])):
        return None
    o, i, sh, sw = dn.rhs_spec
    k = jnp.transpose(kernel, (sh, sw, i, o))  # HWIO
    ph, pw = params["padding"][0][0], params["padding"][1][0]
    n, ho, wo, _ = rows.shape
    H, W = in_hw
    qh, qw = -(-(ph + H) // strides[0]), -(-(pw + W) // strides[1])
    phases = []
    for rh in range(strides[0]):
        row = []
        for rw in range(strides[1]):
            sub = k[rh::strides[0], rw::strides[1]]  # taps r + s·t
            if sub.shape[0] == 0 or sub.shape[1] == 0:
                row.append(jnp.zeros((n, qh, qw, k.shape[2]), rows.dtype))
                continue
            th, tw = sub.shape[:2]
            w = jnp.transpose(jnp.flip(sub, (0, 1)), (0, 1, 3, 2))  # correlate with the flipped phase
            z = jax.lax.conv_general_dilated(
                rows, w.astype(rows.dtype), (1, 1),
                ((th - 1, max(0, qh - ho)), (tw - 1, max(0, qw - wo))),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=params.get("precision"))
            row.append(z[:, :qh, :qw])
        phases.append(jnp.stack(row, axis=3))  # (N, qh, qw, sw, Cin)
    full = jnp.stack(phases, axis=2)  # (N, qh, sh, qw, sw, Cin)
    full = full.reshape(n, qh * strides[0], qw * strides[1], -1)
    return full[:, ph:ph + H, pw:pw + W]


def _affine_pullback(node, lam, tape):
    """Pull Λ (R, *out) back through an affine node: returns {ref id: Λ_in} and bias (R,)."""
    if node.prim.name == "conv_general_dilated" and isinstance(node.ins[0], _Ref) \
            and not isinstance(node.ins[1], _Ref) and len(tape.shape[node.ins[0].id]) == 4 \
            and tape.shape[node.ins[0].id][0] == 1:
        in_shape = tape.shape[node.ins[0].id]
        R = lam.shape[0]
        g = strided_conv_transpose(lam.reshape((R,) + lam.shape[2:]), node.ins[1], node.params,
                                   in_shape[1:3])
        if g is not None:
            return {node.ins[0].id: g.reshape((R,) + in_shape).astype(lam.dtype)}, jnp.zeros((R,), lam.dtype)
    dep_pos, h = node_function(node)
    zeros = [jnp.zeros(tape.shape[node.ins[i].id], tape.dtype[node.ins[i].id]) for i in dep_pos]
    const_part, vjp = jax.vjp(h, *zeros)
    pulled = jax.vmap(vjp)(lam.astype(const_part.dtype))
    bias = jnp.sum((lam * const_part).reshape(lam.shape[0], -1), axis=1)
    out: Dict[int, jax.Array] = {}
    for i, g in zip(dep_pos, pulled):
        rid = node.ins[i].id
        out[rid] = out[rid] + g if rid in out else g
    return out, bias


def _pos_neg(lam):
    return jnp.maximum(lam, 0.0), jnp.minimum(lam, 0.0)


def _backward(tape: _Tape, start_id: int, lam, opts: _Options, elide_to_ibp: bool = False,
              paired: bool = False):
    """Lower bound of <Λ, v_start> as <Λ_x, x> + bias over the intervals on the tape.

    With ``elide_to_ibp`` the pass stops at the first non-affine node it meets and concretises with
    that node's IBP interval (IBP with elision of the trailing affine layers). With ``paired`` the
    rows stand for both Λ and -Λ (lower and upper bounds): they are pulled back once through the
    affine nodes before the first relaxation and only then split, halving that work."""
    lams: Dict[int, jax.Array] = {start_id: lam}
    R = lam.shape[0]
    bias = jnp.zeros((R,), lam.dtype)
    last = tape.producer.get(start_id, -1)

    def unpair():
        nonlocal bias, R
        for k in list(lams):
            lams[k] = jnp.concatenate([lams[k], -lams[k]])
        bias = jnp.concatenate([bias, -bias])
        R = 2 * R

    for ni in range(last, -1, -1):
        node = tape.nodes[ni]
        if node.out.id not in lams:
            continue
        if paired and node.kind != "affine":
            unpair()
            paired = False
        lam_out = lams.pop(node.out.id)
        if node.kind == "affine":
            pulled, b = _affine_pullback(node, lam_out, tape)
            bias = bias + b
            for rid, g in pulled.items():
                lams[rid] = lams[rid] + g if rid in lams else g
            continue
        if elide_to_ibp:
            iv = tape.iv[node.out.id]
            pos, neg = _pos_neg(lam_out)
            bias = bias + jnp.sum((pos * iv.lo + neg * iv.hi).reshape(R, -1), axis=1)
            continue
        if node.kind == "act":
            dep = [a for a in node.ins if isinstance(a, _Ref)][0]
            al, bl, au, bu = _activation_lines(node, tape.iv[dep.id], opts.relu, opts.sigmoid)
            pos, neg = _pos_neg(lam_out)
            g = pos * al + neg * au
            bias = bias + jnp.sum((pos * bl + neg * bu).reshape(R, -1), axis=1)
        else:  # maxpool
            dep = node.ins[0]
            onehot, dominant, upper = maxpool_lines(tape.iv[dep.id], node.params, lam.dtype)
            pos, neg = _pos_neg(lam_out)
            lam_sel = pos + neg * dominant
            bias = bias + jnp.sum((neg * upper).reshape(R, -1), axis=1)
            sel = lambda z: jnp.sum(onehot * _window_patches(z, node.params, 0.0), axis=0)
            _, vjp = jax.vjp(sel, jnp.zeros(tape.shape[dep.id], lam.dtype))
            g = jax.vmap(lambda r: vjp(r)[0])(lam_sel)
        lams[dep.id] = lams[dep.id] + g if dep.id in lams else g
    if paired:
        unpair()
    return lams, bias


def min_linear(lam, bias, x, scale, lo, hi, eps, norm):
    """min over x' = x + ε⃗ ⊙ v, ||v||_p <= ε, lo <= x' <= hi of <Λ, x'> + bias (exact), with the
    features on the last axis of every argument (leading axes broadcast: rows, window positions)."""
    vlo, vhi = geometry.scaled_box(x, scale, lo, hi)
    w, c = geometry.descent_caps(lam * scale, vlo, vhi)  # lam * scale: gradient w.r.t. v
    return jnp.sum(lam * x, axis=-1) + bias - geometry.max_capped_gain(w, c, eps, norm)


def _concretise(lam_x, bias, x, scale, lo, hi, eps, norm):
    """:func:`min_linear` for rows Λ (R, *x.shape): (R,)"""
    flat = lambda v: jnp.broadcast_to(v, x.shape).reshape(-1)
    return min_linear(lam_x.reshape(lam_x.shape[0], -1), bias, flat(x), flat(scale), flat(lo), flat(hi),
                      eps, norm)


# ----------------------------------------------------------------------------- public API
METHODS = {
    # name: (intermediate bounds, relu relaxation, sigmoid relaxation)
    "crown": ("crown", "adaptive", "tight"),
    "fastlin": ("crown", "same_slope", "analytic"),  # Algorithm 3.1 / LA-inspired bounds (L-PER)
    "crown_ibp": ("ibp", "adaptive", "tight"),
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
    return inter, (relu or r or "adaptive"), (sigmoid or s or "tight")


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
    from jaxrobust.bounds import patches as local  # (imports this module)
    tape = _Tape()
    x_ref = tape.new(x.shape, x.dtype)
    # Input interval hull of the set (exact for l_inf).
    tape.iv[x_ref.id] = Interval(jnp.maximum(x - scale * eps, lo), jnp.minimum(x + scale * eps, hi))
    tape.level[x_ref.id] = _RAW if norm == "linf" else _LOOSE

    def on_activation(tp: _Tape, ref: _Ref):
        if intermediate != "crown" or ref.id in tp.done or tp.level[ref.id] <= _EXACT:
            return  # IBP is already exact there (e.g. the first layer under l_inf)
        shape = tp.shape[ref.id]
        plan = local.local_plan(tp, ref.id, x_ref.id) if patches else None
        if plan is not None:  # convolutional layer: rows on their receptive fields only
            cl, cu = local.intermediate_bounds(tp, ref.id, x_ref.id, plan, opts, x, scale, lo, hi, eps, norm)
        else:
            n = int(np.prod(shape))
            eye = jnp.eye(n, dtype=x.dtype).reshape((n,) + shape)
            lams, bias = _backward(tp, ref.id, eye, opts, paired=True)
            lam_x = lams.get(x_ref.id, jnp.zeros((2 * n,) + x.shape, x.dtype))
            low = _concretise(lam_x, bias, x, scale, lo, hi, eps, norm)
            cl, cu = low[:n].reshape(shape), -low[n:].reshape(shape)
        iv = tp.iv[ref.id]
        tp.iv[ref.id] = (Interval(jnp.maximum(iv.lo, cl), jnp.minimum(iv.hi, cu)) if intersect
                         else Interval(cl, cu))
        tp.done.add(ref.id)

    outs = _trace_tape(closed.jaxpr, closed.consts, [x_ref], tape, on_activation)
    return tape, x_ref, outs[0]


def _spec_bounds_one(closed, x, scale, lo, hi, eps, spec, *, norm, intermediate, opts, elide_ibp,
                     intersect, patches):
    """Per-example worker (vmapped): lower bounds of spec · f over S(x), (U, p), and the interval
    (IBP) lower bound of spec · f from the output's intervals."""
    tape, x_ref, out = _build_tape(closed, x, scale, lo, hi, eps, norm=norm, intermediate=intermediate,
                                   opts=opts, intersect=intersect, patches=patches)
    R = spec.shape[0]
    if not isinstance(out, _Ref):  # the output does not depend on the input
        val = jnp.sum((spec * out).reshape(R, -1), axis=1)
        return val, jnp.zeros((R,) + x.shape, x.dtype), val, val
    pos, neg = _pos_neg(spec.astype(x.dtype))
    iv = tape.iv[out.id]
    interval_lower = jnp.sum((pos * iv.lo + neg * iv.hi).reshape(R, -1), axis=1)
    lams, bias = _backward(tape, out.id, spec.astype(x.dtype), opts, elide_to_ibp=elide_ibp)
    lam_x = lams.get(x_ref.id, jnp.zeros((R,) + x.shape, x.dtype))
    lower = _concretise(lam_x, bias, x, scale, lo, hi, eps, norm)
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
                                   opts=_Options(relu_mode, sig_mode))
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
        as auto_LiRPA without ``compare_crown_with_ibp``; never tighter).
      patches: compute the intermediate bounds of convolutional layers on receptive-field windows
        (:mod:`jaxrobust.bounds.patches`; same bounds as dense rows, several times faster).
    Returns LinearBounds(lower (B,R), U (B,R,*f), p (B,R)).
    """
    lb, _ = _spec_bounds(fn, x, threat, spec, method, relu, sigmoid, intersect_ibp, patches)
    return lb


def _spec_bounds(fn, x, threat, spec, method, relu, sigmoid, intersect_ibp, patches, traced=None):
    """(LinearBounds, interval lower bound of spec · fn from the output intervals (B, R)).
    ``traced``: fn's ``_single_example_fn`` when the caller already has it (fn is traced once)."""
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
        opts=_Options(relu_mode, sig_mode), elide_ibp=(method == "ibp"), intersect=intersect_ibp,
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
    threat.validate_inputs(x, y)
    closed, out_shape = _single_example_fn(fn, x.shape[1:], x.dtype)
    if len(out_shape) != 1:
        raise ValueError(f"margin_bounds needs fn to return logits (B, K); got per-example shape {out_shape}.")
    b, _ = _spec_bounds(fn, x, threat, margin_spec(y, out_shape[0], x.dtype), method, relu, sigmoid,
                        intersect_ibp, patches, traced=(closed, out_shape))
    is_y = jax.nn.one_hot(y, out_shape[0], dtype=bool)
    return MarginBounds(jnp.where(is_y, 0.0, b.lower), b.U, jnp.where(is_y, 0.0, b.p))


def certified_by_bounds(mb: MarginBounds, y) -> jax.Array:
    """(B,) True where every margin lower bound (i != y) is positive."""
    is_y = jax.nn.one_hot(y, mb.lower.shape[-1], dtype=bool)
    return jnp.all(is_y | (mb.lower > 0), axis=-1)
