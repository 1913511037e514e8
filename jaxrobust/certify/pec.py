"""Polyhedral Envelope Certification (thesis §3.3.1–3.3.2: Lemma 3.1, eqs 3.12–3.15, Algorithms 3.4–3.5).

The margin bounds of eq. (3.12), z_y(x') - z_i(x') >= U_i x' + p_i for x' in S_ε(x), define K-1
hyperplanes whose positive side is certified. PEC certifies the l_p ball of radius min(ε, d_y) where
d_y = min_{i≠y} d_iy and d_iy is the l_p distance from x to the hyperplane *inside the input box*
(problem 3.14). Algorithm 3.4 solves (3.14) by clipping and re-solving eq. (3.15); we solve it exactly
by sorting the break points of the same dual path (:func:`jaxrobust.bounds.geometry.min_norm_for_gain`),
for l_inf, l_2 and l_1 (l_1 is absent from the thesis's code).

With per-feature ε⃗ the distances are measured in the scaled norm ||Δ ⊘ ε⃗||_p (the threat's
``perturbation_norm``), so the radius is comparable with ``threat.eps``.

Memory: the public functions (:func:`certify`, :func:`optimal_eps_search`, :func:`certified_radius_curve`)
run the examples in chunks of a fixed size chosen from ``memory_budget_bytes`` (default 1 GiB), padded
to static shapes and mapped with ``lax.map``, so their peak memory does not grow with the batch. The
chunk size comes from :func:`bytes_per_example`, an estimate of one example's dense-row working set.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.bounds import geometry
from jaxrobust.bounds.linear import MarginBounds, margin_bounds
from jaxrobust.threat import ThreatModel, lp_norm


def _flat(a):
    return a.reshape(a.shape[:2] + (-1,))


def _scale_and_box(x, threat: ThreatModel):
    scale = threat.per_feature_eps
    scale = jnp.ones_like(x) if scale is None else jnp.broadcast_to(jnp.asarray(scale, x.dtype), x.shape)
    if threat.box is None:  # static: the closed forms of the geometry solvers
        return scale, None, None
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
    if use_box and vlo is not None:
        w, c = geometry.descent_caps(a, vlo.reshape(B, 1, -1), vhi.reshape(B, 1, -1))
    else:
        w, c = jnp.abs(a), None
    d = geometry.min_norm_for_gain(w, c, b, threat.norm)
    return jnp.where(jax.nn.one_hot(y, K, dtype=bool), jnp.inf, d)


def signed_distances(mb: MarginBounds, x, y, norm: str):
    """(U_i x + p_i) / ||U_i||_q without the box: differentiable, negative on the wrong side (for
    PER training, §3.3.3). Row y is +inf."""
    B, K = mb.lower.shape
    b = jnp.sum(_flat(mb.U) * x.reshape(B, 1, -1), axis=-1) + mb.p
    dual = {"linf": "l1", "l2": "l2", "l1": "linf"}[norm]
    rows = _flat(mb.U).reshape(B * K, -1)
    if dual == "l2":  # floored before the sqrt: row y is U = 0, whose sqrt(0) has a NaN gradient
        q = jnp.sqrt(jnp.maximum(jnp.sum(rows * rows, axis=-1), 1e-24)).reshape(B, K)
    else:
        q = lp_norm(rows, dual).reshape(B, K)
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


# ----------------------------------------------------------------------------- memory-bounded batches
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes (1 GiB) of bound-computation working set per chunk
# Live (rows x columns) arrays per example at the peak of a dense linear-bound pass: the back-substituted
# rows Λ, the weights and caps of the concretisation and one temporary (measured on fc1/MNIST, l_2 + box:
# ~22 MiB per example at rows x columns = 2048 x 784 float32, i.e. ~3.6 such arrays).
_LIVE_ROW_ARRAYS = 4


def _widest_values(jaxpr, acc):
    """Appends the size of every value computed in ``jaxpr`` (and in the jaxprs nested in its equations:
    jit, custom_jvp, scan, cond...) to ``acc``."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            acc.append(int(np.prod(getattr(v.aval, "shape", ()))))
        for val in eqn.params.values():
            for item in (val if isinstance(val, (tuple, list)) else (val,)):
                inner = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    _widest_values(inner, acc)


