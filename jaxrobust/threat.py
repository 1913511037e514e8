"""Threat models: the one notion of an adversarial budget shared by attacks, bounds,
certification and training objectives.

A threat model around a clean point ``x0`` is the set (thesis §2.1 eq. 2.1, §3.2.1)

    S(x0) = { x0 + δ :  ||δ ⊘ ε⃗||_p <= ε ,  box_lo <= x0 + δ <= box_hi }

where ``ε`` is a scalar or one value per example, and ``ε⃗`` an optional per-feature
scale (the non-uniform budgets of §3.2.1: S = {ε⃗ ⊙ v : ||v||_p <= 1}); with no
``per_feature_eps`` the set is the usual l_p ball. The box (default [0, 1]) may be None.

Every function here is pure, jit/vmap-able and works on batches of shape ``(B, *feature)``.
Projection onto ball ∩ box is *exact* for all three norms (not "project then clip"):
for l_2 and l_1 the KKT conditions give a separable solution parameterised by one
multiplier λ >= 0 per example, found by bisection (see :func:`project`).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array
NORMS = ("linf", "l2", "l1")
_NORM_ALIASES = {"linf": "linf", "inf": "linf", "l_inf": "linf", "Linf": "linf",
                 "l2": "l2", "L2": "l2", "l_2": "l2", "2": "l2",
                 "l1": "l1", "L1": "l1", "l_1": "l1", "1": "l1"}


def canonical_norm(norm) -> str:
    """Maps 'inf'/'Linf'/np.inf/2/1/... to one of 'linf', 'l2', 'l1'."""
    if isinstance(norm, (int, float)) and not isinstance(norm, bool):
        if norm == np.inf:
            return "linf"
        norm = str(int(norm))
    name = _NORM_ALIASES.get(str(norm))
    if name is None:
        raise ValueError(f"Unknown norm {norm!r}: expected one of {NORMS} (or inf, 2, 1).")
    return name


def dual_norm_name(norm: str) -> str:
    """l_inf <-> l_1, l_2 <-> l_2 (1/p + 1/q = 1)."""
    return {"linf": "l1", "l2": "l2", "l1": "linf"}[canonical_norm(norm)]


def _flat(x: Array) -> Array:
    return x.reshape(x.shape[0], -1)


def lp_norm(x: Array, norm: str) -> Array:
    """Per-example l_p norm of a batch ``(B, ...)`` -> ``(B,)``."""
    norm = canonical_norm(norm)
    f = _flat(x)
    if norm == "linf":
        return jnp.max(jnp.abs(f), axis=1)
    if norm == "l2":
        return jnp.sqrt(jnp.sum(f * f, axis=1))
    return jnp.sum(jnp.abs(f), axis=1)


def _check_finite_nonneg(name, value):
    """Eager validation (skipped under tracing, where values are unknown)."""
    if value is None or isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be >= 0 (a budget), got min {arr.min()}.")


@struct.dataclass
class ThreatModel:
    """An l_p budget, possibly per-example and per-feature, intersected with a box.

    Attributes:
      norm: 'linf', 'l2' or 'l1' (static).
      eps: scalar, or shape ``(B,)`` for one budget per example.
      per_feature_eps: optional positive array of one input's shape ``(*feature)`` (or
        ``(B, *feature)``): the non-uniform scale ε⃗ of §3.2.1 (Alg. 3.3).
      box: ``(lo, hi)`` valid input range, or None for unbounded inputs (static).
    """
    norm: str = struct.field(pytree_node=False, default="linf")
    eps: Union[float, Array] = 0.0
    per_feature_eps: Optional[Array] = None
    box: Optional[Tuple[float, float]] = struct.field(pytree_node=False, default=(0.0, 1.0))

    def __post_init__(self):
        object.__setattr__(self, "norm", canonical_norm(self.norm))
        _check_finite_nonneg("eps", self.eps)
        _check_finite_nonneg("per_feature_eps", self.per_feature_eps)
        if self.box is not None:
            lo, hi = self.box
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"box must be (lo, hi) with finite lo < hi, got {self.box}.")
            object.__setattr__(self, "box", (float(lo), float(hi)))

    # ----------------------------------------------------------------- shapes
    @property
    def p(self) -> float:
        return {"linf": np.inf, "l2": 2.0, "l1": 1.0}[self.norm]

    @property
    def dual(self) -> str:
        return dual_norm_name(self.norm)

    def eps_for(self, x: Array) -> Array:
        """The scalar budget of each example, shape ``(B,)``."""
        eps = jnp.asarray(self.eps, dtype=x.dtype)
        return jnp.broadcast_to(eps, (x.shape[0],)) if eps.ndim == 0 else eps

    def scale_for(self, x: Array) -> Array:
        """Per-feature radius ``ε_b · ε⃗`` broadcast to ``x``'s shape."""
        eps = self.eps_for(x).reshape((-1,) + (1,) * (x.ndim - 1))
        if self.per_feature_eps is None:
            return jnp.broadcast_to(eps, x.shape)
        return eps * jnp.broadcast_to(jnp.asarray(self.per_feature_eps, x.dtype), x.shape)

    def box_arrays(self, x: Array) -> Tuple[Array, Array]:
        if self.box is None:
            return jnp.full_like(x, -jnp.inf), jnp.full_like(x, jnp.inf)
        return jnp.full_like(x, self.box[0]), jnp.full_like(x, self.box[1])

    def validate_inputs(self, x, y=None, num_classes: Optional[int] = None) -> None:
        """Raises a clear error on NaN/inf inputs, points outside the box, bad shapes or
        out-of-range labels.

        Args:
          x: a batch ``(B, *features)`` of floating-point inputs inside the box.
          y: optional integer labels of shape ``(B,)``.
          num_classes: if given, labels must lie in ``[0, num_classes)``; negative labels
            are rejected even without it.

        A no-op under jit tracing (values unknown); call it at API boundaries. Under jit,
        use the checkify-based variants of :mod:`jaxrobust.checks` instead.
        """
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                    or num_classes < 1:
                raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
        if isinstance(x, jax.core.Tracer):
            return
        x = np.asarray(x)
        y_arr = None
        if y is not None and not isinstance(y, jax.core.Tracer):
            y_arr = np.asarray(y)
            if y_arr.ndim == 0:
                raise ValueError(f"Got a single label y={y_arr.item()!r} for x of shape {x.shape}: "
                                 f"a batch axis is expected: pass x[None] / shape (B, ...) "
                                 f"and y of shape (B,).")
        if x.ndim < 2:
            raise ValueError(f"x must be a batch of shape (B, *features), got shape {x.shape}: "
                             "a batch axis is expected: pass x[None] / shape (B, ...).")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"x must be floating point, got dtype {x.dtype}.")
        if not np.all(np.isfinite(x)):
            raise ValueError("x contains NaN or inf.")
        if self.box is not None and (x.min() < self.box[0] - 1e-6 or x.max() > self.box[1] + 1e-6):
            raise ValueError(f"x lies outside the input box {self.box}: range [{x.min()}, {x.max()}]. "
                             "Pixels are expected in the box; normalisation belongs inside the model.")
        eps = np.asarray(self.eps) if not isinstance(self.eps, jax.core.Tracer) else None
        if eps is not None and eps.ndim not in (0, 1):
            raise ValueError(f"eps must be a scalar or one value per example, got shape {eps.shape}.")
        if eps is not None and eps.ndim == 1 and eps.shape[0] != x.shape[0]:
            raise ValueError(f"eps has {eps.shape[0]} values for a batch of {x.shape[0]}.")
        pf = self.per_feature_eps
        if pf is not None and not isinstance(pf, jax.core.Tracer):
            pf = np.asarray(pf)
            if pf.shape != x.shape[1:] and pf.shape != x.shape:
                raise ValueError(f"per_feature_eps has shape {pf.shape}; expected {x.shape[1:]} "
                                 f"(one input) or {x.shape} (per example).")
        if y_arr is not None:
            if not np.issubdtype(y_arr.dtype, np.integer):
                raise TypeError(f"y must be integer labels of shape ({x.shape[0]},), "
                                f"got dtype {y_arr.dtype}.")
            if y_arr.shape != (x.shape[0],):
                raise ValueError(f"y must be integer labels of shape ({x.shape[0]},) (one per example "
                                 f"of x {x.shape}), got shape {y_arr.shape}.")
            if y_arr.size and y_arr.min() < 0:
                raise ValueError(f"y contains negative labels (min {y_arr.min()}); labels must be "
                                 f"class indices in [0, num_classes).")
            if num_classes is not None and y_arr.size and y_arr.max() >= num_classes:
                raise ValueError(f"y contains label {y_arr.max()} out of range for {num_classes} "
                                 f"classes: labels must lie in [0, {num_classes}).")

    # ------------------------------------------------------------ geometry
    def perturbation_norm(self, delta: Array) -> Array:
        """``||δ ⊘ ε⃗||_p`` per example (``||δ||_p`` without per-feature scale)."""
        if self.per_feature_eps is not None:
            pf = jnp.broadcast_to(jnp.asarray(self.per_feature_eps, delta.dtype), delta.shape)
            delta = jnp.where(pf > 0, delta / jnp.where(pf > 0, pf, 1.0), jnp.where(delta == 0, 0.0, jnp.inf))
        return lp_norm(delta, self.norm)

    def contains(self, x0: Array, x: Array, atol: float = 1e-5) -> Array:
        """Membership test, ``(B,)`` bools: within budget (relative tol) and box (abs tol)."""
        eps = self.eps_for(x0)
        ok = self.perturbation_norm(x - x0) <= eps * (1 + atol) + atol
        if self.box is not None:
            inside = (x >= self.box[0] - atol) & (x <= self.box[1] + atol)
            ok &= jnp.all(_flat(inside), axis=1)
        return ok

    def project(self, x0: Array, x: Array, iters: int = 60) -> Array:
        """Exact Euclidean projection of ``x`` onto ``S(x0)`` (x0 must lie in the box).

        l_inf: separable clip. l_2 / l_1 (with box and per-feature scale r = ε⃗):
        minimise ||δ - v||² s.t. ||δ ⊘ r||_p <= ε, lo <= δ <= hi. The KKT conditions give
          l_2: δ_i(λ) = clip(v_i / (1 + λ / r_i²), lo_i, hi_i)
          l_1: δ_i(λ) = clip(sign(v_i) · max(|v_i| - λ / r_i, 0), lo_i, hi_i)
        with ||δ(λ) ⊘ r||_p non-increasing in λ; we bisect on λ and return the feasible end,
        so the result is always inside S (idempotent up to float rounding).
        """
        v = x - x0
        lo, hi = self.box_arrays(x0)
        lo, hi = lo - x0, hi - x0
        scale = self.scale_for(x0)  # ε_b · ε⃗, broadcast
        if self.norm == "linf":
            return x0 + jnp.clip(jnp.clip(v, -scale, scale), lo, hi)

        # Work with unit budget: r = ε_b·ε⃗ so the constraint is ||δ ⊘ r||_p <= 1.
        r = jnp.maximum(scale, 0.0)
        zero = r <= 0
        r_safe = jnp.where(zero, 1.0, r)
        bshape = (-1,) + (1,) * (x.ndim - 1)

        if self.norm == "l2":
            def delta_of(lam):
                d = v / (1.0 + lam.reshape(bshape) / r_safe ** 2)
                return jnp.where(zero, 0.0, jnp.clip(d, lo, hi))

            def cons(d):
                return jnp.sum(_flat((d / r_safe) ** 2), axis=1)  # squared norm vs 1
        else:
            def delta_of(lam):
                d = jnp.sign(v) * jnp.maximum(jnp.abs(v) - lam.reshape(bshape) / r_safe, 0.0)
                return jnp.where(zero, 0.0, jnp.clip(d, lo, hi))

            def cons(d):
                return jnp.sum(_flat(jnp.abs(d) / r_safe), axis=1)

        d0 = delta_of(jnp.zeros(x.shape[0], x.dtype))
        feasible0 = cons(d0) <= 1.0
        # Upper bracket: a λ large enough that δ(λ) is feasible.
        if self.norm == "l2":
            lam_hi = jnp.max(_flat(jnp.abs(v) * r_safe), axis=1) * jnp.sqrt(
                jnp.asarray(_flat(v).shape[1], x.dtype)) + 1.0
        else:
            lam_hi = jnp.max(_flat(jnp.abs(v) * r_safe), axis=1) + 1.0
        lam_lo = jnp.zeros_like(lam_hi)

        def body(_, carry):
            a, b = carry
            m = 0.5 * (a + b)
            feas = cons(delta_of(m)) <= 1.0
            return jnp.where(feas, a, m), jnp.where(feas, m, b)

        lam_lo, lam_hi = jax.lax.fori_loop(0, iters, body, (lam_lo, lam_hi))
        d = delta_of(lam_hi)
        # Guard against float rounding: rescale (inside the box since 0 is) if marginally out.
        if self.norm == "l2":
            n = jnp.sqrt(cons(d))
        else:
            n = cons(d)
        d = d / jnp.maximum(n, 1.0).reshape(bshape)
        return x0 + jnp.where(feasible0.reshape(bshape), d0, d)

    def clip_to_box(self, x: Array) -> Array:
        if self.box is None:
            return x
        return jnp.clip(x, self.box[0], self.box[1])

    def random_init(self, key: Array, x0: Array) -> Array:
        """A random point of S(x0): uniform in the l_inf box; for l_2/l_1 uniform in the
        ball (direction · radius U^(1/d) for l_2; exponential-spacing construction for
        l_1), scaled by ε⃗, then projected onto the box."""
        shape = x0.shape
        scale = self.scale_for(x0)
        d = int(np.prod(shape[1:]))
        if self.norm == "linf":
            u = jax.random.uniform(key, shape, x0.dtype, -1.0, 1.0)
        elif self.norm == "l2":
            k1, k2 = jax.random.split(key)
            g = jax.random.normal(k1, shape, x0.dtype)
            g = g / jnp.maximum(lp_norm(g, "l2"), 1e-12).reshape((-1,) + (1,) * (x0.ndim - 1))
            rad = jax.random.uniform(k2, (shape[0],), x0.dtype) ** (1.0 / d)
            u = g * rad.reshape((-1,) + (1,) * (x0.ndim - 1))
        else:
            # Uniform in the l_1 ball: Laplace directions normalised, radius U^(1/d).
            k1, k2 = jax.random.split(key)
            g = jax.random.laplace(k1, shape, x0.dtype)
            g = g / jnp.maximum(lp_norm(g, "l1"), 1e-12).reshape((-1,) + (1,) * (x0.ndim - 1))
            rad = jax.random.uniform(k2, (shape[0],), x0.dtype) ** (1.0 / d)
            u = g * rad.reshape((-1,) + (1,) * (x0.ndim - 1))
        return self.project(x0, x0 + u * scale)
