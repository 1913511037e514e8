"""FGSM and projected gradient descent (Madry et al. 2018; thesis §2.1 eq. 2.3, §4.1).

All functions are pure and jit/vmap-able: ``logits_fn`` is any JAX function ``x -> logits``,
``threat`` a :class:`jaxrobust.threat.ThreatModel` pytree (scalar or per-example ε, optional
per-feature ε⃗, box). Integer options are Python values (static under jit). Examples already broken
are masked (frozen), never sliced out.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrobust.attacks import losses
from jaxrobust.attacks.common import (check_attack_inputs, default_unroll, steepest_ascent_step,
                                     update_best)
from jaxrobust.threat import ThreatModel

STEP_SCHEDULES = ("constant", "cosine", "step")


def _schedule_factor(schedule: str, t, steps: int):
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + jnp.cos(jnp.pi * t / steps))
    if schedule == "step":  # halve at 50% and 75% of the iterations
        return jnp.where(t >= 0.75 * steps, 0.25, jnp.where(t >= 0.5 * steps, 0.5, 1.0))
    raise ValueError(f"Unknown step_schedule {schedule!r}; expected one of {STEP_SCHEDULES}.")


def _strength(logits, y, y_target, targeted):
    """Per-example attack strength used to keep the best point: > 0 means success."""
    if targeted:
        return losses.cw_targeted(logits, y, y_target)
    return -losses.margin(logits, y)


def pgd(logits_fn, x, y, key, threat: ThreatModel, *, steps: int = 10, step_size=None,
        loss: str = "ce", restarts: int = 1, random_start: bool = True, targeted: bool = False,
        y_target=None, early_stop: bool = False, step_schedule: str = "constant",
        unroll=None):
    """PGD with restarts; returns the strongest point per example (by CW margin), shape of ``x``.

    Args:
      x: (B, ...) clean inputs inside the box; y: (B,) int labels.
      step_size: scalar or (B,); default ``2.5 ε / steps`` (Madry et al.), per example.
      loss: 'ce', 'cw' or 'dlr' (targeted forms when ``targeted``; ``y_target`` (B,) required).
      restarts: independent runs (each from a random start if ``random_start``); the best per example
        is kept. early_stop: freeze an example once it is broken (its best point is kept).
      unroll: unroll the step loop (None: by backend, :func:`attacks.common.default_unroll`: on CPU
        when ``steps <= 20``, since XLA:CPU runs convolutions inside a while loop several times
        slower than unrolled; on GPU/TPU the rolled loop).
    """
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps must be >= 0 and restarts >= 1, got {steps}, {restarts}.")
    if targeted and y_target is None:
        raise ValueError("targeted PGD needs y_target.")
    check_attack_inputs(logits_fn, x, y, threat, y_target=y_target if targeted else None, name="pgd")
    loss_fn = losses.get_loss(loss, targeted)
    eps = threat.eps_for(x)
    alpha = 2.5 * eps / max(steps, 1) if step_size is None else jnp.broadcast_to(
        jnp.asarray(step_size, x.dtype), eps.shape)
    _schedule_factor(step_schedule, 0, steps)  # validates the name eagerly

    def objective(xa):
        logits = logits_fn(xa)
        val = loss_fn(logits, y, y_target) if targeted else loss_fn(logits, y)
        return jnp.sum(val), logits

    grad_fn = jax.grad(objective, has_aux=True)

    def one_run(k):
        x_start = threat.random_init(k, x) if random_start else x
        best_x = x_start
        best_s = _strength(logits_fn(x_start), y, y_target, targeted)

        def body(t, carry):
            xa, bx, bs = carry
            g, logits = grad_fn(xa)
            s = _strength(logits, y, y_target, targeted)
            bx, bs = update_best(bx, bs, xa, s)
            active = ~(bs > 0) if early_stop else jnp.ones_like(bs, bool)
            step = alpha * _schedule_factor(step_schedule, t, steps)
            xn = threat.project(x, steepest_ascent_step(g, xa, x, threat, step))
            xa = jnp.where(active.reshape((-1,) + (1,) * (x.ndim - 1)), xn, xa)
            return xa, bx, bs

        do_unroll = default_unroll(steps) if unroll is None else unroll
        xa, bx, bs = jax.lax.fori_loop(0, steps, body, (x_start, best_x, best_s),
                                       unroll=bool(do_unroll) and steps > 0)
        return update_best(bx, bs, xa, _strength(logits_fn(xa), y, y_target, targeted))

    keys = jax.random.split(key, restarts)
    best_x, best_s = one_run(keys[0])
    for r in range(1, restarts):
        bx, bs = one_run(keys[r])
        best_x, best_s = update_best(best_x, best_s, bx, bs)
    return best_x


def fgsm(logits_fn, x, y, key, threat: ThreatModel, *, step_size=None, random_start: bool = False,
         loss: str = "ce"):
    """FGSM (Goodfellow et al. 2015) and its l_p generalisation; with ``random_start`` it is
    FGSM-RS (Wong et al. 2020, default step 1.25 ε). One gradient step, then projection.

    Args: x (B, ...) clean inputs inside the box; y (B,) int labels in [0, K)."""
    check_attack_inputs(logits_fn, x, y, threat, name="fgsm")
    loss_fn = losses.get_loss(loss)
    eps = threat.eps_for(x)
    if step_size is None:
        step_size = 1.25 * eps if random_start else eps
    alpha = jnp.broadcast_to(jnp.asarray(step_size, x.dtype), eps.shape)
    x_start = threat.random_init(key, x) if random_start else x
    g = jax.grad(lambda xa: jnp.sum(loss_fn(logits_fn(xa), y)))(x_start)
    return threat.project(x, steepest_ascent_step(g, x_start, x, threat, alpha))


def multi_targeted_pgd(logits_fn, x, y, key, threat: ThreatModel, *, num_classes=None,
                       steps: int = 10, step_size=None, loss: str = "cw", random_start: bool = True):
    """Multi-targeted PGD (Gowal et al. 2019): one targeted run per class t != y (all K-1 targets);
    the strongest per example (by CW margin) is kept.

    Args: x (B, ...) clean inputs; y (B,) int labels; num_classes: K (default: read from the
    shape of ``logits_fn(x)``; if given it must match it)."""
    k_found = check_attack_inputs(logits_fn, x, y, threat, name="multi_targeted_pgd")
    if num_classes is None:
        num_classes = k_found
    elif num_classes != k_found:
        raise ValueError(f"multi_targeted_pgd: num_classes={num_classes!r} but logits_fn(x) returns "
                         f"{k_found} logits per example.")
    keys = jax.random.split(key, num_classes - 1)
    best_x, best_s = x, -losses.margin(logits_fn(x), y)
    for j in range(1, num_classes):
        target = (y + j) % num_classes
        xa = pgd(logits_fn, x, y, keys[j - 1], threat, steps=steps, step_size=step_size, loss=loss,
                 random_start=random_start, targeted=True, y_target=target)
        best_x, best_s = update_best(best_x, best_s, xa, -losses.margin(logits_fn(xa), y))
    return best_x
