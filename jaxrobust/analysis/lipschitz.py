"""Upper bounds of a network's l2 Lipschitz constant (thesis §4.3.3, Table 4.5, Fig. 4.22): AutoLip
and SeqLip of Scaman & Virmaux (2018), and the gradient-norm lower estimate they are checked against.

A network ``f = M_K ∘ a ∘ M_{K−1} ∘ ... ∘ a ∘ M_1`` is split into *affine segments* M_k (consecutive
Dense / Conv / BatchNorm (eval mode) / input-normalisation layers with nothing in between) separated by
an element-wise activation a (ReLU, tanh: derivative in [0, 1]; sigmoid: [0, 1/4]). The split is found
by running the model once with a flax method interceptor and *checked* on random inputs (the input of
every layer must be its predecessor's output, or the activation of it); anything else (residual
additions, pooling) is refused with a ValueError naming the layers. Each segment's linear part is
``jax.linearize`` of the segment around 0, its adjoint ``jax.linear_transpose`` of that (convolutions
included: nothing is materialised for AutoLip).

- AutoLip: ``L ≤ Π_k ‖M_k‖₂ · Π a'_max``, each spectral norm by power iteration on ``M_kᵀ M_k``.
- SeqLip: with ``M_k = U_k Σ_k V_kᵀ`` (dense SVD of each segment),
  ``L ≤ Π_{k=1}^{K−1} max_{σ ∈ [0,1]^{n_k}} ‖Σ̃_{k+1} V_{k+1}ᵀ diag(σ) U_k Σ̃_k‖₂`` with Σ̃ = Σ^{1/2}
  except Σ̃_1 = Σ_1 and Σ̃_K = Σ_K (for K = 2 it is exactly max_σ ‖M_2 diag(σ) M_1‖). The maximum over
  activation patterns (a convex function of σ, maximal at a vertex) is found by alternating
  maximisation: (u, v) = top singular pair of ``A diag(σ) B``, then ``σ_j = 1[(Aᵀu)_j (Bv)_j > 0]``,
  which never decreases the norm, from ``restarts`` starts (all ones and random patterns): a local
  maximum, as the greedy search of the paper (exact enumeration of the 2^n patterns when n <= 12,
  so SeqLip is then a guaranteed upper bound). Segments wider than ``max_dense`` fall back to their
  AutoLip factor (still an upper bound; counted in the result).
- ``gradient_norm_estimate``: ``max_x ‖∂f/∂x‖₂`` over given points, a lower bound of L.

The random starts make the results stochastic; the thesis averages 20 runs (:func:`lipschitz_bounds`).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.models.zoo import Normalize

LINEAR_MODULES = (nn.Dense, nn.Conv, nn.BatchNorm, Normalize)
ACTIVATION_SLOPES = {"relu": 1.0, "tanh": 1.0, "sigmoid": 0.25}
_ACTS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}


@dataclasses.dataclass(frozen=True)
class Segment:
    """Module calls ``start..end`` (inclusive, in call order) forming one affine map from
    ``in_shape`` to ``out_shape`` (per example); ``activation`` follows it ('' for the last)."""
    start: int
    end: int
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    names: Tuple[str, ...]
    activation: str = ""

    @property
    def in_dim(self) -> int:
        return int(np.prod(self.in_shape))

    @property
    def out_dim(self) -> int:
        return int(np.prod(self.out_shape))


def _first_arg(args, kwargs):
    if args:
        return args[0]
    for k in ("inputs", "x"):
        if k in kwargs:
            return kwargs[k]
    raise ValueError("a linear layer was called without a positional input.")


def _record_calls(model, variables, x):
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, LINEAR_MODULES):
            return next_fun(*args, **kwargs)
        inp = _first_arg(args, kwargs)
        out = next_fun(*args, **kwargs)
        calls.append((type(context.module).__name__ + ":" + str(context.module.name), inp, out))
        return out

    with nn.intercept_methods(interceptor):
        logits = model.apply(variables, x, train=False)
    return calls, logits


def _close(a, b) -> bool:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-5 * (1 + np.abs(b).max()))


def extract_segments(model, variables, input_shape, key=None, num_points: int = 4) -> List[Segment]:
    """The affine segments of ``model`` (see the module docstring), checked on ``num_points`` random
    inputs in [0, 1]. Raises a ValueError for a network that is not such a chain."""
    key = jax.random.PRNGKey(0) if key is None else key
    x = jax.random.uniform(key, (num_points,) + tuple(input_shape))
    calls, logits = _record_calls(model, variables, x)
    if not calls:
        raise ValueError("the model has no Dense/Conv layer: nothing to bound.")
    names = [c[0] for c in calls]
    if not _close(calls[0][1], x):
        raise ValueError(f"the model transforms its input before its first linear layer {names[0]}: "
                         "only chains of linear layers and element-wise activations are supported.")
    if not _close(calls[-1][2], logits):
        raise ValueError(f"the model's output is not the output of its last linear layer {names[-1]}.")
    segs: List[Segment] = []
    start = 0
    for i in range(len(calls) - 1):
        out, nxt = calls[i][2], calls[i + 1][1]
        if _close(nxt, out):
            continue  # the same affine segment goes on (e.g. conv then batch norm)
        act = next((a for a, f in _ACTS.items() if _close(nxt, f(out))), None)
        if act is None:
            raise ValueError(f"between {names[i]} and {names[i + 1]} the network does something other "
                             f"than an element-wise {sorted(_ACTS)} (a residual addition, pooling...): "
                             "AutoLip/SeqLip here support chains of affine layers and activations "
                             "(fc, cnn_small, cnn7-like nets).")
        segs.append(Segment(start, i, tuple(calls[start][1].shape[1:]), tuple(out.shape[1:]),
                            tuple(names[start:i + 1]), act))
        start = i + 1
    segs.append(Segment(start, len(calls) - 1, tuple(calls[start][1].shape[1:]),
                        tuple(calls[-1][2].shape[1:]), tuple(names[start:])))
    return segs


def segment_fn(model, variables, seg: Segment, input_shape) -> Callable:
    """``z (B, *seg.in_shape) -> (B, *seg.out_shape)``: the model's layers ``seg.start..seg.end``
    applied to z (the model runs with its layer ``start``'s input replaced by z; the layers after
    ``end`` are dead code under jit)."""
    def fn(z):
        count = [0]
        captured = []

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__" or not isinstance(context.module, LINEAR_MODULES):
                return next_fun(*args, **kwargs)
            i = count[0]
            count[0] += 1
            if i == seg.start:
                args = (z,) + tuple(args[1:]) if args else args
                if not args:
                    kwargs = {**kwargs, ("inputs" if "inputs" in kwargs else "x"): z}
            out = next_fun(*args, **kwargs)
            if i == seg.end:
                captured.append(out)
            return out

        x = jnp.zeros((z.shape[0],) + tuple(input_shape), z.dtype)
        with nn.intercept_methods(interceptor):
            model.apply(variables, x, train=False)
        return captured[0].reshape((z.shape[0],) + seg.out_shape)
    return fn


def linear_maps(model, variables, seg: Segment, input_shape):
    """(M, Mᵀ) of a segment on single examples ``(*in_shape) -> (*out_shape)`` and back: the
    linearisation of the affine segment (exact) and its transpose."""
    f = segment_fn(model, variables, seg, input_shape)
    z0 = jnp.zeros(seg.in_shape, jnp.float32)
    single = lambda z: f(z[None])[0]
    _, lin = jax.linearize(single, z0)
    lin_t = jax.linear_transpose(lin, z0)
    return jax.jit(lin), jax.jit(lambda y: lin_t(y)[0])


def spectral_norm(lin, lin_t, in_shape, key, iters: int = 200) -> float:
    """Largest singular value of the linear map ``lin`` by ``iters`` power iterations on ``linᵀ lin``
    from a random start (one jitted loop)."""
    return float(_power_loop(lin, lin_t, jax.random.normal(key, tuple(in_shape), jnp.float32),
                             int(iters)))


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _power_loop(lin, lin_t, v, iters):
    def body(_, v):
        v = v / jnp.maximum(jnp.linalg.norm(v), 1e-30)
        return lin_t(lin(v))
    v = jax.lax.fori_loop(0, iters, body, v)
    v = v / jnp.maximum(jnp.linalg.norm(v), 1e-30)
    return jnp.linalg.norm(lin(v))


def segment_norm_fn(model, seg: Segment, input_shape, iters: int = 200) -> Callable:
    """A jitted ``(variables, key) -> ‖M‖₂`` of a segment: the segment is linearised inside, so the
    weights are arguments (one compilation per segment, reused across runs and checkpoints)."""
    z0 = jnp.zeros(seg.in_shape, jnp.float32)

    @jax.jit
    def run(variables, key):
        f = segment_fn(model, variables, seg, input_shape)
        _, lin = jax.linearize(lambda z: f(z[None])[0], z0)
        lin_t = jax.linear_transpose(lin, z0)
        adj = lambda y: lin_t(y)[0]

        def body(_, v):
            v = v / jnp.maximum(jnp.linalg.norm(v), 1e-30)
            return adj(lin(v))
        v = jax.lax.fori_loop(0, int(iters), body, jax.random.normal(key, seg.in_shape, jnp.float32))
        v = v / jnp.maximum(jnp.linalg.norm(v), 1e-30)
        return jnp.linalg.norm(lin(v))

    return run


def autolip(model, variables, input_shape, key, *, iters: int = 200,
            segments: Optional[List[Segment]] = None) -> Dict[str, Any]:
    """AutoLip: ``Π_k ‖M_k‖₂ · Π slope(a)``. Returns ``{'bound', 'spectral_norms', 'segments'}``."""
    segs = segments or extract_segments(model, variables, input_shape)
    norms = [float(segment_norm_fn(model, seg, input_shape, iters)(variables, jax.random.fold_in(key, i)))
             for i, seg in enumerate(segs)]
    slopes = [ACTIVATION_SLOPES[s.activation] for s in segs[:-1]]
    return {"bound": float(np.prod(norms) * np.prod(slopes)), "spectral_norms": norms,
            "segments": [" ".join(s.names) for s in segs]}


def dense_matrix(model, variables, seg: Segment, input_shape, chunk: int = 1024) -> np.ndarray:
    """The segment's linear part as a dense (out_dim, in_dim) float64 matrix (columns M e_j)."""
    f = segment_fn(model, variables, seg, input_shape)
    z0 = jnp.zeros((1,) + seg.in_shape, jnp.float32)
    bias = f(z0).reshape(-1)
    apply = jax.jit(lambda z: f(z).reshape(z.shape[0], -1) - bias)
    cols = []
    eye = np.eye(seg.in_dim, dtype=np.float32)
    for s in range(0, seg.in_dim, chunk):
        e = eye[s:s + chunk].reshape((-1,) + seg.in_shape)
        cols.append(np.asarray(apply(jnp.asarray(e)), np.float64))
    return np.concatenate(cols, 0).T


