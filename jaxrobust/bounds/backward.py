"""The linear-bound tape, its backward pass (pull-backs) and the exact concretisation (thesis §3.1.1,
Algorithm 3.1).

:func:`trace_tape` interprets a traced function (:func:`jaxrobust.bounds.tape.interpret`) and records
every input-dependent equation as a :class:`Node` (kind ``'affine'``, ``'act'`` or ``'maxpool'`` from
:data:`LINEAR_RULES`) with the IBP interval of its output (:func:`jaxrobust.bounds.ibp.ibp_rule`;
the first dense/conv layer exact over l_2 / l_1 balls). :func:`backward` pulls a specification Λ
back through the tape:

* affine nodes (dense, conv, BatchNorm in eval mode, reshapes, residual additions, average pooling,
  concatenation, ...) through ``jax.vjp`` of the node's own primitive -- no weight matrix is ever
  materialised (a conv is pulled back by its transpose conv), the constant part ``h(0)`` of the node
  adds <Λ, h(0)> to the bias;
* activation nodes through a per-neuron linear relaxation a_l z + b_l <= φ(z) <= a_u z + b_u
  (eq. 3.3/3.6, :mod:`jaxrobust.bounds.relaxations`): positive rows of Λ take the lower line,
  negative rows the upper one;
* max pooling through its lines (:func:`jaxrobust.bounds.relaxations.maxpool_lines`).

:func:`min_linear` / :func:`concretise` minimise <Λ_x, x'> + bias exactly over S(x) = {x + ε⃗ ⊙ v :
||v||_p <= ε} ∩ box (:mod:`jaxrobust.bounds.geometry`).
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrobust.bounds import geometry
from jaxrobust.bounds import tape as T
from jaxrobust.bounds.ibp import Ball, as_interval, ibp_rule
from jaxrobust.bounds.relaxations import activation_lines, maxpool_lines, window_patches
from jaxrobust.bounds.tape import Interval, UnsupportedPrimitiveError

# Exactness levels of interval bounds, used to skip CROWN where IBP is already exact:
# 0 = independent coordinates of a box (the l_inf input), 1 = exact per element (one mixing map of a
# box, then element-wise ops), 2 = possibly loose.
RAW, EXACT, LOOSE = 0, 1, 2

# Kind of node of every primitive the linear pass handles (all categories but 'monotone').
LINEAR_RULES: Dict[Any, str] = {}
for _p, _i in T.PRIMITIVES.items():
    if _i.category == T.ACTIVATION:
        LINEAR_RULES[_p] = "act"
    elif _p is lax.reduce_window_max_p:
        LINEAR_RULES[_p] = "maxpool"
    elif _i.category in (T.AFFINE, T.BILINEAR, T.LAYOUT, T.STRUCTURAL) or (_i.category == T.POOLING and _i.mixing):
        LINEAR_RULES[_p] = "affine"
del _p, _i


class Node:
    """An input-dependent equation of the flattened function."""
    __slots__ = ("kind", "prim", "params", "ins", "out", "where", "const_arg")

    def __init__(self, kind, prim, params, ins, out, where, const_arg=None):
        self.kind, self.prim, self.params, self.ins, self.out = kind, prim, params, ins, out
        self.where, self.const_arg = where, const_arg


class Ref:
    """Reference to an input-dependent value (id into the tape's tables)."""
    __slots__ = ("id",)

    def __init__(self, i):
        self.id = i


class Tape:
    """Nodes in topological order with the interval (``iv``), shape, dtype, producer and exactness
    level of every ref; ``ball`` holds the refs still exact as an l_p ball (IBP's first layer)."""

    def __init__(self):
        self.nodes: List[Node] = []
        self.iv: Dict[int, Interval] = {}
        self.ball: Dict[int, Ball] = {}
        self.shape: Dict[int, tuple] = {}
        self.dtype: Dict[int, Any] = {}
        self.producer: Dict[int, int] = {}
        self.done: set = set()  # refs whose interval was already tightened by CROWN
        self.level: Dict[int, int] = {}  # exactness level of each ref's interval
        self.layout: Dict[int, tuple] = {}  # non-NHWC image layouts found by the patch form
        self.n = 0

    def new(self, shape, dtype):
        r = Ref(self.n)
        self.shape[r.id], self.dtype[r.id] = tuple(shape), dtype
        self.n += 1
        return r


class Options(NamedTuple):
    relu: str
    sigmoid: str
    # False when the threat model has no box: concretisation then takes the closed dual-norm form
    # (lo/hi arrays still bound the input interval, at ±inf).
    boxed: bool = True


def classify(prim, ins, where) -> str:
    """Kind of an input-dependent equation in the linear pass, or a clear error."""
    if prim not in LINEAR_RULES:
        raise T.unsupported("Linear bound propagation", prim.name, where, "linear")
    T.check_const_operands(prim, [isinstance(a, Ref) for a in ins], where)
    return LINEAR_RULES[prim]


def _exactness(prim, kind, dep_levels):
    """Level of IBP's exactness for a node's output given its dependent inputs' levels."""
    worst = max(dep_levels)
    if kind != "affine":  # monotone element-wise map of exact intervals stays exact per element
        return EXACT if (kind == "act" and worst <= EXACT) else LOOSE
    if T.PRIMITIVES[prim].mixing or (prim in (lax.add_p, T.P.add_jaxvals_p, lax.sub_p) and len(dep_levels) > 1):
        return EXACT if worst == RAW else LOOSE
    return worst


def trace_tape(jaxpr, consts, args, tape: Tape, on_activation):
    """Interprets ``jaxpr``: constants are evaluated, input-dependent equations recorded as nodes with
    their IBP intervals. ``on_activation(tape, ref)`` may tighten the interval of an activation's
    input before it is used (CROWN intermediate bounds)."""

    def apply(eqn, ins, where):
        prim = eqn.primitive
        kind = classify(prim, ins, where)
        if kind in ("act", "maxpool"):
            for a in ins:
                if isinstance(a, Ref):
                    on_activation(tape, a)
        vals = [(tape.ball.get(a.id) or tape.iv[a.id]) if isinstance(a, Ref) else a for a in ins]
        out = ibp_rule(prim, eqn.params, vals, where)
        aval = eqn.outvars[0].aval
        ref = tape.new(aval.shape, aval.dtype)
        tape.iv[ref.id] = as_interval(out)
        if isinstance(out, Ball):
            tape.ball[ref.id] = out
        tape.producer[ref.id] = len(tape.nodes)
        tape.level[ref.id] = _exactness(prim, kind, [tape.level[a.id] for a in ins if isinstance(a, Ref)])
        tape.nodes.append(Node(kind, prim, eqn.params, ins, ref, where))
        return [ref]

    return T.interpret(jaxpr, consts, args, lambda a: isinstance(a, Ref), apply)


def node_activation_lines(node: Node, iv: Interval, opts: Options):
    """Lines relating an activation node's output to its (only) input-dependent operand."""
    const = None
    if len(node.ins) == 2:
        const = node.ins[0] if isinstance(node.ins[1], Ref) else node.ins[1]
    return activation_lines(node.prim, iv.lo, iv.hi, const, opts.relu, opts.sigmoid)


def node_function(node):
    """(positions of the input-dependent operands, h) with h(*dependent values) = the node's output,
    the constant operands fixed. For an affine node h is affine: h(v) = J v + h(0)."""
    dep_pos = [i for i, a in enumerate(node.ins) if isinstance(a, Ref)]

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
            z = lax.conv_general_dilated(
                rows, w.astype(rows.dtype), (1, 1),
                ((th - 1, max(0, qh - ho)), (tw - 1, max(0, qw - wo))),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=params.get("precision"))
            row.append(z[:, :qh, :qw])
        phases.append(jnp.stack(row, axis=3))  # (N, qh, qw, sw, Cin)
    full = jnp.stack(phases, axis=2)  # (N, qh, sh, qw, sw, Cin)
    full = full.reshape(n, qh * strides[0], qw * strides[1], -1)
    return full[:, ph:ph + H, pw:pw + W]


def affine_pullback(node, lam, tape):
    """Pull Λ (R, *out) back through an affine node: returns {ref id: Λ_in} and bias (R,)."""
    if node.prim is lax.conv_general_dilated_p and isinstance(node.ins[0], Ref) \
            and not isinstance(node.ins[1], Ref) and len(tape.shape[node.ins[0].id]) == 4 \
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


def pos_neg(lam):
    return jnp.maximum(lam, 0.0), jnp.minimum(lam, 0.0)


def backward(tape: Tape, start_id: int, lam, opts: Options, elide_to_ibp: bool = False,
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
            pulled, b = affine_pullback(node, lam_out, tape)
            bias = bias + b
            for rid, g in pulled.items():
                lams[rid] = lams[rid] + g if rid in lams else g
            continue
        if elide_to_ibp:
            iv = tape.iv[node.out.id]
            pos, neg = pos_neg(lam_out)
            bias = bias + jnp.sum((pos * iv.lo + neg * iv.hi).reshape(R, -1), axis=1)
            continue
        if node.kind == "act":
            dep = [a for a in node.ins if isinstance(a, Ref)][0]
            al, bl, au, bu = node_activation_lines(node, tape.iv[dep.id], opts)
            pos, neg = pos_neg(lam_out)
            g = pos * al + neg * au
            bias = bias + jnp.sum((pos * bl + neg * bu).reshape(R, -1), axis=1)
        else:  # maxpool
            dep = node.ins[0]
            iv = tape.iv[dep.id]
            onehot, dominant, upper = maxpool_lines(iv.lo, iv.hi, node.params, lam.dtype)
            pos, neg = pos_neg(lam_out)
            lam_sel = pos + neg * dominant
            bias = bias + jnp.sum((neg * upper).reshape(R, -1), axis=1)
            sel = lambda z: jnp.sum(onehot * window_patches(z, node.params, 0.0), axis=0)
            _, vjp = jax.vjp(sel, jnp.zeros(tape.shape[dep.id], lam.dtype))
            g = jax.vmap(lambda r: vjp(r)[0])(lam_sel)
        lams[dep.id] = lams[dep.id] + g if dep.id in lams else g
    if paired:
        unpair()
    return lams, bias


def min_linear(lam, bias, x, scale, lo, hi, eps, norm, boxed: bool = True):
    """min over x' = x + ε⃗ ⊙ v, ||v||_p <= ε, lo <= x' <= hi of <Λ, x'> + bias (exact), with the
    features on the last axis of every argument (leading axes broadcast: rows, window positions).
    ``boxed=False`` ignores lo/hi: the closed form <Λ, x> + bias − ε·||Λ ⊙ ε⃗||_q."""
    vlo, vhi = geometry.scaled_box(x, scale, lo, hi) if boxed else (None, None)
    w, c = geometry.descent_caps(lam * scale, vlo, vhi)  # lam * scale: gradient w.r.t. v
    return jnp.sum(lam * x, axis=-1) + bias - geometry.max_capped_gain(w, c, eps, norm)


def concretise(lam_x, bias, x, scale, lo, hi, eps, norm, boxed: bool = True):
    """:func:`min_linear` for rows Λ (R, *x.shape): (R,)"""
    flat = lambda v: jnp.broadcast_to(v, x.shape).reshape(-1)
    if not boxed:
        return min_linear(lam_x.reshape(lam_x.shape[0], -1), bias, flat(x), flat(scale), None, None,
                          eps, norm, boxed=False)
    return min_linear(lam_x.reshape(lam_x.shape[0], -1), bias, flat(x), flat(scale), flat(lo), flat(hi),
                      eps, norm)


__all__ = ["RAW", "EXACT", "LOOSE", "LINEAR_RULES", "Node", "Ref", "Tape", "Options", "classify",
           "trace_tape", "node_activation_lines", "node_function", "strided_conv_transpose",
           "affine_pullback", "pos_neg", "backward", "min_linear", "concretise",
           "UnsupportedPrimitiveError"]