def bytes_per_example(fn: Callable, x, *, method: str = "crown", num_classes: Optional[int] = None) -> int:
    """Estimated working set (bytes) of one example's margin bounds: (2 n + K) rows x max(d, n)
    columns of ``x.dtype`` times a few live copies, where d is the input size and n the widest
    intermediate value of ``fn`` (every intermediate neuron gets a lower and an upper row, each
    back-substituted to the input, Alg. 3.1). IBP needs K rows only. Dense rows are an upper estimate
    for convolutional nets bounded on receptive windows (:mod:`jaxrobust.bounds.patches`)."""
    one = jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype)
    closed = jax.make_jaxpr(fn)(one)
    sizes = [1]
    _widest_values(closed.jaxpr, sizes)
    d = int(np.prod(x.shape[1:]))
    k = num_classes if num_classes is not None else int(np.prod(closed.out_avals[0].shape[1:]))
    n = max(sizes)
    rows = k if method == "ibp" else 2 * n + k
    return int(_LIVE_ROW_ARRAYS * rows * max(d, n) * np.dtype(x.dtype).itemsize)


def chunk_size(fn: Callable, x, memory_budget_bytes: int, *, method: str = "crown") -> int:
    """Examples per chunk so that a chunk's estimated working set fits ``memory_budget_bytes``
    (at least 1, at most the batch)."""
    if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, (int, np.integer)) \
            or memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be a positive integer (bytes), got {memory_budget_bytes!r}.")
    per = bytes_per_example(fn, x, method=method)
    return int(max(1, min(x.shape[0], memory_budget_bytes // max(per, 1))))


def _map_chunks(f, chunk: int, *args):
    """f over the leading (example) axis of every array in ``args`` in chunks of ``chunk`` examples:
    the last chunk is padded with copies of the first example (valid inputs) and the padding dropped,
    so every chunk has the same static shape and one compiled body serves all (``lax.map``)."""
    B = jax.tree_util.tree_leaves(args)[0].shape[0]
    if chunk >= B:
        return f(*args)
    n = -(-B // chunk)
    pad = n * chunk - B

    def prep(a):
        if pad:
            a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad,) + a.shape[1:])])
        return a.reshape((n, chunk) + a.shape[1:])

    out = jax.lax.map(lambda a: f(*a), jax.tree_util.tree_map(prep, args))
    return jax.tree_util.tree_map(lambda o: o.reshape((n * chunk,) + o.shape[2:])[:B], out)


def _per_example(threat: ThreatModel, x):
    """The threat's per-example arrays (ε (B,), ε⃗ when given per example) and a rebuild function."""
    eps = threat.eps_for(x)
    pf = threat.per_feature_eps
    per_ex_pf = pf is not None and jnp.ndim(pf) == x.ndim
    if per_ex_pf:
        pf = jnp.broadcast_to(jnp.asarray(pf, x.dtype), x.shape)

    def rebuild(e, p):
        return threat.replace(eps=e, per_feature_eps=p) if per_ex_pf else threat.replace(eps=e)

    return eps, (pf if per_ex_pf else None), rebuild


def check_entry_point(name, fn, x, y, threat: ThreatModel):
    """Clear eager errors (NaN, box, label shape and range: ThreatModel.validate_inputs) plus chex
    shape/type assertions that also hold under jit. Returns the number of classes."""
    if not callable(fn):
        raise TypeError(f"{name}: fn must be a callable mapping a batch (B, *f) to logits (B, K), got {type(fn)}.")
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"{name}: threat must be a ThreatModel, got {type(threat).__name__}.")
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    num_classes = None
    if x.ndim >= 2:  # else validate_inputs says a batch axis is expected
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
        if not hasattr(out, "shape") or len(out.shape) != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"{name}: fn must return logits of shape ({x.shape[0]}, K) for x of shape "
                             f"{x.shape}, got {getattr(out, 'shape', type(out))}.")
        num_classes = int(out.shape[1])
    threat.validate_inputs(x, y, num_classes=num_classes)
    chex.assert_rank(y, 1)
    chex.assert_axis_dimension(y, 0, x.shape[0])
    chex.assert_type([x, y], [float, int])
    return num_classes


def _certify_batch(fn, x, y, threat: ThreatModel, method: str) -> Certificate:
    mb = margin_bounds(fn, x, y, threat, method=method)
    is_y = jax.nn.one_hot(y, mb.lower.shape[-1], dtype=bool)
    certified = jnp.all(is_y | (mb.lower > 0), axis=-1)
    eps = threat.eps_for(x)
    if method == "ibp":  # U = 0: the envelope has no geometry, only the budget itself
        radius = jnp.where(certified, eps, 0.0)
    else:
        radius = jnp.where(certified, eps, pec_radius(mb, x, y, threat))
    return Certificate(certified, radius, mb.lower)


def _certify_chunked(fn, x, y, threat, method, chunk):
    eps, pf, rebuild = _per_example(threat, x)
    return _map_chunks(lambda xb, yb, eb, pb: _certify_batch(fn, xb, yb, rebuild(eb, pb), method),
                       chunk, x, y, eps, pf)