@functools.partial(jax.jit, static_argnames="power_iters")
def _top_pair(A, B, sigma, v, power_iters: int = 20):
    """Top singular pair of ``A diag(σ) B`` by power iteration from ``v`` with matrix-vector products
    (M v = A (σ ⊙ (B v)), Mᵀ u = Bᵀ (σ ⊙ (Aᵀ u))): ``(u, v, ‖M v‖)``."""
    mv = lambda v: A @ (sigma * (B @ v))
    mtv = lambda u: B.T @ (sigma * (A.T @ u))

    def body(_, v):
        w = mtv(mv(v))
        return w / jnp.maximum(jnp.linalg.norm(w), 1e-30)

    v = jax.lax.fori_loop(0, power_iters, body, v / jnp.maximum(jnp.linalg.norm(v), 1e-30))
    u = mv(v)
    s = jnp.linalg.norm(u)
    return u / jnp.maximum(s, 1e-30), v, s


@jax.jit
def _best_pattern(A, B, u, v):
    """The σ ∈ {0,1}^n maximising ``uᵀ A diag(σ) B v``: ``σ_j = 1[(Aᵀu)_j (Bv)_j > 0]``."""
    return ((A.T @ u) * (B @ v) > 0).astype(A.dtype)


EXACT_PATTERN_LIMIT = 12  # n <= this: every one of the 2^n activation patterns is tried


