"""Auto-PGD (Croce & Hein, ICML 2020), faithful to the AutoAttack reference implementation; the
attack of the thesis's Table 4.2 (APGD100-CE, APGD100-DLR) and of AutoAttack (§5.1.4, §5.2.4).

Per example: step size starts at 2ε; heavy-ball update with α = 0.75 (1.0 at the first iteration);
at the checkpoints w_j (22, 41, 57, 70, 80, 87, 93, 99 for 100 iterations: the interval starts at
⌈0.22 N⌉ and shrinks by ⌈0.03 N⌉ down to ⌈0.06 N⌉) the step size is halved and the iterate restarted
from the best point when either (1) the loss increased in at most ρ = 75% of the steps since the last
checkpoint, or (2) the step was not reduced at the last checkpoint and the best loss did not improve
since. Everything is a fixed-shape `lax.fori_loop`; the schedule is precomputed statically.
"""
from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from jaxrobust.attacks import losses
from jaxrobust.attacks.common import _bcast, check_attack_inputs, steepest_ascent_step
from jaxrobust.threat import ThreatModel


def checkpoint_schedule(n_iter: int):
    """Iterations (0-based ``i``) at which APGD checks the step size, and the interval length k in
    force at each iteration. For n_iter=100 the checks happen after iterations 22, 41, ..., 99."""
    k = max(int(0.22 * n_iter), 1)
    k_min = max(int(0.06 * n_iter), 1)
    decr = max(int(0.03 * n_iter), 1)
    is_check = np.zeros(n_iter, bool)
    k_at = np.zeros(n_iter, np.int32)
    counter = 0
    for i in range(n_iter):
        counter += 1
        k_at[i] = k
        if counter == k:
            is_check[i] = True
            counter = 0
            k = max(k - decr, k_min)
    return is_check, k_at


def apgd(logits_fn, x, y, key, threat: ThreatModel, *, n_iter: int = 100, n_restarts: int = 1,
         loss: str = "ce", targeted: bool = False, y_target=None, rho: float = 0.75,
         random_start: bool = True, return_details: bool = False):
    """APGD-CE / APGD-DLR / targeted APGD-DLR.

    Args: x (B, ...) clean inputs; y (B,) labels; loss 'ce' | 'dlr' | 'cw' (targeted: 'dlr'/'ce'/'cw'
    with ``y_target``); n_restarts: restarts are only useful for still-robust points, the best point
    per example is kept (misclassified points first, then highest loss).
    Returns x_adv (B, ...) (or (x_adv, details) with per-example ``robust`` flags and ``loss_best``).
    """
    if targeted and y_target is None:
        raise ValueError("targeted APGD needs y_target.")
    if n_iter < 1 or n_restarts < 1:
        raise ValueError(f"n_iter and n_restarts must be >= 1, got {n_iter}, {n_restarts}.")
    check_attack_inputs(logits_fn, x, y, threat, y_target=y_target if targeted else None,
                        name="apgd")
    loss_fn = losses.get_loss(loss, targeted)
    is_check_np, k_at_np = checkpoint_schedule(n_iter)
    is_check, k_at = jnp.asarray(is_check_np), jnp.asarray(k_at_np)
    eps = threat.eps_for(x)
    b = x.shape[0]
    step0 = 2.0 if threat.norm in ("linf", "l2") else 1.0  # the reference's initial step / eps

    def loss_and_grad(xa):
        def total(z):
            logits = logits_fn(z)
            li = loss_fn(logits, y, y_target) if targeted else loss_fn(logits, y)
            return jnp.sum(li), (li, logits)
        (_, (li, logits)), g = jax.value_and_grad(total, has_aux=True)(xa)
        return li, logits, g

    def fooled(logits):
        pred = jnp.argmax(logits, -1)
        return (pred == y_target) if targeted else (pred != y)

    def single_run(k0):
        x_adv = threat.random_init(k0, x) if random_start else x
        li, logits, grad = loss_and_grad(x_adv)
        adv = fooled(logits)
        x_best_adv = jnp.where(_bcast(adv, x), x_adv, x)
        carry = dict(x_adv=x_adv, x_old=x_adv, grad=grad, grad_best=grad, x_best=x_adv,
                     x_best_adv=x_best_adv, adv=adv, loss_best=li,
                     loss_steps=jnp.zeros((n_iter, b), x.dtype), step=step0 * eps,
                     reduced_last=jnp.ones((b,), bool), loss_best_last=li)
        steps_idx = jnp.arange(n_iter)

        def body(i, c):
            a = jnp.where(i > 0, 0.75, 1.0)
            grad2 = c["x_adv"] - c["x_old"]
            z = threat.project(x, steepest_ascent_step(c["grad"], c["x_adv"], x, threat, c["step"]))
            x_new = threat.project(x, c["x_adv"] + (z - c["x_adv"]) * a + grad2 * (1 - a))
            li, logits, grad = loss_and_grad(x_new)
            now_adv = fooled(logits)
            x_best_adv = jnp.where(_bcast(now_adv, x), x_new, c["x_best_adv"])
            adv = c["adv"] | now_adv
            loss_steps = c["loss_steps"].at[i].set(li)
            improved = li > c["loss_best"]
            x_best = jnp.where(_bcast(improved, x), x_new, c["x_best"])
            grad_best = jnp.where(_bcast(improved, x), grad, c["grad_best"])
            loss_best = jnp.where(improved, li, c["loss_best"])

            # Checkpoint test (condition 1: too few increases; condition 2: no improvement and the
            # step was not reduced last time). Indices wrap like the reference implementation.
            k = k_at[i]
            cur = loss_steps[(i - steps_idx) % n_iter]
            prev = loss_steps[(i - steps_idx - 1) % n_iter]
            incr = jnp.sum(jnp.where((steps_idx < k)[:, None], cur > prev, False), axis=0)
            osc = incr <= k * rho
            no_impr = (~c["reduced_last"]) & (c["loss_best_last"] >= loss_best)
            reduce = (osc | no_impr) & is_check[i]
            step = jnp.where(reduce, c["step"] / 2.0, c["step"])
            x_next = jnp.where(_bcast(reduce, x), x_best, x_new)
            g_next = jnp.where(_bcast(reduce, x), grad_best, grad)
            reduced_last = jnp.where(is_check[i], osc | no_impr, c["reduced_last"])
            loss_best_last = jnp.where(is_check[i], loss_best, c["loss_best_last"])
            return dict(x_adv=x_next, x_old=x_new, grad=g_next, grad_best=grad_best, x_best=x_best,
                        x_best_adv=x_best_adv, adv=adv, loss_best=loss_best, loss_steps=loss_steps,
                        step=step, reduced_last=reduced_last, loss_best_last=loss_best_last)

        c = jax.lax.fori_loop(0, n_iter, body, carry)
        # Return the misclassified point where one was found, else the highest-loss point.
        out = jnp.where(_bcast(c["adv"], x), c["x_best_adv"], c["x_best"])
        return out, c["adv"], c["loss_best"]

    keys = jax.random.split(key, n_restarts)
    best_x, best_adv, best_loss = single_run(keys[0])
    for r in range(1, n_restarts):
        xr, advr, lossr = single_run(keys[r])
        take = (~best_adv) & (advr | (lossr > best_loss))
        best_x = jnp.where(_bcast(take, x), xr, best_x)
        best_loss = jnp.where(take, lossr, best_loss)
        best_adv = best_adv | advr
    if return_details:
        return best_x, {"robust": ~best_adv, "loss_best": best_loss}
    return best_x


