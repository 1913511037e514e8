"""Scalar schedules of the step, built from config: one builder for the learning rate, ε (thesis §4.2.4,
Table 4.2's ε schedulers) and any named scalar a method declares (κ and β of CROWN-IBP, λ, α, ...).

A schedule config has a ``name`` and moves a base ``value`` (lr, ε, κ...) between two fractions of it:

- ``constant``: ``value``.
- ``linear`` / ``cosine``: from ``start_fraction·value`` to ``final_fraction·value`` over ``ramp_epochs``
  (``<= 0``: the whole run after the warm-up), then held. The learning rate decays (1 → 0); ε and κ ramp
  (0 → 1).
- ``multistep`` (alias ``step``): ``value`` times ``gamma`` at each milestone (fractions of the run if
  ``<= 1``, else epochs).
- ``exponential``: ``start_fraction·value`` multiplied by ``rate`` every epoch (smoothly), until it
  reaches ``final_fraction·value`` (a cap when growing, a floor when decaying): exponential ε growth.
- ``cyclic``: one cycle, linear up to ``value`` at ``peak_fraction`` of the run then down (fast AT).
- ``periodic``: cosine restarts every ``period_epochs`` (SGDR-style). The periodic adversarial
  scheduling of §4.2.4 restarts *any* of these schedules per period, scaled to unequal periods
  (``config.pas``, jaxrobust/train/pas.py).

Every schedule takes an optional linear warm-up from 0 over ``warmup_epochs``. Schedules are optax
schedules: pure, jit-able functions of a (possibly traced) step.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "linear", "cosine", "multistep", "step", "exponential", "cyclic", "periodic")


def _steps(epochs: float, steps_per_epoch: int) -> int:
    return int(round(float(epochs) * steps_per_epoch))


def make_scalar_schedule(cfg, value: float, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """The schedule ``cfg`` (fields above) of base value ``value`` for a run of ``total_steps``."""
    name = cfg.name
    value = float(value)
    warm = max(_steps(cfg.warmup_epochs, steps_per_epoch), 0)
    rest = max(total_steps - warm, 1)
    ramp = _steps(cfg.ramp_epochs, steps_per_epoch)
    ramp = ramp if ramp > 0 else rest
    s, f = float(cfg.start_fraction), float(cfg.final_fraction)
    if name == "constant":
        main = optax.constant_schedule(value)
    elif name == "linear":
        main = optax.linear_schedule(s * value, f * value, ramp)
    elif name == "cosine":
        def main(step, _a=s, _b=f, _t=ramp):
            c = 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(step, _t) / _t))
            return value * ((_a - _b) * c + _b)  # = optax.cosine_decay_schedule for (s, f) = (1, α)
    elif name in ("multistep", "step"):
        bounds = {}
        for m in cfg.milestones:
            at = int(round(m * total_steps)) if m <= 1.0 else _steps(m, steps_per_epoch)
            bounds[max(at - warm, 1)] = cfg.gamma
        main = optax.piecewise_constant_schedule(value, bounds)
    elif name == "exponential":
        if cfg.rate <= 0:
            raise ValueError(f"exponential schedule needs rate > 0, got {cfg.rate}.")
        main = optax.exponential_decay(s * value, max(steps_per_epoch, 1), float(cfg.rate),
                                       end_value=f * value)
    elif name == "cyclic":
        main = optax.linear_onecycle_schedule(rest, value, pct_start=cfg.peak_fraction, pct_final=1.0,
                                              div_factor=1e4, final_div_factor=1e4)
    elif name == "periodic":
        period = max(_steps(cfg.period_epochs, steps_per_epoch), 1)

        def main(step, _a=s, _b=f, _t=period):
            c = 0.5 * (1 + jnp.cos(jnp.pi * jnp.mod(step, _t) / _t))
            return value * ((_a - _b) * c + _b)
    else:
        raise ValueError(f"Unknown schedule {name!r}; expected one of {SCHEDULES}.")
    if warm <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, value * (s if name in (
        "linear", "cosine", "exponential", "periodic") else 1.0), warm), main], [warm])
