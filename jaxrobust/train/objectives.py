"""Training objectives plugged into the one training loop.

An objective is an :class:`Objective`, a group of pure functions in the optax ``(init, update)`` style:

- ``init(ctx, params, n_train, input_shape) -> extra``: the objective's extra state, a pytree. By
  convention ``extra['instance']`` is a dict of per-instance arrays of leading size ``n_train`` (the
  number of dataset indices of the training split: its size, or more when a validation split was
  carved out of it, since examples keep their original indices)
  (cached perturbations, per-example ε, difficulty statistics...), indexed by each example's dataset
  index; the loop shards them over the mesh's ``'data'`` axis (they are never replicated) and
  checkpoints them. Other leaves (EMA/teacher weights, ensembles, masks) are replicated.
- ``loss(ctx, params, model_state, extra, batch, key, step) -> (loss, ObjectiveOutput)``: ``batch``
  carries ``image, label, index, mask`` and the augmentation it went through (``crop_offset`` (B, 2),
  ``flip`` (B,); identity offsets ``(pad, pad)`` without augmentation, see
  :func:`jaxrobust.data.augment.invert_crop_flip`); the loss is the masked mean over the batch.
  ``ObjectiveOutput.instance_updates`` maps names of ``extra['instance']`` to values for this batch's
  examples (the loop scatters them at ``batch['index']``, dropping padded rows).
- ``after_update(ctx, params, extra, step) -> extra`` (optional): runs after the optimizer step, inside
  the same jit, with the new parameters (EMA weights, checkpoint ensembles, mask refresh).
- ``param_labels(params) -> pytree of str`` (optional): optimizer groups (``'frozen'``, ``'scores'``...),
  see :mod:`jaxrobust.train.optim`.
- ``schedules``: names of the scalar schedules the objective reads from ``ctx.schedules`` (besides
  ``'eps'``); each must be configured under ``objective.schedules.<name>``.
- ``validate(objective_config)`` (optional): raises a ValueError on bad settings, before the run
  writes anything.
- ``init_params(ctx, params, key, input_shape) -> params`` (optional): re-initialises the fresh
  parameters when the train state is created (e.g. Shi et al. 2021's IBP initialisation of certified
  training); a resumed run restores its checkpoint instead.
- ``replays`` (default 1): optimizer updates per batch; with m > 1 the loop runs loss → optimizer
  update → instance scatter → after_update m times on the same batch (``batch['replay'] = r``), each
  from the state the previous one left (Free adversarial training).

Any objective gets an exponential moving average of its weights in ``extra['ema']`` when
``objective.ema_decay > 0`` (the loop wraps it with :func:`with_ema`).

``ctx`` (an :class:`ObjectiveContext`) holds static things: the model, the threat model, the schedules
(``ctx.schedules['eps'](step)`` is ε) and the objective's config. Objectives may run the model several
times; they never own a loop. New objectives register with :func:`register`, which also accepts a bare
loss function ``fn(ctx, params, model_state, extra, batch, key, step)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from jaxrobust import attacks
from jaxrobust.models import forward_train, make_logits_fn
from jaxrobust.threat import ThreatModel

_OBJECTIVES: Dict[str, "Objective"] = {}


class ObjectiveOutput(NamedTuple):
    """What an objective's loss returns besides the loss value."""
    model_state: Any
    instance_updates: Dict[str, jax.Array] = {}
    metrics: Dict[str, jax.Array] = {}


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training method: see the module docstring."""
    init: Optional[Callable]
    loss: Callable
    after_update: Optional[Callable] = None
    param_labels: Optional[Callable] = None
    schedules: Tuple[str, ...] = ()
    validate: Optional[Callable] = None  # (objective config) -> None; raises ValueError on bad values
    # optimizer updates per batch (Free AT's m), or a function of the objective config giving it;
    # batch['replay'] = r when > 1
    replays: Any = 1
    init_params: Optional[Callable] = None  # (ctx, params, key, input_shape) -> params

    def init_extra(self, ctx, params, n_train: int, input_shape) -> Any:
        return {} if self.init is None else self.init(ctx, params, n_train, tuple(input_shape))


@dataclasses.dataclass(frozen=True)
class ObjectiveContext:
    model: Any
    threat: ThreatModel  # the run's threat model at the configured ε (box = the data's pixel range)
    schedules: Dict[str, Callable]  # name -> (step -> value); always has 'eps'
    cfg: Any  # the objective's ConfigDict (attack settings, ...)
    num_classes: int
    n_train: int = 0  # training-set size (rows of extra['instance'] beyond it are padding)
    steps_per_epoch: int = 0  # optimizer steps per epoch (n_train // batch size)

    def eps_at(self, step):
        return self.schedules["eps"](step)


def _as_objective(obj) -> Objective:
    if isinstance(obj, Objective):
        return obj
    if callable(obj):
        return Objective(init=None, loss=obj)
    raise TypeError(f"register expects an Objective or a loss function, got {type(obj).__name__}.")


def register(name: str, objective: Optional[Objective] = None):
    """Registers an objective under ``name``: ``register('x', Objective(...))``, or as a decorator on
    an Objective-returning factory's result or on a bare loss function::

        @register("my_method")
        def my_method(ctx, params, model_state, extra, batch, key, step):
            logits, new_state = forward_train(ctx.model, params, model_state, batch["image"])
            ...
            return loss, ObjectiveOutput(new_state, {}, {"loss": loss})
    """
    if objective is not None:
        _OBJECTIVES[name] = _as_objective(objective)
        return _OBJECTIVES[name]

    def deco(obj):
        _OBJECTIVES[name] = _as_objective(obj)
        return obj
    return deco


def get_objective(name: str) -> Objective:
    if name not in _OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; available: {sorted(_OBJECTIVES)}.")
    return _OBJECTIVES[name]


def list_objectives():
    return sorted(_OBJECTIVES)


def masked_mean(values, mask):
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def ce_and_accuracy(logits, labels, mask):
    """Masked mean cross-entropy and accuracy of a batch."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    acc = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return masked_mean(ce, mask), masked_mean(acc, mask)


