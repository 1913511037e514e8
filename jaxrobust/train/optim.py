"""Optimizers with parameter groups, built from config (optax).

Optimizers: 'sgd' (momentum, nesterov), 'adam', 'adamw'. Weight decay is added to the gradient (L2,
as in the thesis's PyTorch code; decoupled for 'adamw') and can skip biases and BatchNorm parameters
(every parameter with ndim <= 1). The learning rate follows one of the scalar schedules of
:mod:`jaxrobust.train.schedules`.

Parameter groups (``optimizer.param_groups``): each parameter gets a label, first from the objective's
``param_labels(params)`` (e.g. pruning's trainable 'scores'), then from the config's regular expressions
over its path (``'Dense_0/kernel'``; the last matching group wins). Each label has its own learning-rate
scale and weight decay through ``optax.multi_transform``. The label ``'frozen'`` (or a group with
``freeze=True``) is ``optax.set_to_zero()``: never updated, never decayed, and left out of the global
norm used for gradient clipping.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import jax
import optax

from jaxrobust.train.schedules import make_scalar_schedule

OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_LABEL = "default"
FROZEN = "frozen"


def make_schedule(cfg, lr: float, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """The learning-rate schedule (kept for callers of the old name)."""
    return make_scalar_schedule(cfg, lr, total_steps, steps_per_epoch)


def param_path(path) -> str:
    """'Dense_0/kernel' for a pytree path of dict keys."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def weight_decay_mask(params, skip_bn_and_bias: bool):
    return jax.tree.map(lambda p: (p.ndim > 1) if skip_bn_and_bias else True, params)


def param_labels(params, groups=None, objective_labels: Optional[Callable] = None):
    """Pytree of labels (str) for ``params``: the objective's labels, then config regex groups."""
    labels = objective_labels(params) if objective_labels is not None else \
        jax.tree.map(lambda _: DEFAULT_LABEL, params)
    if jax.tree.structure(labels) != jax.tree.structure(params):
        raise ValueError("param_labels(params) must return a pytree with the structure of params.")
    patterns = [(name, re.compile(g.pattern)) for name, g in (groups or {}).items() if g.pattern]

    def relabel(path, label):
        p = param_path(path)
        for name, rx in patterns:
            if rx.search(p):
                label = name
        return label

    return jax.tree_util.tree_map_with_path(relabel, labels)


def _group_is_frozen(label: str, groups) -> bool:
    return label == FROZEN or bool(groups is not None and label in groups and groups[label].freeze)


def _base_optimizer(opt_cfg, lr, weight_decay: float) -> optax.GradientTransformation:
    mask = lambda p: weight_decay_mask(p, opt_cfg.wd_skip_bn_bias)
    parts = []
    if opt_cfg.name == "sgd":
        if weight_decay > 0:
            parts.append(optax.add_decayed_weights(weight_decay, mask))
        parts.append(optax.sgd(lr, momentum=opt_cfg.momentum or None, nesterov=opt_cfg.nesterov))
    elif opt_cfg.name == "adam":
        if weight_decay > 0:
            parts.append(optax.add_decayed_weights(weight_decay, mask))
        parts.append(optax.adam(lr, b1=opt_cfg.b1, b2=opt_cfg.b2))
    elif opt_cfg.name == "adamw":
        parts.append(optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=weight_decay,
                                 mask=mask))
    else:
        raise ValueError(f"Unknown optimizer {opt_cfg.name!r}; expected one of {OPTIMIZERS}.")
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def make_optimizer(opt_cfg, sched_cfg, total_steps: int, steps_per_epoch: int, params=None,
                   objective_labels: Optional[Callable] = None,
                   lr_schedule: Optional[Callable] = None):
    """Returns ``(optax transformation, lr schedule)``.

    ``lr_schedule``: a ready learning-rate schedule (step -> lr) used instead of building one from
    ``sched_cfg`` (periodic adversarial scheduling restarts it per period, jaxrobust/train/pas.py).

    With ``params`` (a pytree or its shapes), parameters are grouped as described in the module
    docstring; without, every parameter is in the default group.
    """
    lr = lr_schedule if lr_schedule is not None else \
        make_schedule(sched_cfg, opt_cfg.lr, total_steps, steps_per_epoch)
    groups = opt_cfg.param_groups
    for name, g in groups.items():
        if g.pattern:
            try:
                re.compile(g.pattern)
            except re.error as e:
                raise ValueError(f"optimizer.param_groups.{name}.pattern {g.pattern!r} is not a valid "
                                 f"regular expression: {e}") from None
        if g.lr_scale < 0:
            raise ValueError(f"optimizer.param_groups.{name}.lr_scale must be >= 0, got {g.lr_scale}.")
    if params is None:
        labels_fn = lambda p: jax.tree.map(lambda _: DEFAULT_LABEL, p)
    else:
        labels = param_labels(params, groups, objective_labels)
        labels_fn = lambda p: labels
        used = set(jax.tree.leaves(labels))
        unknown = [n for n in groups if n not in used and n != FROZEN]
        if unknown:
            example = param_path(jax.tree_util.tree_flatten_with_path(params)[0][0][0])
            raise ValueError(f"optimizer.param_groups {unknown} match no parameter (parameter paths "
                             f"look like {example!r}).")

    label_names = set(groups) | {DEFAULT_LABEL, FROZEN}
    if params is not None:
        label_names |= set(jax.tree.leaves(labels_fn(params)))
    transforms = {}
    for name in sorted(label_names):
        if _group_is_frozen(name, groups):
            transforms[name] = optax.set_to_zero()
            continue
        g = groups[name] if name in groups else None
        scale = g.lr_scale if g is not None else 1.0
        wd = g.weight_decay if g is not None and g.weight_decay >= 0 else opt_cfg.weight_decay
        group_lr = lr if scale == 1.0 else (lambda s, _lr=lr, _k=scale: _k * _lr(s))
        transforms[name] = _base_optimizer(opt_cfg, group_lr, wd)

    parts = []
    if opt_cfg.clip_norm > 0:
        def frozen_mask(p):
            return jax.tree.map(lambda l: _group_is_frozen(l, groups), labels_fn(p))
        # Frozen gradients are zeroed first so they do not count in the global norm.
        parts += [optax.masked(optax.set_to_zero(), frozen_mask), optax.clip_by_global_norm(opt_cfg.clip_norm)]
    parts.append(optax.multi_transform(transforms, labels_fn))
    return optax.chain(*parts), lr


__all__ = ["make_optimizer", "make_schedule", "param_labels", "param_path", "weight_decay_mask",
           "OPTIMIZERS", "FROZEN", "DEFAULT_LABEL"]
