"""Periodic adversarial scheduling (PAS), thesis §4.2.4 (Figs 4.11-4.13, Table 4.2's "periodic" rows).

Training is split into P periods ending at ``pas.periods`` (epochs, or fractions of the run when every
value is <= 1; the last period ends with the run). At the start of every period the schedules named in
``pas.restart`` (the learning rate ``'lr'``, the adversarial budget ``'eps'``, or an objective's named
schedule) restart: in period p = [s_p, e_p) the value at step t is the configured schedule *built for a
run of e_p − s_p steps* evaluated at t − s_p, its epoch-valued settings (warm-up, ramp, milestones in
epochs, cycle period) scaled by (e_p − s_p) / T (T = the run's length), so each period replays the
whole-run schedule "scaled proportionally" as §4.2.4 says. With eq. 4.29's ε_cos / ε_lin over D = the
run, each period ramps ε from ε_min again and reaches ε_target at the same fraction of the period.

The variables (parameters and BatchNorm statistics) at each period end e_p are checkpointed in
``RUN/pas/checkpoints/<e_p>`` by a training callback (:class:`PeriodCheckpoints`; all of them kept),
and the model of a PAS run is the ensemble of the P period-end models (Fig 4.11c), its prediction the
averaged softmax: ``logits(x) = log((1/P) Σ_p softmax(f(θ_p, x)))`` (:func:`ensemble_logits_fn`).
These are log-probabilities, so CE / DLR attacks on them attack the averaged softmax, as the thesis's
ensemble evaluation does; ``jaxrobust.train.load_trained(workdir, weights='pas_ensemble')`` returns
it as the run's ``logits_fn`` (``experiments.evaluate --config.weights=pas_ensemble``). PAS adds no
training cost: one extra save of the variables per period.

Everything runs on the platform: the restarted schedules are ordinary pure ``step -> value`` functions
the one loop reads (``ctx.schedules``, the optimizer's learning rate), and the period-end checkpoints
are a callback of :func:`jaxrobust.train.train` (so a killed run resumes and keeps its period ends).
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxrobust.train.checkpoint import Checkpointer
from jaxrobust.train.schedules import make_scalar_schedule

PAS_DIR = "pas"  # RUN/pas/checkpoints/<step>: the variables at each period end
BUILTIN_RESTARTS = ("lr", "eps")


# ----------------------------------------------------------------------------- periods
def enabled(config) -> bool:
    """Whether ``config`` (a training config with defaults) uses PAS."""
    return "pas" in config and len(tuple(config.pas.periods)) > 0


def period_ends(periods: Sequence[float], total_steps: int, steps_per_epoch: int) -> Tuple[int, ...]:
    """The step at which each period ends (strictly increasing, the last = ``total_steps``).

    ``periods``: period ends in epochs, or fractions of the run when every value is <= 1. Raises a
    ValueError on an empty, non-increasing or non-positive list, a last period that does not end with
    the run, or a period shorter than one step."""
    periods = tuple(periods)
    if not periods:
        raise ValueError("pas.periods is empty: give the ends of the periods, e.g. (100, 150, 200) "
                         "epochs or (0.5, 0.75, 1.0) of the run.")
    for p in periods:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"pas.periods must be positive numbers (epochs, or fractions <= 1), got "
                             f"{periods!r}.")
    fractions = all(p <= 1.0 for p in periods)
    if fractions:
        ends = tuple(int(round(p * total_steps)) for p in periods)
        last_ok = periods[-1] == 1.0
        run = "1.0 (fractions of the run)"
    else:
        ends = tuple(int(round(p * steps_per_epoch)) for p in periods)
        last_ok = ends[-1] == total_steps
        run = f"{total_steps / max(steps_per_epoch, 1):g} epochs (train.num_epochs / num_steps)"
    if not last_ok:
        raise ValueError(f"pas.periods={periods!r}: the last period must end with the run, at {run}.")
    starts = (0,) + ends[:-1]
    if any(e <= s for s, e in zip(starts, ends)):
        raise ValueError(f"pas.periods={periods!r} gives periods ending at steps {ends} of a "
                         f"{total_steps}-step run: each period must be at least one step, increasing.")
    return ends


def validate(config, total_steps: int, steps_per_epoch: int) -> Optional[Tuple[int, ...]]:
    """Checks ``config.pas`` (before a run writes anything); returns the period ends (steps) or None
    when PAS is off."""
    if not enabled(config):
        return None
    ends = period_ends(config.pas.periods, total_steps, steps_per_epoch)
    valid = BUILTIN_RESTARTS + tuple(config.objective.schedules.keys())
    restart = tuple(config.pas.restart)
    bad = [r for r in restart if r not in valid]
    if bad or isinstance(config.pas.restart, str):
        raise ValueError(f"pas.restart={config.pas.restart!r} names unknown schedules {bad or restart}; "
                         f"valid: {list(valid)} ('lr', 'eps' and this objective's named schedules).")
    return ends


# ----------------------------------------------------------------------------- restarted schedules
def scale_schedule_config(cfg, factor: float) -> ml_collections.ConfigDict:
    """``cfg`` for a run ``factor`` times as long (0 < factor <= 1): its epoch-valued settings
    (warm-up, ramp, milestones given in epochs, cycle period) multiplied by ``factor``, its
    exponential per-epoch rate raised to 1/factor; fractions of the run are unchanged."""
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}.")
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.warmup_epochs = float(c.warmup_epochs) * factor
    if c.ramp_epochs > 0:
        c.ramp_epochs = float(c.ramp_epochs) * factor
    c.milestones = tuple(m if m <= 1.0 else m * factor for m in c.milestones)
    c.period_epochs = float(c.period_epochs) * factor
    if c.rate > 0:
        c.rate = float(c.rate) ** (1.0 / factor)
    return c


def restarted_schedule(cfg, value: float, ends: Sequence[int], total_steps: int,
                       steps_per_epoch: int) -> Callable:
    """The schedule ``cfg`` of base ``value`` restarted at every period start (module docstring):
    in period p = [s_p, e_p), ``make_scalar_schedule(scaled cfg, value, e_p − s_p)(t − s_p)``. Pure and
    jit-able in a traced step; steps past the last end stay in the last period."""
    ends = tuple(int(e) for e in ends)
    starts = (0,) + ends[:-1]
    pieces = [make_scalar_schedule(scale_schedule_config(cfg, (e - s) / total_steps), value, e - s,
                                   steps_per_epoch) for s, e in zip(starts, ends)]

    def schedule(step):
        step = jnp.asarray(step)
        period = sum((step >= s).astype(jnp.int32) for s in starts[1:]) if len(starts) > 1 else 0
        values = jnp.stack([jnp.asarray(f(jnp.maximum(step - s, 0)), jnp.float32)
                            for f, s in zip(pieces, starts)])
        return values[period]

    return schedule


def schedule_for(config, name: str, cfg, value: float, total_steps: int, steps_per_epoch: int) -> Callable:
    """The run's schedule ``name`` ('lr', 'eps' or a named objective schedule) of ``cfg``: restarted per
    period when PAS is on and ``name`` is in ``pas.restart``, else ``make_scalar_schedule``.
    ``total_steps`` / ``steps_per_epoch`` are counted in the schedule's own unit (optimizer updates for
    'lr' when an objective makes several per step)."""
    if enabled(config) and name in tuple(config.pas.restart):
        ends = period_ends(config.pas.periods, total_steps, steps_per_epoch)
        return restarted_schedule(cfg, value, ends, total_steps, steps_per_epoch)
    return make_scalar_schedule(cfg, value, total_steps, steps_per_epoch)


# ----------------------------------------------------------------------------- period-end checkpoints
def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, PAS_DIR)


class PeriodCheckpoints:
    """Training callback ``(step, state) -> False``: saves ``state.variables()`` (parameters and
    BatchNorm statistics) at every period end, once (a resumed run that replays a period end it already
    saved leaves the saved one: it is bit-identical). All period ends are kept."""

    def __init__(self, workdir: str, ends: Sequence[int]):
        self.ends = tuple(int(e) for e in ends)
        self.ckpt = Checkpointer(checkpoint_dir(workdir), keep=None)

    def __call__(self, step: int, state) -> bool:
        if int(step) in self.ends and int(step) not in self.ckpt.manager.all_steps():
            self.ckpt.save(int(step), state.variables())
            self.ckpt.wait()  # on disk before the run's own checkpoint of this step
        return False

    def close(self):
        self.ckpt.close()


def callbacks(config, workdir: str, setup) -> list:
    """The PAS callbacks of a run (``[]`` when PAS is off); ``setup`` is its ``RunSetup``."""
    ends = validate(config, setup.total_steps, setup.steps_per_epoch)
    return [] if ends is None else [PeriodCheckpoints(workdir, ends)]


def saved_period_ends(workdir: str) -> Tuple[int, ...]:
    """The period ends (steps) checkpointed in ``workdir`` so far."""
    d = os.path.join(checkpoint_dir(workdir), "checkpoints")
    if not os.path.isdir(d):
        return ()
    ckpt = Checkpointer(checkpoint_dir(workdir), keep=None)
    steps = tuple(sorted(int(s) for s in ckpt.manager.all_steps()))
    ckpt.close()
    return steps


def load_members(workdir: str, template, ends: Sequence[int]) -> Dict[int, Any]:
    """``{period end step: variables}`` restored from ``RUN/pas`` with the structure of ``template``
    (a variables dict). Raises a ValueError naming the missing period ends when the run has not
    reached them (train it to the end first)."""
    saved = saved_period_ends(workdir)
    missing = [e for e in ends if e not in saved]
    if missing:
        raise ValueError(f"the PAS ensemble of {workdir} needs the period-end checkpoints at steps "
                         f"{list(ends)}; {missing} are missing from {checkpoint_dir(workdir)} (saved: "
                         f"{list(saved)}): finish the training run first.")
    ckpt = Checkpointer(checkpoint_dir(workdir), keep=None)
    try:
        return {int(e): ckpt.restore(template, int(e)) for e in ends}
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- the ensemble
def ensemble_log_probs(apply_fn: Callable, members: Sequence[Any], x):
    """``log((1/P) Σ_p softmax(apply_fn(members[p], x)))``, (B, K), by a log-sum-exp of the members'
    log-softmax (stable where a member is very confident). One member: its log-softmax (its logits
    shifted per row: the same softmax, predictions, CE and DLR)."""
    if not len(members):
        raise ValueError("an ensemble needs at least one member.")
    logp = jnp.stack([jax.nn.log_softmax(apply_fn(v, x), axis=-1) for v in members])
    return jax.scipy.special.logsumexp(logp, axis=0) - jnp.log(float(len(members)))


def ensemble_logits_fn(model, members: Sequence[Any]) -> Callable:
    """An eval-mode ``logits_fn`` (jitted) of the averaged-softmax ensemble of ``members`` (variables
    dicts of ``model``): what attacks, evaluation and the thesis's Table 4.2 PAS rows use."""
    members = tuple(members)
    apply_fn = lambda v, x: model.apply(v, x, train=False)
    return jax.jit(lambda x: ensemble_log_probs(apply_fn, members, x))


__all__ = ["enabled", "period_ends", "validate", "scale_schedule_config", "restarted_schedule",
           "schedule_for", "PeriodCheckpoints", "callbacks", "saved_period_ends", "load_members",
           "ensemble_log_probs", "ensemble_logits_fn", "PAS_DIR"]
