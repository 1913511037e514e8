"""Interval bound propagation (IBP, thesis §3.1.2, Algorithm 3.2) for any pure JAX function.

``ibp_bounds(fn, x, threat)`` traces ``fn`` to a jaxpr at ``x``'s shape and interprets it with
:func:`jaxrobust.bounds.tape.interpret` and the interval rules :data:`IBP_RULES` (one per primitive of
:data:`jaxrobust.bounds.tape.PRIMITIVES`). Values that do not depend on the input are evaluated
concretely, so BatchNorm in eval mode becomes an affine map; calls are inlined. Linear operations use
the centre/radius form of Algorithm 3.2 (μ' = W μ + b, r' = |W| r); monotone maps take the end points.
A primitive without a rule raises :class:`UnsupportedPrimitiveError` naming it and where it occurs in
the user's code.

The input set S(x) = {x + ε⃗ ⊙ v : ||v||_p <= ε} ∩ box. Under l_inf its interval hull (x ± ε·ε⃗ clipped to
the box) is exact. Under l_2 / l_1 the hull is 3-12x too wide after a dense or conv layer, so the input
is kept as the ball itself (:class:`Ball`) through element-wise affine maps and permutations of its
elements (normalisation, reshapes) up to the first dot/conv, whose outputs are bounded exactly:
w·x' ∈ w·x ± ε ||w ⊙ ε⃗||_q (q the dual norm; eq. 3.11's dual-norm rule for one layer), intersected
with the interval of the box-clipped hull (sound; equal to it for l_inf). Everything is
jit/vmap-able and differentiable w.r.t. parameters closed over by ``fn``.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as P

from jaxrobust.bounds import tape as T
from jaxrobust.bounds.tape import Interval, UnsupportedPrimitiveError
from jaxrobust.threat import ThreatModel

__all__ = ["Interval", "UnsupportedPrimitiveError", "Ball", "IBP_RULES", "ibp_rule", "input_interval",
           "input_value", "interval_bounds", "ibp_bounds", "ibp_margin_lower_bounds",
           "supported_primitives", "check_batch"]


def _is_iv(v):
    return isinstance(v, Interval)


def _from_center(c, r):
    return Interval(c - r, c + r)


# ----------------------------------------------------------------------------- interval rules
def _bilinear(prim, params, a, b):
    """dot_general / conv: exactly one operand is an interval (the other a constant)."""
    if _is_iv(a) and _is_iv(b):
        raise UnsupportedPrimitiveError(f"{prim.name} of two input-dependent operands "
                                        "(a product of activations) has no IBP rule.")
    if _is_iv(a):
        return _from_center(prim.bind(a.center, b, **params), prim.bind(a.radius, jnp.abs(b), **params))
    return _from_center(prim.bind(a, b.center, **params), prim.bind(jnp.abs(a), b.radius, **params))


def _add(prim, params, a, b):
    alo, ahi = (a.lo, a.hi) if _is_iv(a) else (a, a)
    blo, bhi = (b.lo, b.hi) if _is_iv(b) else (b, b)
    return Interval(alo + blo, ahi + bhi)


def _sub(prim, params, a, b):
    alo, ahi = (a.lo, a.hi) if _is_iv(a) else (a, a)
    blo, bhi = (b.lo, b.hi) if _is_iv(b) else (b, b)
    return Interval(alo - bhi, ahi - blo)


def _mul(prim, params, a, b):
    if _is_iv(a) and _is_iv(b):
        cands = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
        return Interval(jnp.minimum(jnp.minimum(cands[0], cands[1]), jnp.minimum(cands[2], cands[3])),
                        jnp.maximum(jnp.maximum(cands[0], cands[1]), jnp.maximum(cands[2], cands[3])))
    iv, k = (a, b) if _is_iv(a) else (b, a)
    return _from_center(iv.center * k, iv.radius * jnp.abs(k))


def _div(prim, params, a, b):
    if _is_iv(b):
        raise UnsupportedPrimitiveError("division by an input-dependent value has no IBP rule.")
    return _mul(prim, params, a, 1.0 / b)


def _neg(prim, params, a):
    return Interval(-a.hi, -a.lo)


def _monotone_increasing(prim, params, *args):
    """Element-wise non-decreasing in every argument: max, min, relu, sigmoid, tanh, exp..."""
    los = [a.lo if _is_iv(a) else a for a in args]
    his = [a.hi if _is_iv(a) else a for a in args]
    return Interval(prim.bind(*los, **params), prim.bind(*his, **params))


def _structural(prim, params, *args):
    """Shape/copy/selection ops (reshape, broadcast, transpose, slice, concatenate, pad, select_n with
    a constant predicate, gather with constant indices, ...) and sums with non-negative weights:
    applied to both end points; constant operands are passed through unchanged."""
    los = [a.lo if _is_iv(a) else a for a in args]
    his = [a.hi if _is_iv(a) else a for a in args]
    return Interval(prim.bind(*los, **params), prim.bind(*his, **params))


IBP_RULES: Dict[object, Callable] = {
    lax.dot_general_p: _bilinear, lax.conv_general_dilated_p: _bilinear,
    lax.add_p: _add, P.add_jaxvals_p: _add, lax.sub_p: _sub, lax.mul_p: _mul, lax.div_p: _div,
    lax.neg_p: _neg,
    lax.max_p: _monotone_increasing, lax.min_p: _monotone_increasing, lax.logistic_p: _monotone_increasing,
    lax.tanh_p: _monotone_increasing, lax.exp_p: _monotone_increasing, lax.log_p: _monotone_increasing,
    lax.reduce_max_p: _monotone_increasing, lax.reduce_min_p: _monotone_increasing,
    lax.reduce_window_max_p: _monotone_increasing, lax.cumsum_p: _monotone_increasing,
    lax.reduce_sum_p: _structural, lax.reduce_window_sum_p: _structural,
    lax.reshape_p: _structural, lax.broadcast_in_dim_p: _structural, lax.transpose_p: _structural,
    lax.squeeze_p: _structural, lax.convert_element_type_p: _structural, lax.copy_p: _structural,
    lax.reduce_precision_p: _structural, lax.slice_p: _structural, lax.concatenate_p: _structural,
    lax.pad_p: _structural, lax.rev_p: _structural,
    lax.select_n_p: _structural, lax.gather_p: _structural, lax.dynamic_slice_p: _structural,
}


def supported_primitives():
    """Names of the primitives IBP handles (and the inlined calls)."""
    return T.supported_primitives("ibp")


# ----------------------------------------------------------------------------- the l_p ball
class Ball:
    """The input set kept exact through affine maps that permute or scale its elements:
    value = c + s ⊙ v with ||v||_p <= 1 per example (v indexed like the input; s carries ε·ε⃗ and any
    scaling applied since), and ``iv`` the interval of the same value from the box-clipped hull."""
    __slots__ = ("c", "s", "iv", "norm")

    def __init__(self, c, s, iv, norm):
        self.c, self.s, self.iv, self.norm = c, s, iv, norm


_BALL_LAYOUT = (lax.reshape_p, lax.transpose_p, lax.squeeze_p, lax.convert_element_type_p, lax.copy_p,
                lax.rev_p, lax.reduce_precision_p)


def _dual_norm_rows(prim, params, ball_first, s, w, norm):
    """||row ⊙ s||_q of every output of the bilinear map ``prim`` with constant operand ``w``
    (q = 2 for the l_2 ball, inf for l_1), or None where no exact rule applies."""
    args = (lambda a, b: (a, b) if ball_first else (b, a))
    if norm == "l2":
        # (floored: finite gradients where a row or ε is 0, e.g. at the start of an ε schedule)
        return jnp.sqrt(jnp.maximum(prim.bind(*args(s * s, w * w), **params), 1e-30))
    # l_1: max_j |w_ij s_j|: products of the contraction terms, reduced by max one term at a time.
    if not ball_first:
        return None
    if prim is lax.dot_general_p:
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        if lb or rb or params.get("preferred_element_type") not in (None, s.dtype):
            return None
        lf = [d for d in range(s.ndim) if d not in lc]
        rf = [d for d in range(w.ndim) if d not in rc]
        a = jnp.transpose(jnp.abs(s), lf + list(lc))
        b = jnp.transpose(jnp.abs(w), list(rc) + rf)
        n_c = int(np.prod([w.shape[d] for d in rc]))
        a = a.reshape(a.shape[:len(lf)] + (n_c,))
        b = b.reshape((n_c,) + tuple(w.shape[d] for d in rf))
        out_shape = a.shape[:-1] + b.shape[1:]
        a2 = jnp.moveaxis(a, -1, 0).reshape(n_c, -1)
        b2 = b.reshape(n_c, -1)
        step = lambda m, ab: (jnp.maximum(m, ab[0][:, None] * ab[1][None, :]), None)
        m, _ = lax.scan(step, jnp.zeros((a2.shape[1], b2.shape[1]), s.dtype), (a2, b2))
        return m.reshape(out_shape)
    # convolution: its input patches (feature = (C_in, *window) flattened) against the kernel rows
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1 \
            or params.get("preferred_element_type") not in (None, s.dtype):
        return None
    dn = params["dimension_numbers"]
    kshape = [w.shape[d] for d in dn.rhs_spec[2:]]
    patches = lax.conv_general_dilated_patches(
        jnp.abs(s), kshape, params["window_strides"], params["padding"], params["lhs_dilation"],
        params["rhs_dilation"], dn, precision=params.get("precision"))
    # kernel rows in the patches' feature order: (C_in, *spatial) -> (F, C_out)
    k = jnp.transpose(jnp.abs(w), (dn.rhs_spec[1],) + tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[0],))
    k = k.reshape(-1, w.shape[dn.rhs_spec[0]])
    feat_axis = dn.out_spec[1]
    p = jnp.moveaxis(patches, feat_axis, 0)  # (F, *out without feature axis)

    def step(m, pk):
        pf, kf = pk  # (*out_rest), (C_out,)
        return jnp.maximum(m, jnp.expand_dims(pf, feat_axis) * kf.reshape(
            [-1 if d == feat_axis else 1 for d in range(patches.ndim)])), None
    init = jnp.zeros(patches.shape[:feat_axis] + (k.shape[1],) + patches.shape[feat_axis + 1:], s.dtype)
    m, _ = lax.scan(step, init, (p, k))
    return m


def _ball_rule(prim, params, ins):
    """The exact rule for an op on a :class:`Ball`: a Ball, or an Interval (the dual-norm bound of a
    dot/conv intersected with the hull's interval; the hull's interval for every other op)."""
    balls = [a for a in ins if isinstance(a, Ball)]
    iv = IBP_RULES[prim](prim, params, *[a.iv if isinstance(a, Ball) else a for a in ins])
    if len(balls) != 1 or any(_is_iv(a) for a in ins):
        return iv
    ball = balls[0]
    k_pos = [i for i, a in enumerate(ins) if not isinstance(a, Ball)]
    same_shape = iv.lo.shape == ball.c.shape
    if prim in _BALL_LAYOUT:
        return Ball(prim.bind(ball.c, **params), prim.bind(ball.s, **params), iv, ball.norm)
    if prim is lax.broadcast_in_dim_p and iv.lo.size == ball.c.size:  # unit axes only
        return Ball(prim.bind(ball.c, **params), prim.bind(ball.s, **params), iv, ball.norm)
    if prim in (lax.add_p, P.add_jaxvals_p) and same_shape:
        k = ins[k_pos[0]]
        return Ball(ball.c + k, jnp.broadcast_to(ball.s, ball.c.shape), iv, ball.norm)
    if prim is lax.sub_p and same_shape:
        k = ins[k_pos[0]]
        if isinstance(ins[0], Ball):
            return Ball(ball.c - k, ball.s, iv, ball.norm)
        return Ball(k - ball.c, -ball.s, iv, ball.norm)
    if prim is lax.neg_p:
        return Ball(-ball.c, -ball.s, iv, ball.norm)
    if prim is lax.mul_p and same_shape:
        k = ins[k_pos[0]]
        return Ball(ball.c * k, ball.s * k, iv, ball.norm)
    if prim is lax.div_p and same_shape and isinstance(ins[0], Ball):
        k = ins[1]
        return Ball(ball.c / k, ball.s / k, iv, ball.norm)
    if prim in (lax.dot_general_p, lax.conv_general_dilated_p):
        ball_first = isinstance(ins[0], Ball)
        w = ins[1] if ball_first else ins[0]
        r = _dual_norm_rows(prim, params, ball_first, ball.s, w, ball.norm)
        if r is None:
            return iv
        c = prim.bind(*((ball.c, w) if ball_first else (w, ball.c)), **params)
        return Interval(jnp.maximum(c - r, iv.lo), jnp.minimum(c + r, iv.hi))
    return iv


def ibp_rule(prim, params, ins, where: str = "unknown location"):
    """Output of one input-dependent equation: its IBP rule on Interval / :class:`Ball` / constant
    operands (a Ball where it stays exact, else an Interval)."""
    if prim not in IBP_RULES:
        raise T.unsupported("Bound propagation", prim.name, where, "ibp")
    if T.PRIMITIVES[prim].category == T.STRUCTURAL:
        T.check_const_operands(prim, [not _is_const(a) for a in ins], where)
    if any(isinstance(a, Ball) for a in ins):
        return _ball_rule(prim, params, ins)
    return IBP_RULES[prim](prim, params, *ins)


def _is_const(v):
    return not (_is_iv(v) or isinstance(v, Ball))


def as_interval(v):
    """The interval of an IBP value (a Ball's interval is its box-clipped hull's image)."""
    return v.iv if isinstance(v, Ball) else v


def _apply(eqn, ins, where):
    out = ibp_rule(eqn.primitive, eqn.params, ins, where)
    return out if eqn.primitive.multiple_results else [out]


def eval_ibp(jaxpr, consts, args):
    """IBP of a jaxpr on Interval / Ball / constant arguments: its outputs."""
    return T.interpret(jaxpr, consts, args, lambda a: not _is_const(a), _apply)


# ----------------------------------------------------------------------------- entry points
def input_interval(x, threat: ThreatModel) -> Interval:
    """Interval hull of S(x) ∩ box: x ± ε·ε⃗ clipped to the box (exact for l_inf)."""
    r = threat.scale_for(x)
    lo, hi = x - r, x + r
    if threat.box is not None:
        lo, hi = jnp.maximum(lo, threat.box[0]), jnp.minimum(hi, threat.box[1])
    return Interval(lo, hi)


def input_value(x, threat: ThreatModel):
    """The IBP value of the input set: its interval hull (l_inf) or the :class:`Ball` (l_2 / l_1)."""
    iv = input_interval(x, threat)
    if threat.norm == "linf":
        return iv
    return Ball(x, jnp.broadcast_to(threat.scale_for(x), x.shape), iv, threat.norm)


def interval_bounds(fn, lo, hi) -> Tuple[jax.Array, jax.Array]:
    """IBP of ``fn`` over the box [lo, hi] (same shape as fn's input). Returns (lower, upper)."""
    closed = jax.make_jaxpr(fn)(lo)
    out = eval_ibp(closed.jaxpr, closed.consts, [Interval(lo, hi)])[0]
    if _is_const(out):  # the output does not depend on the input
        return out, out
    out = as_interval(out)
    return out.lo, out.hi


def check_batch(x, what: str = "x") -> None:
    """A batch (B, *features) of floating-point inputs (shape check that also runs under jit)."""
    if jnp.ndim(x) < 2:
        raise ValueError(f"{what} must be a batch of shape (B, *features), got shape {jnp.shape(x)}: "
                         "a batch axis is expected: pass x[None] for a single example.")
    chex.assert_rank(x, {i for i in range(2, 8)})


def ibp_bounds(fn, x, threat: ThreatModel) -> Tuple[jax.Array, jax.Array]:
    """Algorithm 3.2: element-wise bounds on ``fn(x')`` for every x' in S(x) (batch (B, ...)); the
    first dense/conv layer is bounded exactly over l_2 / l_1 balls (module docstring)."""
    check_batch(x)
    threat.validate_inputs(x)
    closed = jax.make_jaxpr(fn)(x)
    out = eval_ibp(closed.jaxpr, closed.consts, [input_value(x, threat)])[0]
    if _is_const(out):
        return out, out
    out = as_interval(out)
    return out.lo, out.hi


def _num_classes(fn, x) -> int:
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)))
    if not hasattr(out, "shape") or len(out.shape) != 2:
        raise ValueError(f"fn must return logits of shape (B, K); got {getattr(out, 'shape', type(out))}.")
    return int(out.shape[1])


def ibp_margin_lower_bounds(fn, x, y, threat: ThreatModel) -> jax.Array:
    """Lower bounds (B, K) on the margins z_y - z_i from the logit bounds (row y is 0). The
    logit bounds are combined without elision of the last layer (looser than eq 3.12's spec)."""
    check_batch(x)
    threat.validate_inputs(x, y, num_classes=_num_classes(fn, x))
    chex.assert_shape(y, (x.shape[0],))
    lo, hi = ibp_bounds(fn, x, threat)
    lo_y = jnp.take_along_axis(lo, y[:, None], axis=1)
    m = lo_y - hi
    return jnp.where(jax.nn.one_hot(y, lo.shape[-1], dtype=bool), 0.0, m)
