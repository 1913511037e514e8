"""Adversarial-budget (ε) schedules as functions of the step (thesis §4.2.4, Table 4.2).

'constant'; 'linear' and 'cosine' ramps from 0 to ε over ``ramp_epochs`` (then constant), as in
§4.2.4's schedulers that start adversarial training with a small budget to ease optimisation.
Jit-able: ``eps_at(step)`` works on traced steps.
"""
from __future__ import annotations

import jax.numpy as jnp

EPS_SCHEDULES = ("constant", "linear", "cosine")


def make_eps_schedule(cfg, eps: float, steps_per_epoch: int):
    name = cfg.get("name", "constant")
    ramp = max(int(round(cfg.get("ramp_epochs", 0.0) * steps_per_epoch)), 1)
    start = cfg.get("start_fraction", 0.0)
    if name == "constant":
        return lambda step: jnp.asarray(eps, jnp.float32)
    if name == "linear":
        return lambda step: eps * jnp.clip(start + (1 - start) * step / ramp, 0.0, 1.0)
    if name == "cosine":
        return lambda step: eps * (start + (1 - start) * 0.5 * (
            1 - jnp.cos(jnp.pi * jnp.clip(step / ramp, 0.0, 1.0))))
    raise ValueError(f"Unknown eps schedule {name!r}; expected one of {EPS_SCHEDULES}.")
