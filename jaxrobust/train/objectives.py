"""Training objectives plugged into the one training loop.

An objective is a pure function

    objective(ctx, params, model_state, batch, key, step, instance_state)
        -> (loss, (new_model_state, instance_updates, metrics))

``ctx`` (an :class:`ObjectiveContext`) holds static things: the model, the threat model, the ε
schedule and the objective's config. ``batch`` carries ``image, label, index, mask``; the loss is the
masked mean over the batch. ``instance_updates`` maps instance-state names to values for this batch's
examples (the loop scatters them at ``batch['index']``). Objectives may run the model several times;
they never own a loop. New objectives register with :func:`register`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import optax

from jaxrobust import attacks
from jaxrobust.threat import ThreatModel

_OBJECTIVES: Dict[str, Callable] = {}


@dataclasses.dataclass(frozen=True)
class ObjectiveContext:
    model: Any
    threat: ThreatModel
    eps_at: Callable  # step -> ε
    cfg: Any  # the objective's ConfigDict (attack settings, ...)
    num_classes: int


def register(name):
    def deco(fn):
        _OBJECTIVES[name] = fn
        return fn
    return deco


def get_objective(name: str):
    if name not in _OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; available: {sorted(_OBJECTIVES)}.")
    return _OBJECTIVES[name]


def list_objectives():
    return sorted(_OBJECTIVES)


def masked_mean(values, mask):
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def forward_train(model, params, model_state, x):
    """Train-mode forward pass: (logits, new_model_state)."""
    variables = {"params": params, **model_state}
    if model_state:
        logits, new_state = model.apply(variables, x, train=True, mutable=list(model_state))
        return logits, dict(new_state)
    return model.apply(variables, x, train=True), model_state


def attack_logits_fn(model, params, model_state, bn_mode: str):
    """``x -> logits`` used while generating attacks during training (gradients w.r.t. params are
    stopped: the inner maximisation only needs input gradients)."""
    variables = jax.lax.stop_gradient({"params": params, **model_state})
    if bn_mode == "eval":
        return lambda x: model.apply(variables, x, train=False)
    if bn_mode == "train":
        if not model_state:
            return lambda x: model.apply(variables, x, train=True)
        return lambda x: model.apply(variables, x, train=True, mutable=list(model_state))[0]
    raise ValueError(f"Unknown attack bn_mode {bn_mode!r}; expected 'eval' or 'train'.")


def _ce_and_metrics(logits, labels, mask):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    acc = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return masked_mean(ce, mask), masked_mean(acc, mask)


@register("standard")
def standard(ctx, params, model_state, batch, key, step, instance_state):
    """Empirical risk minimisation (clean cross-entropy)."""
    logits, new_state = forward_train(ctx.model, params, model_state, batch["image"])
    loss, acc = _ce_and_metrics(logits, batch["label"], batch["mask"])
    return loss, (new_state, {}, {"loss": loss, "accuracy": acc})


@register("pgd_at")
def pgd_at(ctx, params, model_state, batch, key, step, instance_state):
    """PGD adversarial training (Madry et al. 2018; thesis §4.1 eq. 4.1): minimise the CE on PGD
    points generated on the fly with the current parameters, ε = eps_at(step)."""
    a = ctx.cfg.attack
    eps = ctx.eps_at(step)
    threat = ctx.threat.replace(eps=eps)
    logits_fn = attack_logits_fn(ctx.model, params, model_state, a.bn_mode)
    step_size = None if a.step_size <= 0 else a.step_size * (eps / ctx.threat.eps
                                                              if a.get("scale_step_with_eps", True)
                                                              else 1.0)
    x_adv = attacks.pgd(logits_fn, batch["image"], batch["label"], key, threat, steps=a.steps,
                        step_size=step_size, loss=a.loss, restarts=a.restarts,
                        random_start=a.random_start)
    x_adv = jax.lax.stop_gradient(x_adv)
    logits, new_state = forward_train(ctx.model, params, model_state, x_adv)
    loss, acc = _ce_and_metrics(logits, batch["label"], batch["mask"])
    return loss, (new_state, {}, {"loss": loss, "adv_accuracy": acc, "eps": eps})
