"""Adversarial training objectives of thesis §4.1-4.2 (Table 4.2's methods): TRADES, MART, adversarial
weight perturbation (AWP) on top of PGD-AT / TRADES / MART, an exponential moving average (EMA) of the
weights as a generic :class:`~jaxrobust.train.objectives.Objective` wrapper, and ε clipped to the
target budget as eq. 4.29 asks.

Registered objectives (``objective.name``):

- ``trades`` (Zhang et al. 2019): ``CE(f(x), y) + β·KL(p(x) ‖ p(x'))``, x' from the KL inner
  maximisation of the reference TRADES code (start ``x + 0.001·N(0, I)``, steps along the l_p steepest
  ascent direction of the KL, projection onto ball ∩ box, last iterate);
- ``mart`` (Wang et al. 2020): ``BCE(p(x'), y) + β·KL(p(x) ‖ p(x'))·(1 − p_y(x))`` on PGD-CE points
  (same inner loop as TRADES with the CE loss, as the reference MART code);
- ``awp_at``, ``awp_trades``, and ``awp`` (base method from ``objective.awp.base``): adversarial
  weight perturbation (Wu et al. 2020) of relative size γ = ``objective.awp.gamma``: the base method's
  adversarial points are found at w, then one normalised ascent step of the base loss in weight space,
  ``v_l = γ‖w_l‖ ∇_{w_l}L / ‖∇_{w_l}L‖`` for every weight with ndim > 1 (kernels; not biases or
  BatchNorm), and the loss (and its gradient) is evaluated at ``w + v``. The perturbation lives only
  inside the loss: the stored weights are never perturbed and the loop's optimizer step applies the
  gradient at ``w + v`` to ``w`` (the reference code's perturb / step / restore).

All of them: l_inf, l_2 (and l_1) through the run's threat model; the attack uses the BatchNorm mode
``objective.attack.bn_mode`` with gradients to the weights stopped; the training forward passes run in
train mode (BatchNorm statistics updated by the clean then the adversarial batch, as the reference
codes' successive calls). ``β`` is ``objective.beta`` or, when configured, the named schedule
``objective.schedules.beta``; AWP's γ likewise ``objective.schedules.awp_gamma`` (and
``objective.awp.warmup_epochs`` without AWP first, as the reference TRADES-AWP runs).
``objective.ema_decay`` > 0 keeps an EMA of the weights in ``extra['ema']`` (:func:`with_ema`;
``load_trained(workdir, weights='ema')`` evaluates it with the final BatchNorm statistics).

ε schedules (thesis §4.2.4 eq. 4.29): ``ε_cos(d) = ½(1 − cos(πd/D))(ε_max − ε_min) + ε_min`` and
``ε_lin(d) = (ε_max − ε_min)·d/D + ε_min`` over the epoch d, clipped to [0, ε_target]. With
``objective.eps_schedule`` = cosine / linear, ``start_fraction = ε_min/ε_target``,
``final_fraction = ε_max/ε_target`` and ``ramp_epochs = D`` the scalar schedule builder gives the
unclipped eq. 4.29 (base value ε_target = ``threat.eps``); these objectives clip it to
``[0, threat.eps]`` (:func:`eps_at`), so ε_max > ε_target (the thesis's MNIST 0.6 / 0.8 for 0.4) and
ε_min ≤ 0 behave as §4.2.4 says.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from jaxrobust.attacks.common import default_unroll, steepest_ascent_step
from jaxrobust.models import forward_train, make_logits_fn
from jaxrobust.train.objectives import (Objective, ObjectiveContext, ObjectiveOutput, ce_and_accuracy,
                                        masked_mean, per_example_ce, pgd_points, register, with_ema)

AWP_EPS = 1e-20  # the reference AWP code's guard against a zero gradient norm
START_NOISE = 1e-3  # TRADES / MART start: x + 0.001·N(0, I)
AWP_BASES = ("pgd_at", "at", "trades", "mart")  # "at": the alias of pgd_at


# ----------------------------------------------------------------------------- ε, β, γ
def eps_at(ctx: ObjectiveContext, step):
    """ε of the step: the configured ε schedule clipped to ``[0, threat.eps]`` (thesis §4.2.4: "we clip
    ε_cos(d) and ε_lin(d) between 0 and ε_target")."""
    return jnp.clip(ctx.schedules["eps"](step), 0.0, ctx.threat.eps)


def clipped_context(ctx: ObjectiveContext) -> ObjectiveContext:
    """``ctx`` whose ``schedules['eps']`` is :func:`eps_at` (what the attack helpers read)."""
    return dataclasses.replace(ctx, schedules={**ctx.schedules, "eps": lambda step: eps_at(ctx, step)})


def _scalar(ctx, name: str, step, value, what: str):
    if name in ctx.schedules:
        return ctx.schedules[name](step)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"objective.{what} must be a number >= 0, got {value!r}.")
    return jnp.asarray(value, jnp.float32)


