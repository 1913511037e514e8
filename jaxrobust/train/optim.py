"""Optimizers and learning-rate schedules (optax), built from config.

Optimizers: 'sgd' (momentum, nesterov), 'adam', 'adamw'. Weight decay is added to the gradient (L2,
as in the thesis's PyTorch code) and can skip biases and BatchNorm parameters (every parameter with
ndim <= 1). Schedules: 'constant', 'multistep', 'cosine', 'cyclic' (one-cycle: linear up then down,
as in fast AT), 'linear'; all with optional linear warm-up. Gradient clipping by global norm.
"""
from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "multistep", "cosine", "cyclic", "linear")


def make_schedule(cfg, lr: float, total_steps: int, steps_per_epoch: int):
    name = cfg.name
    warm = int(round(cfg.get("warmup_epochs", 0.0) * steps_per_epoch))
    rest = max(total_steps - warm, 1)
    if name == "constant":
        main = optax.constant_schedule(lr)
    elif name == "multistep":
        # milestones given as fractions of training (0.5, 0.75) or absolute epochs (> 1).
        bounds = {}
        for m in cfg.milestones:
            s = int(round(m * total_steps)) if m <= 1.0 else int(round(m * steps_per_epoch))
            bounds[max(s - warm, 1)] = cfg.gamma
        main = optax.piecewise_constant_schedule(lr, bounds)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(lr, rest, alpha=cfg.get("final_fraction", 0.0))
    elif name == "cyclic":
        peak = cfg.get("peak_fraction", 0.4)
        main = optax.linear_onecycle_schedule(rest, lr, pct_start=peak, pct_final=1.0,
                                              div_factor=1e4, final_div_factor=1e4)
    elif name == "linear":
        main = optax.linear_schedule(lr, lr * cfg.get("final_fraction", 0.0), rest)
    else:
        raise ValueError(f"Unknown lr schedule {name!r}; expected one of {SCHEDULES}.")
    if warm <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def weight_decay_mask(params, skip_bn_and_bias: bool):
    return jax.tree.map(lambda p: (p.ndim > 1) if skip_bn_and_bias else True, params)


def make_optimizer(opt_cfg, sched_cfg, total_steps: int, steps_per_epoch: int):
    """Returns (optax transformation, lr schedule)."""
    lr = make_schedule(sched_cfg, opt_cfg.lr, total_steps, steps_per_epoch)
    parts = []
    if opt_cfg.get("clip_norm", 0.0) > 0:
        parts.append(optax.clip_by_global_norm(opt_cfg.clip_norm))
    wd = opt_cfg.get("weight_decay", 0.0)
    mask = lambda p: weight_decay_mask(p, opt_cfg.get("wd_skip_bn_bias", True))
    if opt_cfg.name == "sgd":
        if wd > 0:
            parts.append(optax.add_decayed_weights(wd, mask))
        parts.append(optax.sgd(lr, momentum=opt_cfg.get("momentum", 0.9) or None,
                               nesterov=opt_cfg.get("nesterov", False)))
    elif opt_cfg.name == "adam":
        if wd > 0:
            parts.append(optax.add_decayed_weights(wd, mask))
        parts.append(optax.adam(lr, b1=opt_cfg.get("b1", 0.9), b2=opt_cfg.get("b2", 0.999)))
    elif opt_cfg.name == "adamw":
        parts.append(optax.adamw(lr, b1=opt_cfg.get("b1", 0.9), b2=opt_cfg.get("b2", 0.999),
                                 weight_decay=wd, mask=mask))
    else:
        raise ValueError(f"Unknown optimizer {opt_cfg.name!r}; expected one of {OPTIMIZERS}.")
    return optax.chain(*parts), lr
