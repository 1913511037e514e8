"""Adaptive inputs and adaptive targets against robust overfitting (thesis §4.3.4), as objectives of
the one training loop.

Registered objectives (``objective.name``):

- ``at_rw`` / ``atta_rw``: the thesis's Algorithm 4.1 on PGD-AT (points from ``objective.attack``)
  and on ATTA (``objective.fast``: the per-instance perturbation cache of
  :mod:`jaxrobust.train.fast_at`, reused, not copied). With x'_i the adversarial input and
  o'_i = softmax(f(x'_i)) its output (the forward pass the model trains on: no extra pass),
  ``w_i = o'_{i,y_i}`` (``rw.reweight``; 1 otherwise, gradients stopped), the per-instance moving
  average ``t~_i ← ρ t~_i + (1 − ρ) o'_i`` (``rw.rho``; t~_i starts at the one-hot label at the
  instance's first visit), the target ``t_i = β 1_{y_i} + (1 − β) t~_i`` (``rw.beta``) and the loss
  ``Σ_i w_i CE(f(x'_i), t_i) / Σ_i w_i``. During the first ``rw.warmup_epochs`` epochs targets are
  one-hot and weights 1 (t~ is still updated). ``rw.kl_lambda = λ > 0`` adds the fine-tuning term of
  Table 4.7: ``Σ_i w_i [CE(f(x'_i), t_i) + λ KL(o_i ‖ o'_i)] / Σ_i w_i`` with the clean output o_i
  (one more forward pass; gradients through both, as TRADES). Vanilla AT, RW, KL and RW + KL of
  Table 4.7 are ``at_rw`` with (reweight, kl_lambda) = (False, 0), (True, 0), (False, 6), (True, 6)
  and β = 1.
- ``iat`` (instance-adaptive adversarial training, Balaji et al. 2019): a per-instance budget ε_i in
  ``extra['instance']['eps']``; after ``iat.warmup_epochs`` of uniform ε each example is attacked
  (PGD, ``objective.attack``, step scaled with ε_i) at its own ε_i, and
  ``ε_i ← β ε_i + (1 − β) clip(ε_i ± γ ε, 0, ε)`` with + when the model classifies its adversarial
  point correctly (it is robust at ε_i: enlarge) and − otherwise (γ = ``iat.gamma``, β = ``iat.beta``).
  Correctness is read from the training forward pass (no extra pass).
- ``sat`` (self-adaptive training, Huang et al. 2020, its adversarial form): per-instance soft targets
  ``t_i ← α t_i + (1 − α) softmax(f(x_i))`` from the clean output (eval mode, one extra forward pass),
  after ``sat.warmup_epochs`` epochs of one-hot targets; the loss on PGD points
  ``−Σ_i w_i Σ_k t_ik log p_k(x'_i) / Σ_i w_i`` with ``w_i = max_k t_ik`` (α = ``sat.momentum``).

All of them report per-example one-hot CE and correctness of the adversarial forward pass
(``ObjectiveOutput.per_example``), so ``train.difficulty`` tracks them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxrobust import attacks
from jaxrobust.models import forward_train, make_logits_fn
from jaxrobust.train import fast_at
from jaxrobust.train.adversarial import kl_rows
from jaxrobust.train.objectives import (Objective, ObjectiveOutput, masked_mean, per_example_ce,
                                        pgd_points, register)


# ----------------------------------------------------------------------------- settings
def _number(value, what: str, lo: float = 0.0, hi: float = float("inf")) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        rng = f"[{lo:g}, {hi:g}]" if hi != float("inf") else f">= {lo:g}"
        raise ValueError(f"objective.{what} must be a number in {rng}, got {value!r}.")
    return float(value)


def validate_rw(cfg) -> None:
    rw = cfg.rw
    if not isinstance(rw.reweight, bool):
        raise ValueError(f"objective.rw.reweight must be True or False, got {rw.reweight!r}.")
    _number(rw.rho, "rw.rho", 0.0, 1.0)
    _number(rw.beta, "rw.beta", 0.0, 1.0)
    _number(rw.warmup_epochs, "rw.warmup_epochs")
    _number(rw.kl_lambda, "rw.kl_lambda")


def validate_iat(cfg) -> None:
    _number(cfg.iat.gamma, "iat.gamma")
    _number(cfg.iat.beta, "iat.beta", 0.0, 1.0)
    _number(cfg.iat.warmup_epochs, "iat.warmup_epochs")
    _number(cfg.iat.init_fraction, "iat.init_fraction", 0.0, 1.0)


def validate_sat(cfg) -> None:
    _number(cfg.sat.momentum, "sat.momentum", 0.0, 1.0)
    _number(cfg.sat.warmup_epochs, "sat.warmup_epochs")


def in_warmup(ctx, step, epochs: float):
    """True during the first ``epochs`` epochs (the loop's ``steps_per_epoch`` steps each)."""
    spe = max(int(ctx.steps_per_epoch), 1)
    return step < int(round(epochs * spe))


# ----------------------------------------------------------------------------- Algorithm 4.1
def reweighted_soft_ce(logits, targets, weights, mask):
    """``Σ_i m_i w_i CE(logits_i, t_i) / Σ_i m_i w_i`` with soft targets (B, K), weights (B,) and the
    padding mask (B,); with w = 1 and one-hot targets the masked mean cross-entropy."""
    ce = optax.softmax_cross_entropy(logits, targets)
    w = weights * mask.astype(logits.dtype)
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)