def top_k_targets(logits, k: int):
    """AutoAttack's targets: the 2nd..(k+1)-th highest clean logits, shape (k, B)."""
    order = jnp.argsort(logits, axis=-1)  # ascending
    return jnp.stack([order[:, -(j + 2)] for j in range(k)])


def apgd_targeted(logits_fn, x, y, key, threat: ThreatModel, *, n_iter: int = 100,
                  n_target_classes: int = 9, loss: str = "dlr", n_restarts: int = 1):
    """APGD-T: targeted APGD-DLR against each of the top ``n_target_classes`` other classes
    (AutoAttack standard: 9 targets, 1 restart each); the first success per example is kept.

    Args: x (B, ...) clean inputs; y (B,) int labels in [0, K); targets are the top
    ``min(n_target_classes, K - 1)`` other classes by clean logit."""
    if n_target_classes < 1 or n_iter < 1 or n_restarts < 1:
        raise ValueError(f"n_target_classes, n_iter and n_restarts must be >= 1, got "
                         f"{n_target_classes}, {n_iter}, {n_restarts}.")
    num_classes = check_attack_inputs(logits_fn, x, y, threat, name="apgd_targeted")
    k = min(n_target_classes, num_classes - 1)
    targets = top_k_targets(logits_fn(x), k)
    robust0 = jnp.argmax(logits_fn(x), -1) == y

    def one_target(carry, inp):
        # A scan over targets compiles APGD once instead of k times.
        best, robust = carry
        target, kk = inp
        xa = apgd(logits_fn, x, y, kk, threat, n_iter=n_iter, n_restarts=n_restarts, loss=loss,
                  targeted=True, y_target=target)
        broke = robust & (jnp.argmax(logits_fn(xa), -1) != y)
        return (jnp.where(_bcast(broke, x), xa, best), robust & ~broke), None

    (best, _), _ = jax.lax.scan(one_target, (x, robust0), (targets, jax.random.split(key, k)))
    return best