def exact_pattern_norm(A: np.ndarray, B: np.ndarray) -> float:
    """``max_{σ ∈ {0,1}^n} ‖A diag(σ) B‖₂`` by enumeration (n <= ``EXACT_PATTERN_LIMIT``): the exact
    SeqLip pair factor (the maximum over [0, 1]^n is at a vertex: the norm is convex in σ)."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    n = A.shape[1]
    if n > EXACT_PATTERN_LIMIT:
        raise ValueError(f"exact enumeration of 2^{n} activation patterns refused (n > "
                         f"{EXACT_PATTERN_LIMIT}); use max_pattern_norm.")
    patterns = ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1).astype(np.float64)
    mats = np.einsum("rn,pn,nm->prm", A, patterns, B)
    return float(np.linalg.norm(mats, ord=2, axis=(1, 2)).max())


def max_pattern_norm(A: np.ndarray, B: np.ndarray, key, *, restarts: int = 4,
                     iters: int = 50, exact_limit: int = EXACT_PATTERN_LIMIT) -> float:
    """``max_{σ ∈ {0,1}^n} ‖A diag(σ) B‖₂`` (A (r, n), B (n, m)): exact by enumeration when
    n <= ``exact_limit`` (at most ``EXACT_PATTERN_LIMIT``); otherwise by alternating maximisation from the all-ones pattern and
    ``restarts − 1`` random ones, a lower estimate of the maximum that is exact at a local maximum (see
    the module docstring)."""
    if np.shape(A)[1] <= min(exact_limit, EXACT_PATTERN_LIMIT):
        return exact_pattern_norm(A, B)
    A = jnp.asarray(A, jnp.float32)
    B = jnp.asarray(B, jnp.float32)
    n = A.shape[1]
    best = 0.0
    for r in range(max(int(restarts), 1)):
        ks, kv = jax.random.split(jax.random.fold_in(key, r))
        sigma = jnp.ones((n,), jnp.float32) if r == 0 else \
            jax.random.bernoulli(ks, 0.5, (n,)).astype(jnp.float32)
        v = jax.random.normal(kv, (B.shape[1],), jnp.float32)
        val = 0.0
        for _ in range(int(iters)):
            u, v, s = _top_pair(A, B, sigma, v)
            val = max(val, float(s))
            new = _best_pattern(A, B, u, v)
            if bool(jnp.all(new == sigma)):
                break
            sigma = new
        u, v, s = _top_pair(A, B, sigma, v, 100)  # converge the final pattern's norm
        best = max(best, val, float(s))
    return best


def seqlip(model, variables, input_shape, key, *, restarts: int = 4, max_dense: int = 8192,
           segments: Optional[List[Segment]] = None) -> Dict[str, Any]:
    """SeqLip upper bound (see the module docstring): ``{'bound', 'factors', 'fallback_pairs'}``.
    Segments with more than ``max_dense`` inputs or outputs use their AutoLip factor in the pairs they
    belong to."""
    segs = segments or extract_segments(model, variables, input_shape)
    return _SVDCache(model, variables, input_shape, segs, max_dense).seqlip(key, restarts)


def gradient_norm_estimate(logits_fn: Callable, x) -> Dict[str, float]:
    """``max_i ‖J(x_i)‖₂`` (spectral norm of the input Jacobian of the logits, per point, by SVD of the
    (K, d) Jacobian) over the points x (N, *features): a lower bound of the l2 Lipschitz constant."""
    def one(xi):
        J = jax.jacrev(lambda z: logits_fn(z[None])[0])(xi)
        J = J.reshape(J.shape[0], -1)
        return jnp.linalg.norm(J, ord=2)

    norms = np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(x)))
    return {"max": float(norms.max()), "mean": float(norms.mean())}


def lipschitz_bounds(model, variables, input_shape, key, *, runs: int = 20, iters: int = 200,
                     restarts: int = 4, methods: Sequence[str] = ("autolip", "seqlip"),
                     max_dense: int = 8192, progress: Optional[Callable[[str], None]] = None,
                     seqlip_runs: Optional[int] = None) -> Dict[str, Any]:
    """AutoLip ``runs`` times and SeqLip ``seqlip_runs`` (None: ``runs``) times with different random
    starts (the thesis: 20): mean, std, min, max of each, plus the segment structure. Dense SVDs are
    computed once and reused."""
    unknown = [m for m in methods if m not in ("autolip", "seqlip")]
    if unknown:
        raise ValueError(f"unknown Lipschitz methods {unknown}; expected 'autolip' and/or 'seqlip'.")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}.")
    segs = extract_segments(model, variables, input_shape)
    out: Dict[str, Any] = {"segments": [" ".join(s.names) for s in segs],
                           "activations": [s.activation for s in segs[:-1]], "runs": int(runs)}
    t0 = time.time()
    if "autolip" in methods:
        vals, norms = [], None
        fns = [segment_norm_fn(model, s, input_shape, iters) for s in segs]
        slopes = float(np.prod([ACTIVATION_SLOPES[s.activation] for s in segs[:-1]]))
        for r in range(runs):
            k = jax.random.fold_in(key, r)
            ns = [float(f(variables, jax.random.fold_in(k, i))) for i, f in enumerate(fns)]
            vals.append(float(np.prod(ns)) * slopes)
            norms = ns if norms is None else [max(a, b) for a, b in zip(norms, ns)]
            if progress:
                progress(f"autolip run {r + 1}/{runs}: {vals[-1]:.6g}")
        out["autolip"] = _stats(vals)
        out["spectral_norms"] = norms
    if "seqlip" in methods:
        svd_cache = _SVDCache(model, variables, input_shape, segs, max_dense)
        vals, fb = [], 0
        n_seq = int(runs if seqlip_runs is None or seqlip_runs < 1 else seqlip_runs)
        for r in range(n_seq):
            res = svd_cache.seqlip(jax.random.fold_in(key, 10_000 + r), restarts)
            vals.append(res["bound"])
            fb = res["fallback_pairs"]
            if progress:
                progress(f"seqlip run {r + 1}/{n_seq}: {vals[-1]:.6g}")
        out["seqlip"] = _stats(vals)
        out["seqlip_fallback_pairs"] = fb
    out["seconds"] = time.time() - t0
    return out


class _SVDCache:
    """Dense SVDs of the segments (computed once for repeated SeqLip runs) and the SeqLip product."""

    def __init__(self, model, variables, input_shape, segs, max_dense):
        self.segs = segs
        self.svd = []
        self.norms = []
        for i, s in enumerate(segs):
            if max(s.in_dim, s.out_dim) <= max_dense:
                U, S, Vt = np.linalg.svd(dense_matrix(model, variables, s, input_shape),
                                         full_matrices=False)
                self.svd.append((U, S, Vt))
                self.norms.append(float(S[0]))
            else:
                self.svd.append(None)
                self.norms.append(float(segment_norm_fn(model, s, input_shape, 500)(
                    variables, jax.random.PRNGKey(i))))

    def seqlip(self, key, restarts):
        segs, K = self.segs, len(self.segs)
        if K == 1:
            return {"bound": self.norms[0], "fallback_pairs": 0, "factors": [self.norms[0]]}
        factors, fb = [], 0
        for k in range(K - 1):
            slope = ACTIVATION_SLOPES[segs[k].activation]
            a_pow = 1.0 if k + 1 == K - 1 else 0.5
            b_pow = 1.0 if k == 0 else 0.5
            if self.svd[k] is None or self.svd[k + 1] is None:
                fb += 1
                factors.append(slope * self.norms[k + 1] ** a_pow * self.norms[k] ** b_pow)
                continue
            U1, S1, _ = self.svd[k]
            _, S2, Vt2 = self.svd[k + 1]
            A = (S2 ** a_pow)[:, None] * Vt2
            B = U1 * (S1 ** b_pow)[None, :]
            factors.append(slope * max_pattern_norm(A, B, jax.random.fold_in(key, k),
                                                    restarts=restarts))
        return {"bound": float(np.prod(factors)), "fallback_pairs": fb, "factors": factors}


def _stats(vals):
    v = np.asarray(vals, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "values": [float(a) for a in v]}


__all__ = ["Segment", "extract_segments", "segment_fn", "linear_maps", "spectral_norm",
           "segment_norm_fn", "autolip",
           "dense_matrix", "max_pattern_norm", "exact_pattern_norm", "seqlip", "gradient_norm_estimate",
           "lipschitz_bounds", "ACTIVATION_SLOPES"]