def beta_at(ctx: ObjectiveContext, step):
    """TRADES / MART weight β: ``ctx.schedules['beta'](step)`` if configured, else ``objective.beta``."""
    return _scalar(ctx, "beta", step, ctx.cfg.beta, "beta")


def awp_gamma_at(ctx: ObjectiveContext, step, batch_size: int):
    """AWP relative size γ: ``ctx.schedules['awp_gamma'](step)`` if configured, else
    ``objective.awp.gamma``; 0 during the first ``objective.awp.warmup_epochs`` epochs (the reference
    code's ``--awp-warmup``, which counts epochs from 1: its ``awp_warmup=10`` is ``warmup_epochs=9``).
    An epoch is ``n_train // batch_size`` steps, as the loop counts them."""
    gamma = _scalar(ctx, "awp_gamma", step, ctx.cfg.awp.gamma, "awp.gamma")
    warm = ctx.cfg.awp.warmup_epochs
    if isinstance(warm, bool) or not isinstance(warm, (int, float)) or warm < 0:
        raise ValueError(f"objective.awp.warmup_epochs must be a number >= 0, got {warm!r}.")
    if warm == 0:
        return gamma
    if ctx.n_train < batch_size:
        raise ValueError(f"objective.awp.warmup_epochs needs the training-set size (ctx.n_train = "
                         f"{ctx.n_train}) to be at least the batch size {batch_size}.")
    warm_steps = int(round(warm * (ctx.steps_per_epoch or ctx.n_train // batch_size)))
    return jnp.where(step >= warm_steps, gamma, jnp.zeros_like(gamma))


# ----------------------------------------------------------------------------- per-example terms
def kl_rows(logits_p, logits_q):
    """Per-example ``KL(p ‖ q) = Σ_k p_k (log p_k − log q_k)`` of two logit batches (B, K) -> (B,)."""
    logp = jax.nn.log_softmax(logits_p, axis=-1)
    logq = jax.nn.log_softmax(logits_q, axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def _step_size(ctx, eps):
    a = ctx.cfg.attack
    if a.step_size > 0:
        scale = eps / ctx.threat.eps if (a.scale_step_with_eps and ctx.threat.eps > 0) else 1.0
        return a.step_size * scale
    return 2.5 * eps / max(a.steps, 1)


def inner_maximisation(ctx, params, model_state, batch, key, step, loss: str):
    """The inner loop of the reference TRADES / MART codes (thesis §4.1 eq. 4.1's max over the ball):
    ``x'_0 = Π(x + 0.001·N(0, I))``, ``x'_{t+1} = Π(x'_t + α·s(∇ℓ(x'_t)))`` for ``attack.steps`` steps
    (s: sign for l_inf, g/‖g‖_2 for l_2), Π the exact projection onto the ε-ball ∩ box, the last iterate
    returned. ``loss='kl'``: ℓ = Σ_b KL(p(x_b) ‖ p(x'_b)) (TRADES); ``loss='ce'``: ℓ = Σ_b CE(f(x'_b), y_b)
    (MART). α = ``attack.step_size`` (scaled with ε when ramped) or 2.5ε/steps; ``attack.restarts``,
    ``attack.random_start`` and ``attack.loss`` are not used (the reference codes have one run from the
    small Gaussian start). Returns ``(x', ε)``."""
    a = ctx.cfg.attack
    eps = ctx.eps_at(step)
    x, y = batch["image"], batch["label"]
    threat = ctx.threat.replace(eps=eps)
    logits_fn = make_logits_fn(ctx.model, {"params": params, **model_state}, a.bn_mode,
                               stop_gradient=True)
    if loss == "kl":
        clean_logits = jax.lax.stop_gradient(logits_fn(x))

        def objective(xa):
            return jnp.sum(kl_rows(clean_logits, logits_fn(xa)))
    elif loss == "ce":
        def objective(xa):
            return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_fn(xa), y))
    else:
        raise ValueError(f"inner_maximisation loss must be 'kl' or 'ce', got {loss!r}.")
    alpha = jnp.broadcast_to(jnp.asarray(_step_size(ctx, eps), x.dtype), (x.shape[0],))
    grad = jax.grad(objective)
    x0 = threat.project(x, x + START_NOISE * jax.random.normal(key, x.shape, x.dtype))

    def body(_, xa):
        return threat.project(x, steepest_ascent_step(grad(xa), xa, x, threat, alpha))

    steps = int(a.steps)
    xa = jax.lax.fori_loop(0, steps, body, x0, unroll=default_unroll(steps))  # by backend
    return jax.lax.stop_gradient(xa), eps


# ----------------------------------------------------------------------------- losses on given points
def at_loss_on_points(ctx, params, model_state, batch, x_adv, step):
    """PGD-AT's outer loss (thesis eq. 4.1): masked mean CE of f(x'). Returns (loss, state, metrics)."""
    logits, new_state = forward_train(ctx.model, params, model_state, x_adv)
    loss, acc = ce_and_accuracy(logits, batch["label"], batch["mask"])
    return loss, new_state, {"loss": loss, "adv_accuracy": acc,
                             "per_example": per_example_ce(logits, batch["label"])}


def trades_loss_on_points(ctx, params, model_state, batch, x_adv, step):
    """TRADES (Zhang et al. 2019, its training objective): ``mean_b CE(f(x_b), y_b) + β·mean_b
    KL(p(x_b) ‖ p(x'_b))`` with gradients through both distributions, as the reference code."""
    y, mask = batch["label"], batch["mask"]
    logits, state = forward_train(ctx.model, params, model_state, batch["image"])
    logits_adv, state = forward_train(ctx.model, params, state, x_adv)
    ce, acc = ce_and_accuracy(logits, y, mask)
    kl = masked_mean(kl_rows(logits, logits_adv), mask)
    beta = beta_at(ctx, step)
    loss = ce + beta * kl
    adv_acc = masked_mean((jnp.argmax(logits_adv, -1) == y).astype(jnp.float32), mask)
    return loss, state, {"loss": loss, "ce": ce, "kl": kl, "beta": beta, "accuracy": acc,
                         "adv_accuracy": adv_acc, "per_example": per_example_ce(logits_adv, y)}


def mart_loss_on_points(ctx, params, model_state, batch, x_adv, step):
    """MART (Wang et al. 2020, the loss of its reference code):
    ``mean_b [CE(f(x'_b), y_b) − log(1.0001 − p_ŷ(x'_b) + 1e-12)]
    + β·mean_b [Σ_k p_k(x_b)(log p_k(x_b) − log(p_k(x'_b) + 1e-12))·(1.0000001 − p_y(x_b))]``,
    ŷ the most probable wrong class of p(x'_b)."""
    y, mask = batch["label"], batch["mask"]
    logits, state = forward_train(ctx.model, params, model_state, batch["image"])
    logits_adv, state = forward_train(ctx.model, params, state, x_adv)
    k = logits.shape[-1]
    onehot = jax.nn.one_hot(y, k, dtype=bool)
    p_adv = jax.nn.softmax(logits_adv, axis=-1)
    p_nat = jax.nn.softmax(logits, axis=-1)
    wrong = jnp.argmax(jnp.where(onehot, -jnp.inf, p_adv), axis=-1)
    p_wrong = jnp.take_along_axis(p_adv, wrong[:, None], axis=-1)[:, 0]
    ce_adv = optax.softmax_cross_entropy_with_integer_labels(logits_adv, y)
    bce = ce_adv - jnp.log(1.0001 - p_wrong + 1e-12)
    kl = jnp.sum(p_nat * (jax.nn.log_softmax(logits, axis=-1) - jnp.log(p_adv + 1e-12)), axis=-1)
    p_true = jnp.sum(jnp.where(onehot, p_nat, 0.0), axis=-1)
    beta = beta_at(ctx, step)
    bce_m, kl_m = masked_mean(bce, mask), masked_mean(kl * (1.0000001 - p_true), mask)
    loss = bce_m + beta * kl_m
    acc = masked_mean((jnp.argmax(logits, -1) == y).astype(jnp.float32), mask)
    adv_acc = masked_mean((jnp.argmax(logits_adv, -1) == y).astype(jnp.float32), mask)
    return loss, state, {"loss": loss, "bce": bce_m, "kl": kl_m, "beta": beta, "accuracy": acc,
                         "adv_accuracy": adv_acc, "per_example": per_example_ce(logits_adv, y)}


def _pgd_at_points(ctx, params, model_state, batch, key, step):
    return pgd_points(ctx, params, model_state, batch, key, step)


def _trades_points(ctx, params, model_state, batch, key, step):
    return inner_maximisation(ctx, params, model_state, batch, key, step, "kl")


def _mart_points(ctx, params, model_state, batch, key, step):
    return inner_maximisation(ctx, params, model_state, batch, key, step, "ce")


# method name -> (points(ctx, params, state, batch, key, step) -> (x', ε),
#                 loss_on_points(ctx, params, state, batch, x', step) -> (loss, state, metrics))
METHODS: Dict[str, Tuple[Callable, Callable]] = {
    "pgd_at": (_pgd_at_points, at_loss_on_points),
    "at": (_pgd_at_points, at_loss_on_points),
    "trades": (_trades_points, trades_loss_on_points),
    "mart": (_mart_points, mart_loss_on_points),
}


def _method(name: str):
    if name not in METHODS:
        raise ValueError(f"objective.awp.base must be one of {AWP_BASES}, got {name!r}.")
    return METHODS[name]


def method_loss(name: str) -> Callable:
    """The Objective loss of a method of :data:`METHODS` (adversarial points at the current weights,
    then the outer loss), ε from :func:`eps_at`."""
    points, loss_on = _method(name)

    def loss(ctx, params, model_state, extra, batch, key, step):
        ctx = clipped_context(ctx)
        x_adv, eps = points(ctx, params, model_state, batch, key, step)
        value, state, metrics = loss_on(ctx, params, model_state, batch, x_adv, step)
        per_example = metrics.pop("per_example", {})  # adversarial CE / correctness (eq. 4.30)
        return value, ObjectiveOutput(state, {}, {**metrics, "eps": eps}, per_example)

    loss.__name__ = f"{name}_loss"
    loss.__doc__ = f"{name}: see :func:`{loss_on.__name__}`."
    return loss


# ----------------------------------------------------------------------------- AWP
def is_awp_weight(leaf) -> bool:
    """AWP perturbs weights with ndim > 1 (conv / dense kernels), never biases or BatchNorm."""
    return getattr(leaf, "ndim", 0) > 1


def awp_perturbation(loss_of_params: Callable, params, gamma):
    """One normalised ascent step in weight space (Wu et al. 2020; the reference code's proxy step):
    ``v_l = γ‖w_l‖ g_l / (‖g_l‖ + 1e-20)``, ``g = ∇_w loss_of_params(w)``, for every leaf
    with ndim > 1 (Frobenius norms per leaf), 0 elsewhere. No gradient flows through ``v``."""
    w = jax.lax.stop_gradient(params)
    g = jax.grad(loss_of_params)(w)

    def leaf(wl, gl):
        if not is_awp_weight(wl):
            return jnp.zeros_like(wl)
        scale = gamma * jnp.linalg.norm(wl.ravel()) / (jnp.linalg.norm(gl.ravel()) + AWP_EPS)
        return (scale * gl).astype(wl.dtype)

    return jax.lax.stop_gradient(jax.tree.map(leaf, w, g))


def awp_loss(base: Optional[str] = None) -> Callable:
    """AWP on top of ``base`` (``None``: ``objective.awp.base``): the base method's adversarial points
    x' at w; v from :func:`awp_perturbation` of the base loss on x' (train-mode forward, its BatchNorm
    updates discarded like the reference code's proxy model); the base loss at ``w + v`` on x'.
    Its gradient with respect to w is ``∇L(w + v)`` (v is a constant), which the loop's optimizer applies
    to the unperturbed w."""
    if base is not None:
        _method(base)

    def loss(ctx, params, model_state, extra, batch, key, step):
        ctx = clipped_context(ctx)
        points, loss_on = _method(base if base is not None else ctx.cfg.awp.base)
        x_adv, eps = points(ctx, params, model_state, batch, key, step)
        gamma = awp_gamma_at(ctx, step, batch["image"].shape[0])
        v = awp_perturbation(lambda p: loss_on(ctx, p, model_state, batch, x_adv, step)[0],
                             params, gamma)
        perturbed = jax.tree.map(jnp.add, params, v)
        value, state, metrics = loss_on(ctx, perturbed, model_state, batch, x_adv, step)
        per_example = metrics.pop("per_example", {})
        v_norm = optax.global_norm(v)
        return value, ObjectiveOutput(state, {}, {**metrics, "eps": eps, "awp_gamma": gamma,
                                                  "awp_norm": v_norm}, per_example)

    loss.__name__ = f"awp_{base or 'config'}_loss"
    return loss


# ----------------------------------------------------------------------------- registration
def validate_config(cfg) -> None:
    """Checks β and the AWP settings before a run writes anything (the losses check them too)."""
    def number(value, what):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"objective.{what} must be a number >= 0, got {value!r}.")
    number(cfg.beta, "beta")
    number(cfg.awp.gamma, "awp.gamma")
    number(cfg.awp.warmup_epochs, "awp.warmup_epochs")
    if cfg.awp.base not in AWP_BASES:
        raise ValueError(f"objective.awp.base must be one of {AWP_BASES}, got {cfg.awp.base!r}.")


# EMA of the weights (objective.ema_decay > 0) is added to every objective by the loop
# (jaxrobust.train.objectives.with_ema).
for _name in ("trades", "mart"):
    register(_name, Objective(init=None, loss=method_loss(_name), validate=validate_config))
register("awp", Objective(init=None, loss=awp_loss(None), validate=validate_config))
register("awp_at", Objective(init=None, loss=awp_loss("pgd_at"), validate=validate_config))
register("awp_trades", Objective(init=None, loss=awp_loss("trades"), validate=validate_config))

__all__ = ["eps_at", "clipped_context", "beta_at", "awp_gamma_at", "kl_rows", "inner_maximisation",
           "at_loss_on_points", "trades_loss_on_points", "mart_loss_on_points", "METHODS",
           "method_loss", "awp_perturbation", "awp_loss", "is_awp_weight", "with_ema", "AWP_BASES"]