def standard_loss(ctx, params, model_state, extra, batch, key, step):
    """Empirical risk minimisation (clean cross-entropy)."""
    logits, new_state = forward_train(ctx.model, params, model_state, batch["image"])
    loss, acc = ce_and_accuracy(logits, batch["label"], batch["mask"])
    return loss, ObjectiveOutput(new_state, {}, {"loss": loss, "accuracy": acc})


def pgd_points(ctx, params, model_state, batch, key, step):
    """PGD points of the batch under the objective's ``attack`` config at ε = ctx.eps_at(step)
    (gradients to the parameters stopped). Returns ``(x_adv, eps)``."""
    a = ctx.cfg.attack
    eps = ctx.eps_at(step)
    threat = ctx.threat.replace(eps=eps)
    logits_fn = make_logits_fn(ctx.model, {"params": params, **model_state}, a.bn_mode,
                               stop_gradient=True)
    step_size = None
    if a.step_size > 0:
        step_size = a.step_size * (eps / ctx.threat.eps if a.scale_step_with_eps else 1.0)
    x_adv = attacks.pgd(logits_fn, batch["image"], batch["label"], key, threat, steps=a.steps,
                        step_size=step_size, loss=a.loss, restarts=a.restarts,
                        random_start=a.random_start)
    return jax.lax.stop_gradient(x_adv), eps


def pgd_at_loss(ctx, params, model_state, extra, batch, key, step):
    """PGD adversarial training (Madry et al. 2018; thesis §4.1 eq. 4.1): minimise the CE on PGD
    points generated on the fly with the current parameters, ε = ctx.eps_at(step)."""
    x_adv, eps = pgd_points(ctx, params, model_state, batch, key, step)
    logits, new_state = forward_train(ctx.model, params, model_state, x_adv)
    loss, acc = ce_and_accuracy(logits, batch["label"], batch["mask"])
    return loss, ObjectiveOutput(new_state, {}, {"loss": loss, "adv_accuracy": acc, "eps": eps})


# ----------------------------------------------------------------------------- EMA of the weights
def _split_inner(inner):
    """Wrapped layout: the inner objective's ``instance`` dict stays at the top (the loop shards and
    scatters it there), the rest of its extra goes under ``'base'``."""
    if isinstance(inner, dict):
        out = {"instance": inner["instance"]} if "instance" in inner else {}
        rest = {k: v for k, v in inner.items() if k != "instance"}
        if rest:
            out["base"] = rest
        return out
    return {"base": inner}


def _join_inner(extra):
    base = extra.get("base", {})
    if not isinstance(base, dict):
        return base
    return {**base, **({"instance": extra["instance"]} if "instance" in extra else {})}


def _check_decay(decay):
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay (objective.ema_decay) must be a number in [0, 1), got {decay!r}.")
    return float(decay)


def with_ema(objective: Objective, decay: Optional[float] = None) -> Objective:
    """``objective`` plus an exponential moving average of the weights, updated after every optimizer
    step (an ``after_update`` hook, inside the jitted step): ``ema_0 = w_0``,
    ``ema_t = decay·ema_{t−1} + (1 − decay)·w_t``. The EMA is ``extra['ema']`` (evaluate it with
    ``load_trained(workdir, weights='ema')``); the wrapped objective's extra is kept under
    ``extra['base']`` except its per-instance arrays, which stay in ``extra['instance']``.

    ``decay=None`` reads ``objective.ema_decay`` from the run's config, where 0 turns the EMA off (the
    objective is then unchanged, extra included)."""
    if not isinstance(objective, Objective):
        raise TypeError(f"with_ema expects an Objective, got {type(objective).__name__}.")
    if decay is not None:
        _check_decay(decay)

    def decay_of(ctx):
        return _check_decay(ctx.cfg.ema_decay if decay is None else decay)

    def init(ctx, params, n_train, input_shape):
        inner = objective.init_extra(ctx, params, n_train, input_shape)
        if decay_of(ctx) == 0.0:
            return inner
        return {**_split_inner(inner), "ema": jax.tree.map(jnp.asarray, params)}

    def loss(ctx, params, model_state, extra, batch, key, step):
        if decay_of(ctx) > 0.0:
            extra = _join_inner(extra)
        return objective.loss(ctx, params, model_state, extra, batch, key, step)

    def after_update(ctx, params, extra, step):
        d = decay_of(ctx)
        if d == 0.0:
            return extra if objective.after_update is None else \
                objective.after_update(ctx, params, extra, step)
        ema = extra["ema"]
        inner = _join_inner(extra)
        if objective.after_update is not None:
            inner = objective.after_update(ctx, params, inner, step)
        ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
        return {**_split_inner(inner), "ema": ema}

    return Objective(init=init, loss=loss, after_update=after_update,
                     param_labels=objective.param_labels, schedules=objective.schedules,
                     validate=objective.validate, replays=objective.replays,
                     init_params=objective.init_params)


register("standard", Objective(init=None, loss=standard_loss))
register("pgd_at", Objective(init=None, loss=pgd_at_loss))


__all__ = ["Objective", "ObjectiveOutput", "ObjectiveContext", "register", "get_objective",
           "list_objectives", "masked_mean", "ce_and_accuracy", "pgd_points", "forward_train",
           "make_logits_fn", "with_ema"]