@functools.lru_cache(maxsize=8)
def _compiled_certify(fn, method, chunk):
    """One jitted program per (fn, method, chunk) for eager callers (kept for the 8 latest)."""
    return jax.jit(lambda x, y, threat: _certify_chunked(fn, x, y, threat, method, chunk))


def _tracing(*arrays):
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(arrays))


def certify(fn: Callable, x, y, threat: ThreatModel, *, method: str = "crown",
            memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> Certificate:
    """One-shot certification at the threat's ε: bounds (method) + PEC radius (ACB in Table 3.6).

    The examples run in chunks sized from ``memory_budget_bytes`` (see :func:`chunk_size`); results do
    not depend on the chunking. Called eagerly it compiles once per (fn, method, chunk size)."""
    check_entry_point("certify", fn, x, y, threat)
    x, y = jnp.asarray(x), jnp.asarray(y)
    chunk = chunk_size(fn, x, memory_budget_bytes, method=method)
    if _tracing(x, y, threat):
        return _certify_chunked(fn, x, y, threat, method, chunk)
    try:
        run = _compiled_certify(fn, method, chunk)
    except TypeError:  # an unhashable callable: compile for this call only
        run = jax.jit(lambda x, y, threat: _certify_chunked(fn, x, y, threat, method, chunk))
    return run(x, y, threat)


class EpsSearch(NamedTuple):
    radius: jax.Array  # (B,) certified radius (ε_low at the end: every value is sound)
    estimate: jax.Array  # (B,) Algorithm 3.5's output (ε_low + ε_up) / 2
    upper: jax.Array  # (B,) ε_up
    bound_computations: jax.Array  # (B,) number of bound computations (T_PEC or T_Lin of Table 3.9)


def _eps_search_batch(fn, x, y, threat, eps_high, eps_low, tol, method, use_pec, max_iterations):
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


def optimal_eps_search(fn: Callable, x, y, threat: ThreatModel, *, eps_high: float, eps_low: float = 0.0,
                       tol: float = 1e-3, method: str = "crown", use_pec: bool = True,
                       max_iterations: int = 64, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> EpsSearch:
    """Algorithm 3.5 (``use_pec=True``) or plain binary search (``use_pec=False``, Fast-Lin/CROWN).

    Each iteration bounds every still-searching example at ε_try = (ε_low + ε_up)/2 (one batched
    bound computation, compiled once); PEC raises ε_low to the certified radius even when ε_try is not
    fully certified, so the interval at least halves every step and Alg. 3.5 never needs more
    bound computations than binary search. ``threat.eps`` is ignored (the search sets it).
    Examples are searched in chunks sized from ``memory_budget_bytes`` (each chunk stops when its own
    examples are done; per-example results do not depend on the chunking).
    """
    check_entry_point("optimal_eps_search", fn, x, y, threat)
    if not (eps_high > eps_low >= 0 and tol > 0):
        raise ValueError(f"need eps_high > eps_low >= 0 and tol > 0, got {eps_high}, {eps_low}, {tol}")
    x, y = jnp.asarray(x), jnp.asarray(y)
    chunk = chunk_size(fn, x, memory_budget_bytes, method=method)
    _, pf, rebuild = _per_example(threat, x)
    return _map_chunks(lambda xb, yb, pb: _eps_search_batch(fn, xb, yb, rebuild(threat.eps, pb), eps_high,
                                                            eps_low, tol, method, use_pec, max_iterations),
                       chunk, x, y, pf)


def certified_radius_curve(fn: Callable, x, y, threat: ThreatModel, eps_values, *, method: str = "crown",
                           memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET):
    """Certified radius of PEC and of the plain certifier as a function of the budget ε (Fig. 3.6).
    Returns (pec (E, B), plain (E, B)). One compiled program serves every ε (chunked like
    :func:`certify`)."""
    check_entry_point("certified_radius_curve", fn, x, y, threat)
    x, y = jnp.asarray(x), jnp.asarray(y)
    chunk = chunk_size(fn, x, memory_budget_bytes, method=method)
    eps_values = np.asarray(eps_values, dtype=np.dtype(x.dtype)).reshape(-1)
    if eps_values.size == 0 or not np.all(np.isfinite(eps_values)) or np.any(eps_values < 0):
        raise ValueError(f"eps_values must be a non-empty list of finite budgets >= 0, got {eps_values}.")
    run = jax.jit(lambda e: _certify_chunked(fn, x, y, threat.replace(eps=e), method, chunk))
    pecs, plains = [], []
    for e in eps_values:
        c = run(jnp.asarray(e, x.dtype))
        pecs.append(c.radius)
        plains.append(jnp.where(c.certified, e, 0.0))
    return jnp.stack(pecs), jnp.stack(plains)
