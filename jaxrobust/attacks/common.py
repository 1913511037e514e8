"""Shared attack pieces: steepest-ascent steps per norm, keep-best bookkeeping and the
backend-dependent unrolling rule of short attack loops."""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.threat import ThreatModel, lp_norm

# Unroll attack loops of at most this many steps, per backend (absent: never unroll).
# CPU: XLA:CPU runs convolutions inside a while loop far slower than the same convolutions
# unrolled: PGD-10 on ResNet18 (w=4, CIFAR shape, batch 32, 2 cores) 4.66 s unrolled vs 36.6 s as a
# loop (7.9x; 3.7x measured earlier on w=8), for 7.1 vs 6.0 CPU-s of compilation: unrolled wins.
# GPU/TPU: a loop iteration costs one predicate check (microseconds) against milliseconds of
# forward/backward, while an unrolled PGD-k program is k times larger to optimise and hold: the
# rolled loop. Not yet measured on a GPU here (no device lent): bench/device_suite.py times both
# ('pgd10_unroll' rows) so this table can be set from data.
UNROLL_MAX_STEPS = {"cpu": 20}


def default_unroll(steps: int, backend: Optional[str] = None) -> bool:
    """Whether an attack loop of ``steps`` iterations is unrolled on ``backend`` (default: JAX's
    default backend at trace time), by :data:`UNROLL_MAX_STEPS`."""
    b = jax.default_backend() if backend is None else backend
    return 0 < int(steps) <= UNROLL_MAX_STEPS.get(b, 0)


def _bcast(v, x):
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def steepest_ascent_step(grad, x, x0, threat: ThreatModel, step_size, l1_sparsity: float = 0.95):
    """Normalised steepest-ascent direction for the threat's norm, scaled by ``step_size`` (B,)
    (in units of the budget's norm, scaled by ε⃗ when per-feature budgets are set).

    l_inf: sign(g). l_2: g / ||g||_2. l_1: the sparse step of APGD-L1/SLIDE: only the top
    (1 - l1_sparsity) fraction of coordinates by |g| that can still move inside the box, sign(g) on
    them, normalised to unit l_1 norm (a dense sign step would waste the l_1 budget).
    """
    pf = threat.per_feature_eps
    g = grad if pf is None else grad * jnp.asarray(pf, grad.dtype)  # steepest ascent in scaled space
    if threat.norm == "linf":
        d = jnp.sign(g)
    elif threat.norm == "l2":
        d = g / jnp.maximum(_bcast(lp_norm(g, "l2"), g), 1e-12)
    else:
        flat = g.reshape(g.shape[0], -1)
        if threat.box is not None:
            xf = x.reshape(x.shape[0], -1)
            movable = ~(((xf <= threat.box[0]) & (flat < 0)) | ((xf >= threat.box[1]) & (flat > 0)))
            flat = jnp.where(movable, flat, 0.0)
        n = flat.shape[1]
        k = max(1, int(round((1.0 - l1_sparsity) * n)))
        thresh = jax.lax.top_k(jnp.abs(flat), k)[0][:, -1:]
        sel = (jnp.abs(flat) >= thresh) & (flat != 0)
        d = jnp.where(sel, jnp.sign(flat), 0.0)
        d = d / jnp.maximum(jnp.sum(jnp.abs(d), axis=1, keepdims=True), 1.0)
        d = d.reshape(g.shape)
    if pf is not None:
        d = d * jnp.asarray(pf, d.dtype)
    return x + _bcast(step_size, x) * d


def update_best(best_x, best_val, x, val):
    """Keeps, per example, the point with the larger objective value."""
    better = val > best_val
    return jnp.where(_bcast(better, x), x, best_x), jnp.where(better, val, best_val)


def check_attack_inputs(logits_fn, x, y, threat: ThreatModel, *, y_target=None,
                        name: str = "attack") -> int:
    """Validates the arguments of a public attack entry point and returns the number of classes.

    Shape checks (chex, static: they also run while tracing under jit, at no runtime cost):
    ``x`` is a batch ``(B, *features)``, ``y`` (and ``y_target``) integer labels ``(B,)``, and
    ``logits_fn(x)`` has shape ``(B, K)`` (found with ``jax.eval_shape``: abstract, nothing is
    compiled or run). Value checks (eager only, skipped for traced arrays): finite inputs inside
    the box and labels in ``[0, K)`` via :meth:`ThreatModel.validate_inputs`. For value checks
    inside jit use :mod:`jaxrobust.checks`.
    """
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"{name}: threat must be a jaxrobust.threat.ThreatModel, got {type(threat).__name__}.")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: x must be an array of shape (B, *features), got {type(x).__name__}.")
    if x.ndim < 2 or jnp.ndim(y) == 0:
        raise ValueError(f"{name}: got x of shape {tuple(x.shape)} and labels of shape "
                         f"{tuple(jnp.shape(y))}: a batch axis is expected: pass x[None] / shape (B, ...) "
                         f"and y of shape (B,).")
    b = x.shape[0]
    for lab_name, lab in (("y", y), ("y_target", y_target)):
        if lab is None:
            continue
        chex.assert_shape(lab, (b,), exception_type=ValueError,
                          custom_message=f"{name}: {lab_name} must be integer labels of shape ({b},) "
                                         f"for x of shape {tuple(x.shape)}")
        chex.assert_type(lab, int, exception_type=TypeError,
                         custom_message=f"{name}: {lab_name} must be integer labels")
    out = jax.eval_shape(logits_fn, x)
    chex.assert_rank(out, 2, exception_type=ValueError,
                     custom_message=f"{name}: logits_fn(x) must return logits of shape (B, K)")
    chex.assert_shape(out, (b, None), exception_type=ValueError,
                      custom_message=f"{name}: logits_fn(x) must return one row of logits per example")
    num_classes = int(out.shape[1])
    if num_classes < 2:
        raise ValueError(f"{name}: logits_fn(x) returns {num_classes} logit per example; "
                         "attacks need K >= 2 classes.")
    threat.validate_inputs(x, y, num_classes=num_classes)
    if y_target is not None and not isinstance(y_target, jax.core.Tracer):
        yt = np.asarray(y_target)
        if yt.size and (yt.min() < 0 or yt.max() >= num_classes):
            raise ValueError(f"{name}: y_target contains labels outside [0, {num_classes}): "
                             f"range [{yt.min()}, {yt.max()}].")
    return num_classes
