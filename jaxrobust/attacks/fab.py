"""FAB: the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), targeted as in AutoAttack's
standard version (FAB-T, targets = 2nd..10th highest clean logits) and untargeted (minimal norm).

Each iteration linearises the decision boundary between the true class y and a class t,
    g(z) ≈ g(x_k) + ∇g(x_k)·(z - x_k),   g = z_t - z_y,
and projects both the current iterate x_k and the original point x_0 onto the hyperplane {g = 0}
inside the box with the minimal l_p step (exact for l_inf / l_2 / l_1, see ``project_hyperplane``).
The new iterate is the convex combination biased towards x_0 (α ≤ α_max, overshoot η); every
successful point is pulled back towards x_0 by β, so the norm of the best adversarial point shrinks.
On a linear model one step already lands on the exact minimal-norm boundary point.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrobust.attacks.apgd import top_k_targets
from jaxrobust.attacks.common import _bcast, check_attack_inputs
from jaxrobust.threat import ThreatModel, lp_norm


def project_hyperplane(x, w, c, lo, hi, norm: str, iters: int = 50):
    """Minimal-norm step d with <w, d> = c and lo <= d <= hi (per example, flat (B, D)).

    If the box does not allow reaching the hyperplane, returns the step that gets closest (every
    coordinate at its limit in the useful direction). l_inf and l_2 by bisection on a scalar, l_1 by
    the greedy-by-|w| argument (sort + cumulative sums); all exact up to bisection precision.
    """
    s = jnp.sign(c)[:, None]
    dirn = jnp.sign(w) * s  # useful direction of each coordinate
    room = jnp.where(dirn > 0, hi, jnp.where(dirn < 0, -lo, 0.0))  # how far it may move that way
    room = jnp.maximum(room, 0.0)
    aw = jnp.abs(w)
    target = jnp.abs(c)
    reach_max = jnp.sum(aw * room, axis=1)
    if norm == "linf":
        def gain(t):
            return jnp.sum(aw * jnp.minimum(t[:, None], room), axis=1)
        a, b = jnp.zeros_like(target), jnp.max(room, axis=1)
        for _ in range(iters):
            m = 0.5 * (a + b)
            ok = gain(m) >= target
            a, b = jnp.where(ok, a, m), jnp.where(ok, m, b)
        mag = jnp.minimum(b[:, None], room)
    elif norm == "l2":
        def gain(lam):
            return jnp.sum(aw * jnp.minimum(lam[:, None] * aw, room), axis=1)
        a = jnp.zeros_like(target)
        b = jnp.max(jnp.where(aw > 0, room / jnp.maximum(aw, 1e-30), 0.0), axis=1) + 1e-12
        for _ in range(iters):
            m = 0.5 * (a + b)
            ok = gain(m) >= target
            a, b = jnp.where(ok, a, m), jnp.where(ok, m, b)
        mag = jnp.minimum(b[:, None] * aw, room)
    else:  # l1: spend on the largest |w_i| first
        order = jnp.argsort(-aw, axis=1)
        aw_s = jnp.take_along_axis(aw, order, axis=1)
        room_s = jnp.take_along_axis(room, order, axis=1)
        cum = jnp.cumsum(aw_s * room_s, axis=1)
        prev = cum - aw_s * room_s
        need = jnp.clip((target[:, None] - prev) / jnp.maximum(aw_s, 1e-30), 0.0, room_s)
        mag_s = jnp.where(prev < target[:, None], need, 0.0)
        mag = jnp.zeros_like(aw).at[jnp.arange(aw.shape[0])[:, None], order].set(mag_s)
    d = dirn * mag
    # exact hit when reachable: rescale the (bisection-approximate) step onto the hyperplane
    got = jnp.sum(w * d, axis=1)
    scale = jnp.where((reach_max >= target) & (jnp.abs(got) > 0), c / jnp.where(got == 0, 1, got), 1.0)
    return jnp.clip(d * jnp.minimum(scale, 1.0 + 1e-3)[:, None], lo, hi)


def fab_run(logits_fn, x, y, threat: ThreatModel, target, key, *, n_iter: int, n_restarts: int,
            num_classes: int, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9):
    """One FAB run against ``target`` (B,) (untargeted when target is None), from x itself (or, with
    ``n_restarts > 1``, from a random point at half the budget drawn with ``key``).

    Returns the smallest adversarial point found (x where none) and its l_p norm ((B,), inf where
    none). :func:`fab` combines runs over targets and restarts; :func:`fab_select` finishes.
    """
    b = x.shape[0]
    shape = x.shape
    flat = lambda a: a.reshape(b, -1)
    lo_box, hi_box = threat.box_arrays(x)
    eps = threat.eps_for(x)
    k_classes = num_classes
    k = key
    if threat.norm == "linf":
        t = jax.random.uniform(k, shape, x.dtype, -1.0, 1.0)
        t = t / jnp.maximum(_bcast(jnp.max(jnp.abs(flat(t)), 1), x), 1e-12)
    else:
        t = jax.random.normal(k, shape, x.dtype)
        t = t / jnp.maximum(_bcast(lp_norm(t, threat.norm), x), 1e-12)
    x1 = jnp.clip(x + 0.5 * _bcast(eps, x) * t, lo_box, hi_box) if n_restarts > 1 else x
    best = x
    best_norm = jnp.full((b,), jnp.inf, x.dtype)

    def diff_and_grad(z):
        """g = z_t - z_y and its input gradient; untargeted: the class t with the closest
        linearised boundary (|g_t| / ||∇g_t||_q minimal, q the dual norm)."""
        lg, vjp = jax.vjp(logits_fn, z)
        if target is not None:
            df = (jnp.take_along_axis(lg, target[:, None], 1) -
                  jnp.take_along_axis(lg, y[:, None], 1))[:, 0]
            cot = jax.nn.one_hot(target, k_classes) - jax.nn.one_hot(y, k_classes)
            return df, vjp(cot.astype(lg.dtype))[0]
        eye = jnp.eye(k_classes, dtype=lg.dtype)
        jac = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, lg.shape))[0])(eye)  # (K, B, ...)
        jac = jnp.moveaxis(jac, 0, 1).reshape(b, k_classes, -1)
        df = lg - jnp.take_along_axis(lg, y[:, None], 1)  # (B, K)
        dg = jac - jnp.take_along_axis(jac, y[:, None, None], 1)
        if threat.norm == "linf":
            gn = jnp.sum(jnp.abs(dg), -1)
        elif threat.norm == "l2":
            gn = jnp.sqrt(jnp.sum(dg * dg, -1))
        else:
            gn = jnp.max(jnp.abs(dg), -1)
        dist = jnp.abs(df) / (gn + 1e-12)
        dist = jnp.where(jax.nn.one_hot(y, k_classes, dtype=bool), jnp.inf, dist)
        j = jnp.argmin(dist, axis=1)
        return (jnp.take_along_axis(df, j[:, None], 1)[:, 0],
                jnp.take_along_axis(dg, j[:, None, None], 1)[:, 0].reshape(shape))

    def fooled(z):
        pred = jnp.argmax(logits_fn(z), -1)
        return pred == target if target is not None else pred != y

    def body(i, carry):
        x1, best, best_norm = carry
        df, dg = diff_and_grad(x1)
        w = flat(dg)
        # hyperplane g(x1) + w·(z - x1) = 0, i.e. w·d = -g for z = p + d with p = x1 or x0
        c1 = -df
        c0 = -(df + jnp.sum(w * (flat(x) - flat(x1)), axis=1))
        d1 = project_hyperplane(flat(x1), w, c1, flat(lo_box - x1), flat(hi_box - x1), threat.norm)
        d0 = project_hyperplane(flat(x), w, c0, flat(lo_box - x), flat(hi_box - x), threat.norm)
        a1 = jnp.maximum(lp_norm(d1, threat.norm), 1e-8)
        a0 = jnp.maximum(lp_norm(d0, threat.norm), 1e-8)
        alpha = jnp.clip(a1 / (a1 + a0), 0.0, alpha_max)[:, None]
        xn = (flat(x1) + eta * d1) * (1 - alpha) + (flat(x) + eta * d0) * alpha
        xn = jnp.clip(xn.reshape(shape), lo_box, hi_box)
        adv = fooled(xn)
        nrm = lp_norm(xn - x, threat.norm)
        better = adv & (nrm < best_norm)
        best = jnp.where(_bcast(better, x), xn, best)
        best_norm = jnp.where(better, nrm, best_norm)
        xn = jnp.where(_bcast(adv, x), x + (xn - x) * beta, xn)
        return xn, best, best_norm

    _, best, best_norm = jax.lax.fori_loop(0, n_iter, body, (x1, best, best_norm))
    return best, best_norm


def fab_select(x, threat: ThreatModel, best, best_norm, clean_wrong):
    """FAB's output: the best point (projected onto the threat set) where its norm is within ε,
    else x; norms are 0 for clean-misclassified points. Returns (x_adv, norms)."""
    best_norm = jnp.where(clean_wrong, 0.0, best_norm)
    within = best_norm <= threat.eps_for(x) * (1 + 1e-5)
    x_adv = jnp.where(_bcast(within & ~clean_wrong, x), threat.project(x, best), x)
    return x_adv, best_norm


def fab(logits_fn, x, y, key, threat: ThreatModel, *, n_iter: int = 100, n_restarts: int = 1,
        targeted: bool = True, n_target_classes: int = 9, alpha_max: float = 0.1,
        eta: float = 1.05, beta: float = 0.9, return_norms: bool = False):
    """FAB-T (``targeted=True``, AutoAttack standard) or untargeted FAB.

    Returns x_adv (B, ...) inside the threat set: the smallest adversarial point found when its norm is
    within ε, else x. With ``return_norms`` also the minimal adversarial norms found ((B,), inf where
    none), i.e. FAB as a minimal-distortion attack.
    """
    if threat.per_feature_eps is not None:
        raise ValueError("FAB measures plain l_p distances: per-feature eps is not supported.")
    if n_iter < 1 or n_restarts < 1 or (targeted and n_target_classes < 1):
        raise ValueError(f"n_iter, n_restarts and n_target_classes must be >= 1, got "
                         f"{n_iter}, {n_restarts}, {n_target_classes}.")
    k_classes = check_attack_inputs(logits_fn, x, y, threat, name="fab")
    b = x.shape[0]

    def run(target, k):
        return fab_run(logits_fn, x, y, threat, target, k, n_iter=n_iter, n_restarts=n_restarts,
                       num_classes=k_classes, alpha_max=alpha_max, eta=eta, beta=beta)

    keys = jax.random.split(key, n_restarts * max(n_target_classes, 1))
    best, best_norm = x, jnp.full((b,), jnp.inf, x.dtype)
    clean_wrong = jnp.argmax(logits_fn(x), -1) != y
    targets = top_k_targets(logits_fn(x), min(n_target_classes, k_classes - 1)) if targeted else [None]
    ki = 0
    for tgt in targets:
        for _ in range(n_restarts):
            bx, bn = run(tgt, keys[ki])
            ki += 1
            better = bn < best_norm
            best = jnp.where(_bcast(better, x), bx, best)
            best_norm = jnp.where(better, bn, best_norm)
    x_adv, best_norm = fab_select(x, threat, best, best_norm, clean_wrong)
    if return_norms:
        return x_adv, best_norm
    return x_adv