def adaptive_targets(stored, seen, labels, probs, rho, beta, num_classes: int):
    """Alg. 4.1's target: ``t~_new = ρ t~ + (1 − ρ) o'`` (t~ = one-hot on the first visit, ``seen``
    False) and ``t = β 1_y + (1 − β) t~_new``. Returns ``(t, t~_new)``, both (B, K)."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=probs.dtype)
    prev = jnp.where(seen[:, None], stored.astype(probs.dtype), onehot)
    new = rho * prev + (1.0 - rho) * probs
    return beta * onehot + (1.0 - beta) * new, new


def alg41_loss_on_points(ctx, params, model_state, extra, batch, x_adv, step, metrics=None,
                         updates=None):
    """Algorithm 4.1's parameter loss on given adversarial points (see the module docstring); the
    adaptive-target arrays ``target`` / ``target_seen`` of ``extra['instance']`` are updated."""
    rw = ctx.cfg.rw
    y, mask = batch["label"], batch["mask"]
    k = ctx.num_classes
    logits, state = forward_train(ctx.model, params, model_state, x_adv)
    probs = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))
    inst, idx = extra["instance"], batch["index"]
    warm = in_warmup(ctx, step, _number(rw.warmup_epochs, "rw.warmup_epochs"))
    t, t_new = adaptive_targets(inst["target"][idx], inst["target_seen"][idx], y, probs,
                                _number(rw.rho, "rw.rho", 0, 1), _number(rw.beta, "rw.beta", 0, 1), k)
    onehot = jax.nn.one_hot(y, k, dtype=logits.dtype)
    t = jnp.where(warm, onehot, t)
    p_true = jnp.sum(probs * onehot, axis=-1)
    w = p_true if rw.reweight else jnp.ones_like(p_true)
    w = jnp.where(warm, jnp.ones_like(w), w)
    lam = _number(rw.kl_lambda, "rw.kl_lambda")
    ce = optax.softmax_cross_entropy(logits, t)
    per = ce
    out_metrics = {}
    if lam > 0:
        clean_logits, state = forward_train(ctx.model, params, state, batch["image"])
        kl = kl_rows(clean_logits, logits)
        per = ce + lam * kl
        out_metrics["kl"] = masked_mean(kl, mask)
    wm = w * mask.astype(w.dtype)
    loss = jnp.sum(wm * per) / jnp.maximum(jnp.sum(wm), 1e-12)
    acc = masked_mean((jnp.argmax(logits, -1) == y).astype(jnp.float32), mask)
    upd = dict(updates or {})
    upd["target"] = t_new.astype(inst["target"].dtype)
    upd["target_seen"] = jnp.ones_like(mask)
    out_metrics.update(loss=loss, ce=masked_mean(ce, mask), adv_accuracy=acc,
                       weight=masked_mean(w, mask),
                       target_true=masked_mean(jnp.sum(t * onehot, -1), mask), **(metrics or {}))
    return loss, ObjectiveOutput(state, upd, out_metrics, per_example_ce(logits, y))


def _target_arrays(ctx, n_train):
    return {"target": jnp.zeros((n_train, ctx.num_classes), jnp.float32),
            "target_seen": jnp.zeros((n_train,), bool)}


def at_rw_loss(ctx, params, model_state, extra, batch, key, step):
    """Alg. 4.1 on PGD adversarial training (PGD points of ``objective.attack``)."""
    x_adv, eps = pgd_points(ctx, params, model_state, batch, key, step)
    return alg41_loss_on_points(ctx, params, model_state, extra, batch, x_adv, step, {"eps": eps})


def atta_rw_loss(ctx, params, model_state, extra, batch, key, step):
    """Alg. 4.1 on ATTA: the cached perturbation, ``cache_steps`` signed steps of ``atta_step``·ε
    (:func:`jaxrobust.train.fast_at.cache_attack`), the cache written back, then the Alg. 4.1 loss."""
    xa, upd, m = fast_at.cache_attack(ctx, params, model_state, extra, batch, key, step,
                                      adaptive=False)
    return alg41_loss_on_points(ctx, params, model_state, extra, batch, xa, step, m, upd)


def _at_rw_init(ctx, params, n_train, input_shape):
    return {"instance": _target_arrays(ctx, n_train)}


def _atta_rw_init(ctx, params, n_train, input_shape):
    extra = fast_at.init_cache(ctx, n_train, input_shape, with_v=False, name="atta_rw")
    extra["instance"].update(_target_arrays(ctx, n_train))
    return extra


# ----------------------------------------------------------------------------- IAT
def iat_eps_update(eps_i, robust, eps_max, gamma, beta):
    """Balaji et al.'s rule: ``ε_i ← β ε_i + (1 − β) clip(ε_i + γ ε_max (robust) or ε_i − γ ε_max
    (not robust), 0, ε_max)`` (B,)."""
    step = gamma * eps_max
    new = jnp.clip(jnp.where(robust, eps_i + step, eps_i - step), 0.0, eps_max)
    return beta * eps_i + (1.0 - beta) * new


def iat_loss(ctx, params, model_state, extra, batch, key, step):
    """IAT: PGD at the per-instance ε_i (uniform ε during the warm-up), CE of the adversarial points,
    ε_i updated from the adversarial correctness of the training forward pass."""
    c, a = ctx.cfg.iat, ctx.cfg.attack
    x, y, mask = batch["image"], batch["label"], batch["mask"]
    eps = ctx.eps_at(step)
    warm = in_warmup(ctx, step, _number(c.warmup_epochs, "iat.warmup_epochs"))
    eps_i = extra["instance"]["eps"][batch["index"]]
    eps_vec = jnp.where(warm, jnp.full_like(eps_i, eps), jnp.minimum(eps_i, eps))
    threat = ctx.threat.replace(eps=eps_vec)
    logits_fn = make_logits_fn(ctx.model, {"params": params, **model_state}, a.bn_mode,
                               stop_gradient=True)
    step_size = None
    if a.step_size > 0:
        step_size = a.step_size * (eps_vec / ctx.threat.eps if ctx.threat.eps > 0 else 1.0)
    x_adv = jax.lax.stop_gradient(attacks.pgd(logits_fn, x, y, key, threat, steps=a.steps,
                                              step_size=step_size, loss=a.loss,
                                              restarts=a.restarts, random_start=a.random_start))
    logits, new_state = forward_train(ctx.model, params, model_state, x_adv)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    loss = masked_mean(ce, mask)
    robust = jax.lax.stop_gradient(jnp.argmax(logits, -1) == y)
    new_eps = iat_eps_update(eps_i, robust, eps, _number(c.gamma, "iat.gamma"),
                             _number(c.beta, "iat.beta", 0, 1))
    new_eps = jnp.where(warm, eps_i, new_eps)
    acc = masked_mean(robust.astype(jnp.float32), mask)
    return loss, ObjectiveOutput(new_state, {"eps": new_eps},
                                 {"loss": loss, "adv_accuracy": acc, "eps": eps,
                                  "eps_instance": masked_mean(eps_vec, mask)},
                                 per_example_ce(logits, y))


def _iat_init(ctx, params, n_train, input_shape):
    f = _number(ctx.cfg.iat.init_fraction, "iat.init_fraction", 0, 1)
    return {"instance": {"eps": jnp.full((n_train,), f * float(ctx.threat.eps), jnp.float32)}}


# ----------------------------------------------------------------------------- SAT
def sat_loss(ctx, params, model_state, extra, batch, key, step):
    """Adversarial SAT: PGD points (labels), soft targets from the clean output after the warm-up,
    confidence-weighted soft cross-entropy."""
    c = ctx.cfg.sat
    y, mask = batch["label"], batch["mask"]
    k = ctx.num_classes
    x_adv, eps = pgd_points(ctx, params, model_state, batch, key, step)
    warm = in_warmup(ctx, step, _number(c.warmup_epochs, "sat.warmup_epochs"))
    clean_fn = make_logits_fn(ctx.model, {"params": params, **model_state}, "eval",
                              stop_gradient=True)
    p_clean = jax.nn.softmax(clean_fn(batch["image"]), axis=-1)
    inst, idx = extra["instance"], batch["index"]
    onehot = jax.nn.one_hot(y, k, dtype=jnp.float32)
    prev = jnp.where(inst["target_seen"][idx][:, None], inst["target"][idx], onehot)
    alpha = _number(c.momentum, "sat.momentum", 0, 1)
    t = jnp.where(warm, onehot, alpha * prev + (1.0 - alpha) * p_clean)
    t = jax.lax.stop_gradient(t)
    w = jnp.where(warm, jnp.ones((y.shape[0],), jnp.float32), jnp.max(t, axis=-1))
    logits, new_state = forward_train(ctx.model, params, model_state, x_adv)
    loss = reweighted_soft_ce(logits, t, w, mask)
    acc = masked_mean((jnp.argmax(logits, -1) == y).astype(jnp.float32), mask)
    agree = masked_mean((jnp.argmax(logits, -1) == jnp.argmax(t, -1)).astype(jnp.float32), mask)
    return loss, ObjectiveOutput(new_state, {"target": t, "target_seen": jnp.ones_like(mask)},
                                 {"loss": loss, "adv_accuracy": acc, "target_accuracy": agree,
                                  "weight": masked_mean(w, mask), "eps": eps},
                                 per_example_ce(logits, y))


register("at_rw", Objective(init=_at_rw_init, loss=at_rw_loss, validate=validate_rw))
register("atta_rw", Objective(init=_atta_rw_init, loss=atta_rw_loss, validate=validate_rw))
register("iat", Objective(init=_iat_init, loss=iat_loss, validate=validate_iat))
register("sat", Objective(init=_at_rw_init, loss=sat_loss, validate=validate_sat))

REWEIGHT_OBJECTIVES = ("at_rw", "atta_rw", "iat", "sat")

__all__ = ["REWEIGHT_OBJECTIVES", "reweighted_soft_ce", "adaptive_targets", "alg41_loss_on_points",
           "iat_eps_update", "in_warmup", "validate_rw", "validate_iat", "validate_sat"]
