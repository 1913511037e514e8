"""The one training loop of jaxrobust.

``train(config, workdir)`` runs any registered :class:`~jaxrobust.train.objectives.Objective` (standard
ERM, PGD-AT, and what later issues add) with:
- one ``jax.jit`` update step over a ``('data',)`` mesh of all devices: the batch sharded with
  ``NamedSharding(mesh, P('data'))``, the state replicated except the objective's per-instance arrays
  (``extra['instance']``, sharded over ``'data'``), donated (multi-host through
  ``jax.distributed.initialize()`` when ``config.distributed``; each process reads its own slice);
- the objective's ``after_update`` inside the same jit, optimizer parameter groups from its
  ``param_labels`` and the config, and named scalar schedules (``ctx.schedules``);
- per-step PRNG keys ``fold_in(key, step)`` and data order from ``(seed, epoch)``, so restoring a
  checkpoint resumes bit-exactly (tested: killed-and-resumed == uninterrupted);
- periodic clean + PGD evaluation on val/test with masked, padded batches (every example once);
- orbax checkpoints (atomic), ``metrics.jsonl``, TensorBoard, ``config.json``, ``summary.json``,
  progress with rate and ETA; the update step compiles once per run (counted, in ``summary.json``);
- ``train.finish_hooks``: functions called once after the final checkpoint and evaluation, before
  ``summary.json`` (their results go to ``summary['finish_hooks']``; e.g. a pruning run's RUN/export/).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.common import with_defaults
from jaxrobust import attacks, data as jdata, models as jmodels
from jaxrobust.data import augment as jaug
from jaxrobust.data import subsets as jsubsets
from jaxrobust.threat import ThreatModel
from jaxrobust.train import difficulty as jdiff
from jaxrobust.train import objectives as jobj
from jaxrobust.train import pas as jpas
from jaxrobust.train import references as jrefs
from jaxrobust.train.checkpoint import Checkpointer
from jaxrobust.train.metrics import MetricWriter, Progress, round_floats
from jaxrobust.train.monitors import monitors_from_config
from jaxrobust.train.optim import make_optimizer
from jaxrobust.train.state import TrainState
from jaxrobust.train.workdir import prepare_workdir

AUGMENT_PAD = 4  # crop_flip pads by 4 pixels; batch['crop_offset'] = (4, 4) is the identity crop
# Per-instance arrays are padded to a multiple of lcm(device count, 1024) rows: shardable over any
# power-of-two number of devices up to 1024, so a checkpoint resumes on another device count.
INSTANCE_ROW_MULTIPLE = 1024


# ----------------------------------------------------------------------------- building blocks
def build_dataset(config):
    d = config.data
    ds = jdata.load_dataset(d.name, data_dir=d.data_dir or None, val_fraction=d.val_fraction,
                            seed=d.split_seed, pixel_range=tuple(d.pixel_range))
    # data.subset (easy/random/hard by a reference run's difficulty) and data.extra (half-and-half
    # batches with a second source): jaxrobust/data/subsets.py
    return jsubsets.apply_data_options(ds, d, lambda name, split: jdata.load_dataset(
        name, data_dir=d.data_dir or None, pixel_range=tuple(d.pixel_range)).split(split))


def build_model(config, info):
    # config.model.dtype: bf16 compute, float32 parameters (jaxrobust/models/__init__.py)
    kwargs = jmodels.compute_dtype_kwargs(config.model.kwargs, config.model.dtype)
    if config.model.normalize and info.image_shape != (2,):
        kwargs.setdefault("mean", tuple(info.mean))
        kwargs.setdefault("std", tuple(info.std))
    return jmodels.create_model(config.model.name, info.num_classes, **kwargs)


def build_threat(config, info=None, *, norm=None, eps=None) -> ThreatModel:
    """The one constructor of a run's threat model (training, evaluation, certification).

    ``config`` is the *training* config (``config.threat``: norm, eps, box). When ``config.threat.box``
    is set, the box is the dataset's ``pixel_range`` (``info.pixel_range``, or ``config.data.pixel_range``
    when ``info`` is None): a run trained on [-1, 1] pixels is attacked and certified in [-1, 1].
    ``norm``/``eps`` override the training values (evaluation at other budgets); ``eps=None`` means the
    training ε, a negative ε is an error.
    """
    t = config.threat
    if eps is not None and float(eps) < 0:
        raise ValueError(f"eps must be >= 0 (None = the training run's eps {t.eps}), got {eps}.")
    box = None
    if t.box is not None:
        pixel_range = info.pixel_range if info is not None else config.data.pixel_range
        box = tuple(float(v) for v in pixel_range)
    return ThreatModel(norm=norm or t.norm, eps=float(t.eps if eps is None else eps), box=box)


def make_mesh():
    """A 1-D data-parallel mesh over every device. Axis type Auto (GSPMD propagation): recent JAX
    defaults to Explicit sharding-in-types, which would force every per-example op (vmapped crops,
    attacks) to spell out shardings; Auto lets XLA propagate the batch sharding."""
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def instance_rows(n_train: int, num_devices: Optional[int] = None) -> int:
    """Rows of the per-instance arrays: ``n_train`` padded to a multiple of lcm(devices, 1024)."""
    d = jax.device_count() if num_devices is None else num_devices
    m = math.lcm(d, INSTANCE_ROW_MULTIPLE)
    return -(-n_train // m) * m


def _is_instance_path(path) -> bool:
    keys = [getattr(k, "name", getattr(k, "key", None)) for k in path]
    return len(keys) >= 2 and keys[0] == "extra" and keys[1] == "instance"


def state_shardings(state, mesh):
    """NamedShardings for a TrainState (or its shapes): ``extra['instance']`` leaves split over the
    ``'data'`` axis along their first (dataset index) axis, everything else replicated."""
    def pick(path, leaf):
        if _is_instance_path(path) and getattr(leaf, "ndim", 0) >= 1:
            return NamedSharding(mesh, P("data"))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(pick, state)


@dataclasses.dataclass
class RunSetup:
    """Everything a run builds from its config before touching the workdir."""
    config: ml_collections.ConfigDict
    dataset: Any
    train_size: int
    num_indices: int  # size of the training split's dataset-index space (max index + 1)
    model: Any
    threat: ThreatModel
    steps_per_epoch: int
    total_steps: int
    objective: jobj.Objective
    ctx: jobj.ObjectiveContext
    tx: optax.GradientTransformation
    lr_schedule: Callable


def build_schedules(config, total_steps: int, steps_per_epoch: int, objective=None) -> Dict[str, Callable]:
    """``ctx.schedules``: 'eps' (of threat.eps) and every ``objective.schedules.<name>`` (of its value)."""
    eps = float(config.threat.eps)
    # Periodic adversarial scheduling restarts the schedules named in pas.restart per period (pas.py).
    raw_eps = jpas.schedule_for(config, "eps", config.objective.eps_schedule, eps, total_steps,
                                steps_per_epoch)
    # ε(step) is clipped to [0, threat.eps]: eq 4.29's schedulers may overshoot the target on purpose.
    scheds = {"eps": lambda step: jnp.clip(raw_eps(step), 0.0, eps)}
    for name, sc in config.objective.schedules.items():
        if name == "eps":
            raise ValueError("objective.schedules.eps is reserved: configure objective.eps_schedule.")
        scheds[name] = jpas.schedule_for(config, name, sc, float(sc.value), total_steps, steps_per_epoch)
    end_eps = float(raw_eps(max(total_steps - 1, 0)))
    if eps > 0 and end_eps < eps * (1 - 1e-3):
        warnings.warn(f"the ε schedule ends at {end_eps:.6g}, below threat.eps = {eps:g}: the run is "
                      f"trained for a smaller budget than it will be evaluated and certified at "
                      f"(check objective.eps_schedule: ramp_epochs, final_fraction).", stacklevel=2)
    missing = [n for n in (objective.schedules if objective is not None else ()) if n not in scheds]
    if missing:
        raise ValueError(f"objective {config.objective.name!r} needs the schedules {missing}: set "
                         f"objective.schedules.<name> (see configs.common.schedule_config).")
    return scheds


def build_run(config) -> RunSetup:
    """Validates ``config`` (filled with defaults) and builds data, model, threat, objective, schedules
    and optimizer. Raises a ValueError naming the bad field before anything is written."""
    validate_config(config)
    ds = build_dataset(config)
    info = ds.info
    train_split = ds.split("train")
    train_size = len(train_split)
    # Per-instance arrays are indexed by dataset index; with a validation split carved out of train,
    # the training examples keep their original indices, which can exceed the training-set size.
    num_indices = int(np.max(train_split.dataset_indices)) + 1 if train_size else 0
    model = build_model(config, info)
    threat = build_threat(config, info)
    bs = config.data.batch_size
    steps_per_epoch = train_size // bs
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {bs} is larger than the training set ({train_size}).")
    total = config.train.num_steps if config.train.num_steps > 0 else \
        int(round(config.train.num_epochs * steps_per_epoch))
    jpas.validate(config, total, steps_per_epoch)
    objective = jobj.get_objective(config.objective.name)
    if objective.validate is not None:
        objective.validate(config.objective)
    if config.objective.ema_decay > 0:
        objective = jobj.with_ema(objective, config.objective.ema_decay)
    if config.train.difficulty.enabled:  # eq. 4.30 sums in extra['instance'] (train/difficulty.py)
        objective = jdiff.with_difficulty(objective)
    ctx = jobj.ObjectiveContext(model=model, threat=threat,
                                schedules=build_schedules(config, total, steps_per_epoch, objective),
                                cfg=config.objective, num_classes=info.num_classes, n_train=train_size,
                                steps_per_epoch=steps_per_epoch)
    variables_shape = jax.eval_shape(lambda: jmodels.init_variables(
        model, jax.random.PRNGKey(0), info.image_shape))
    params_shape = variables_shape["params"]
    if config.train.difficulty.enabled:
        jdiff.check_difficulty_support(config, objective, ctx, params_shape,
                                       {k: v for k, v in variables_shape.items() if k != "params"},
                                       info.image_shape, num_indices)
    # The optimizer counts updates: replays (Free AT) make several per step.
    m = objective.replays(config.objective) if callable(objective.replays) else objective.replays
    objective = dataclasses.replace(objective, replays=int(m))
    m = objective.replays
    if m < 1:
        raise ValueError(f"objective {config.objective.name!r} has replays={m}; expected >= 1.")
    lr = jpas.schedule_for(config, "lr", config.schedule, config.optimizer.lr, total * m,
                           steps_per_epoch * m)
    tx, lr_schedule = make_optimizer(config.optimizer, config.schedule, total * m, steps_per_epoch * m,
                                     params=params_shape, objective_labels=objective.param_labels,
                                     lr_schedule=lr)
    return RunSetup(config, ds, train_size, num_indices, model, threat, steps_per_epoch, total,
                    objective, ctx, tx,
                    lr_schedule)


def _pad_instance(extra, n_train: int, rows: int):
    if not isinstance(extra, dict) or "instance" not in extra:
        return extra
    inst = extra["instance"]
    if not isinstance(inst, dict):
        raise TypeError("extra['instance'] must be a dict of per-instance arrays.")
    padded = {}
    for name, v in inst.items():
        if getattr(v, "ndim", 0) < 1 or v.shape[0] != n_train:
            raise ValueError(f"extra['instance'][{name!r}] must have leading size n_train={n_train}, "
                             f"got shape {getattr(v, 'shape', None)}.")
        padded[name] = jnp.pad(v, [(0, rows - n_train)] + [(0, 0)] * (v.ndim - 1))
    return {**extra, "instance": padded}


def create_train_state(model, input_shape, tx, objective: jobj.Objective, ctx, *, seed: int,
                       n_train: int, mesh=None) -> TrainState:
    """The initial state: parameters from ``PRNGKey(seed)``, the objective's ``extra`` for ``n_train``
    dataset indices (per-instance rows padded, :func:`instance_rows`; ``n_train`` is the training split's
    largest dataset index + 1, which exceeds its size when a validation split was carved out). With ``mesh`` the state is created
    directly with its shardings (per-instance arrays never exist replicated on one device)."""
    rows = instance_rows(n_train, None if mesh is None else mesh.size)
    input_shape = tuple(input_shape)

    def init():
        key = jax.random.PRNGKey(seed)
        init_key, state_key = jax.random.split(key)
        variables = model.init(init_key, jnp.zeros((1,) + input_shape, jnp.float32), train=False)
        params = variables["params"]
        if objective.init_params is not None:
            params = objective.init_params(ctx, params, jax.random.fold_in(init_key, 1), input_shape)
        model_state = {k: v for k, v in variables.items() if k != "params"}
        extra = objective.init_extra(ctx, params, n_train, input_shape)
        extra = _pad_instance(extra, n_train, rows)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=tx.init(params), key=state_key, extra=extra,
                          nonfinite_step=jnp.full((), -1, jnp.int32), tx=tx)

    if mesh is None:
        return jax.jit(init)()
    shardings = state_shardings(jax.eval_shape(init), mesh)
    return jax.jit(init, out_shardings=shardings)()


def create_run_state(setup: RunSetup, mesh=None) -> TrainState:
    return create_train_state(setup.model, setup.dataset.info.image_shape, setup.tx, setup.objective,
                              setup.ctx, seed=setup.config.seed, n_train=setup.num_indices, mesh=mesh)


def make_update_fn(ctx, objective: jobj.Objective, lr_schedule, augment: str,
                   trace_counter: Optional[Dict[str, int]] = None):
    """The training step: (state, batch) -> (state, metrics). Pure; jitted by the caller.

    An objective with ``replays = m > 1`` (Free AT) makes m optimizer updates on the same batch, each
    with ``batch['replay'] = r`` and the state (parameters, extra) left by the previous one; the
    optimizer's schedules then count m updates per step. ``trace_counter['update']`` counts how often
    the step is traced (compiled): once per run.
    """
    replays = int(objective.replays)

    def one_update(state: TrainState, batch, key, step):
        def loss_fn(params):
            return objective.loss(ctx, params, state.model_state, state.extra, batch, key, step)

        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        out = jobj.ObjectiveOutput(*out)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = state.extra
        if out.instance_updates:
            inst = dict(extra["instance"])
            for name, value in out.instance_updates.items():
                if name not in inst:
                    raise KeyError(f"instance update {name!r} is not in extra['instance'] "
                                   f"(has {sorted(inst)}).")
                rows = inst[name].shape[0]
                # Padding rows (mask False) are dropped by pointing them out of range.
                idx = jnp.where(batch["mask"], batch["index"], rows)
                inst[name] = inst[name].at[idx].set(value.astype(inst[name].dtype), mode="drop")
            extra = {**extra, "instance": inst}
        if objective.after_update is not None:
            extra = objective.after_update(ctx, params, extra, step)
        grad_norm = optax.global_norm(grads)
        new_state = state.replace(params=params, model_state=out.model_state, opt_state=opt_state,
                                  extra=extra)
        # A non-finite loss or gradient leaves the state as it was (the last finite one) and records
        # the step; the loop stops there without checkpointing the step.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.nonfinite_step < 0)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        new_state = new_state.replace(
            nonfinite_step=jnp.where(finite | (state.nonfinite_step >= 0), state.nonfinite_step,
                                     step))
        return new_state, dict(out.metrics, grad_norm=grad_norm)

    def update(state: TrainState, batch):
        if trace_counter is not None:
            trace_counter["update"] = trace_counter.get("update", 0) + 1
        step = state.step
        key = jax.random.fold_in(state.key, step)
        k_aug, k_obj = jax.random.split(key)
        n = batch["image"].shape[0]
        if augment == "crop_flip":
            images, offsets, flips = jaug.random_crop_flip(k_aug, batch["image"], pad=AUGMENT_PAD)
            batch = {**batch, "image": images, "crop_offset": offsets, "flip": flips}
        else:
            batch = {**batch, "crop_offset": jnp.full((n, 2), AUGMENT_PAD, jnp.int32),
                     "flip": jnp.zeros((n,), bool)}
        if replays == 1:
            state, metrics = one_update(state, batch, k_obj, step)
        else:
            for r in range(replays):  # static and small: unrolled
                state, metrics = one_update(state, {**batch, "replay": jnp.int32(r)},
                                            jax.random.fold_in(k_obj, r), step)
        metrics = dict(metrics, lr=lr_schedule(step * replays))
        for name, sched in ctx.schedules.items():
            metrics.setdefault(name, sched(step))
        return state.replace(step=step + 1), metrics

    return update


def make_eval_fn(model, threat: ThreatModel, eval_cfg):
    """(variables, batch, key) -> sums of clean-correct, PGD-robust-correct and count (masked)."""
    a = eval_cfg.attack

    def evaluate(variables, batch, key):
        logits_fn = lambda x: model.apply(variables, x, train=False)
        x, y, mask = batch["image"], batch["label"], batch["mask"]
        clean = jnp.argmax(logits_fn(x), -1) == y
        out = {"clean_correct": jnp.sum(clean & mask), "count": jnp.sum(mask)}
        if a.steps > 0 and threat.eps_for(x) is not None:
            x_adv = attacks.pgd(logits_fn, x, y, key, threat, steps=a.steps,
                                step_size=None if a.step_size <= 0 else a.step_size,
                                loss=a.loss, restarts=a.restarts, random_start=a.random_start)
            robust = clean & (jnp.argmax(logits_fn(x_adv), -1) == y)
            out["pgd_correct"] = jnp.sum(robust & mask)
        return out

    return evaluate


def run_evaluation(eval_step, variables, split, batch_size: int, sharding, seed: int,
                   num_examples: int = -1) -> Dict[str, float]:
    """Clean and PGD accuracy over (the first ``num_examples`` of) a split; every example once."""
    if num_examples > 0 and num_examples < len(split):
        split = split.subset(np.arange(num_examples))
    totals: Dict[str, float] = {}
    base = jax.random.PRNGKey(seed + 7919)
    for i, batch in enumerate(jdata.batch_iterator(split, batch_size, shuffle=False,
                                                   drop_remainder=False, sharding=sharding)):
        out = eval_step(variables, batch, jax.random.fold_in(base, i))
        for k, v in jax.device_get(out).items():
            totals[k] = totals.get(k, 0) + int(v)
    n = max(totals.get("count", 0), 1)
    res = {"num_examples": totals.get("count", 0), "clean_accuracy": totals["clean_correct"] / n}
    if "pgd_correct" in totals:
        res["pgd_accuracy"] = totals["pgd_correct"] / n
    return res


# ----------------------------------------------------------------------------- validation
def validate_config(config):
    """Fails early, with the list of valid names, on unknown datasets/models/objectives/etc."""
    if config.data.name not in jdata.list_datasets() and config.data.name.split("/")[0] not in \
            jdata.list_datasets():
        raise ValueError(f"Unknown dataset {config.data.name!r}; available: {jdata.list_datasets()}.")
    if config.model.name not in jmodels.list_models():
        raise ValueError(f"Unknown model {config.model.name!r}; available: {jmodels.list_models()}.")
    jobj.get_objective(config.objective.name)
    if config.data.augment not in ("none", "crop_flip"):
        raise ValueError(f"Unknown data.augment {config.data.augment!r}; expected 'none' or 'crop_flip'.")
    if config.data.batch_size % jax.device_count():
        raise ValueError(f"data.batch_size={config.data.batch_size} must be divisible by the "
                         f"{jax.device_count()} devices.")
    if config.threat.eps < 0:
        raise ValueError(f"threat.eps must be >= 0, got {config.threat.eps}.")
    jsubsets.validate_data_options(config.data)
    d = config.objective.ema_decay
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
        raise ValueError(f"objective.ema_decay must be a number in [0, 1) (0 = no EMA), got {d!r}.")


# ----------------------------------------------------------------------------- the loop
def train(config: ml_collections.ConfigDict, workdir: str,
          callbacks: Sequence[Callable[[int, TrainState], Any]] = ()) -> Dict[str, Any]:
    """Trains (or resumes) a run in ``workdir``; returns the summary dict.

    ``callbacks``: functions ``(step, state) -> stop`` called after every update; a truthy return value
    checkpoints the state and stops the run there (returns ``{"stopped_at": step}``).
    """
    config = with_defaults(config)
    if config.distributed:
        _initialize_distributed()
    # a data.subset's reference run / train.init_from's pre-trained run: paths resolved against
    # workdir, trained first when missing (jaxrobust/train/references.py)
    jsubsets.validate_data_options(config.data)
    config = jrefs.prepare_references(config, workdir)
    setup = build_run(config)
    ds, threat, model = setup.dataset, setup.threat, setup.model
    train_split = ds.split("train")
    bs, steps_per_epoch, total = config.data.batch_size, setup.steps_per_epoch, setup.total_steps

    # The catastrophic-overfitting monitor (train.monitor.*) is a callback like any other.
    # and so are PAS period-end checkpoints and the difficulty files / per-instance evaluations.
    monitors = [*monitors_from_config(config, workdir, setup),
                *jpas.callbacks(config, workdir, setup),
                *jdiff.callbacks_from_config(config, workdir, setup)]
    finish_hooks = [(ref, load_hook(ref)) for ref in config.train.finish_hooks]
    callbacks = [*callbacks, *monitors]
    # config.json only once everything above accepted the config; refuses a changed run (workdir.py).
    prepare_workdir(config, workdir)
    mesh = make_mesh()
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    state = create_run_state(setup, mesh)
    shardings = state_shardings(state, mesh)
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(state.checkpoint_tree())
        state = state.from_checkpoint_tree(restored)
        print(f"Resumed from step {int(state.step)} in {ckpt.directory}", flush=True)
    elif config.train.init_from:  # fine-tuning: weights (and BN statistics) of a pre-trained run
        state = jrefs.init_state_from(state, config.train.init_from)
        print(f"Initialised from {config.train.init_from}", flush=True)
    state = jax.device_put(state, shardings)

    traces: Dict[str, int] = {}
    update = jax.jit(make_update_fn(setup.ctx, setup.objective, setup.lr_schedule,
                                    config.data.augment, traces),
                     in_shardings=(shardings, data_sharding), out_shardings=(shardings, replicated),
                     donate_argnums=(0,))
    eval_step = jax.jit(make_eval_fn(model, threat, config.eval),
                        in_shardings=(replicated, data_sharding, replicated),
                        out_shardings=replicated)
    writer = MetricWriter(workdir, tensorboard=config.train.tensorboard)
    eval_splits = [s for s in config.eval.splits if s in ds.splits]
    eval_every = max(int(round(config.train.eval_every_epochs * steps_per_epoch)), 1) \
        if config.train.eval_every_epochs > 0 else 0
    ckpt_every = config.train.checkpoint_every_steps if config.train.checkpoint_every_steps > 0 \
        else steps_per_epoch

    def evaluate(step):
        results = {}
        for s in eval_splits:
            r = run_evaluation(eval_step, state.variables(), ds.split(s), config.data.eval_batch_size,
                               data_sharding, config.seed, config.eval.num_examples)
            writer.write(step, s, r)
            results[s] = r
            print(f"[eval] step {step} {s}: " + " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                flush=True)
        return results

    step = int(state.step)
    progress = Progress(total, start=step, every=config.train.log_every)
    t0 = time.time()
    last_metrics = {}
    while step < total:
        epoch, start_batch = divmod(step, steps_per_epoch)
        for batch in jdata.batch_iterator(train_split, bs, shuffle=True, seed=config.seed,
                                          epoch=epoch, drop_remainder=True, start_batch=start_batch,
                                          sharding=data_sharding):
            state, metrics = update(state, batch)
            step += 1
            if step % config.train.log_every == 0 or step == total:
                last_metrics = jax.device_get(metrics)
                writer.write(step, "train", dict(last_metrics, epoch=step / steps_per_epoch,
                                                 steps_per_sec=progress.rate(step)))
                progress.maybe_print(step, " ".join(f"{k}={float(v):.4f}" for k, v in
                                                    last_metrics.items() if np.ndim(v) == 0))
            if step % config.train.log_every == 0 or step % ckpt_every == 0 or step == total:
                _raise_if_nonfinite(state, ckpt, writer)
            stop = any([bool(cb(step, state)) for cb in callbacks])
            if eval_every and step % eval_every == 0 and step < total and not stop:
                evaluate(step)
            if step % ckpt_every == 0 or step == total or stop:
                ckpt.save(step, state.checkpoint_tree())
            if stop:
                ckpt.close()
                writer.close()
                for m in monitors:
                    m.close()
                return {"stopped_at": step, "compiles": dict(traces)}
            if step >= total:
                break
    _raise_if_nonfinite(state, ckpt, writer)
    ckpt.save(step, state.checkpoint_tree())  # no-op if this step is saved already
    ckpt.close()
    for m in monitors:
        m.close()
    final = evaluate(step)
    hooks = {}
    if jax.process_index() == 0:  # e.g. RUN/export/ of a pruning run; before summary.json: a failed
        for ref, hook in finish_hooks:  # hook is redone when the (finished) run is started again
            hooks[ref] = hook(config=config, workdir=workdir, variables=state.variables(),
                              setup=setup, step=step)
    summary = {"steps": step, "epochs": step / steps_per_epoch, "train_seconds": time.time() - t0,
               "devices": jax.device_count(), "compiles": dict(traces), "final_train_metrics": {
                   k: float(v) for k, v in last_metrics.items() if np.ndim(v) == 0},
               "eval": final, "threat": {"norm": threat.norm, "eps": float(config.threat.eps),
                                         "box": None if threat.box is None else list(threat.box)}}
    if hooks:
        summary["finish_hooks"] = hooks
    if jax.process_index() == 0:
        tmp = os.path.join(workdir, "summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump(round_floats(summary), f, indent=2)  # without float noise
        os.replace(tmp, os.path.join(workdir, "summary.json"))
    writer.close()
    return summary


def load_hook(ref: str) -> Callable:
    """``"package.module:function"`` of ``train.finish_hooks``; a clear error when it does not load."""
    module, sep, name = str(ref).partition(":")
    if not sep or not module or not name:
        raise ValueError(f"train.finish_hooks entry {ref!r}: expected 'package.module:function'.")
    import importlib
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"train.finish_hooks entry {ref!r} does not load: {e}") from None
    if not callable(fn):
        raise ValueError(f"train.finish_hooks entry {ref!r} is not a function.")
    return fn


def _raise_if_nonfinite(state: TrainState, ckpt: Checkpointer, writer: MetricWriter) -> None:
    bad = int(state.nonfinite_step)
    if bad < 0:
        return
    ckpt.close()
    writer.close()
    last = ckpt.latest_step()
    where = (f"The last finite checkpoint is step {last} in {ckpt.directory} (resuming continues "
             f"from it)." if last is not None else "No checkpoint was written before it.")
    raise FloatingPointError(
        f"The loss or its gradient became NaN/inf at step {bad + 1}; training stopped. {where} "
        "Lower optimizer.lr, set optimizer.clip_norm, or check the data and the objective.")


def _initialize_distributed():
    """Multi-host: ``jax.distributed.initialize()``; on TPU pods/SLURM/Open MPI the coordinator is
    discovered; otherwise JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are read."""
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)


# ----------------------------------------------------------------------------- loading runs
@dataclasses.dataclass
class TrainedRun:
    config: ml_collections.ConfigDict
    model: Any
    variables: Dict[str, Any]
    logits_fn: Callable
    dataset: Any
    step: int
    extra: Any = None
    threat: Optional[ThreatModel] = None  # the run's training threat model (box = data pixel range)
    # weights='pas_ensemble': {period end step: variables} of the ensemble's members (variables is
    # then the last member's; logits_fn the ensemble's)
    members: Optional[Dict[int, Any]] = None


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """A run's stored config, with fields it lacks filled from the current defaults."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training run's workdir?")
    with open(path) as f:
        return with_defaults(ml_collections.ConfigDict(json.load(f)))


def load_trained(workdir: str, step: Optional[int] = None, weights: str = "final") -> TrainedRun:
    """Loads a finished (or interrupted) run: config, model, variables, the objective's extra state
    and an eval-mode logits_fn.

    ``weights='ema'`` uses the exponential moving average of the parameters that objectives keep in
    ``extra['ema']`` (an ``after_update`` hook) instead of the final parameters.
    ``weights='pas_ensemble'``: a periodic-adversarial-scheduling run's model, the ensemble of its
    period-end checkpoints (averaged softmax; ``logits_fn`` returns its log-probabilities, ``members``
    holds each member's variables; jaxrobust/train/pas.py). Needs a finished run and ``step=None``.
    """
    if weights not in ("final", "ema", "pas_ensemble"):
        raise ValueError(f"weights must be 'final', 'ema' or 'pas_ensemble', got {weights!r}.")
    if weights == "pas_ensemble" and step is not None:
        raise ValueError("weights='pas_ensemble' is the ensemble of every period end: pass step=None "
                         "(jaxrobust.train.pas.load_members loads chosen period ends).")
    config = load_config(workdir)
    setup = build_run(config)
    state = create_run_state(setup)
    ckpt = Checkpointer(workdir)
    restored = ckpt.restore(state.checkpoint_tree(), step)
    ckpt.close()
    state = state.from_checkpoint_tree(restored)
    variables = state.variables()
    if weights == "ema":
        if not isinstance(state.extra, dict) or "ema" not in state.extra:
            raise ValueError(f"the run in {workdir} keeps no EMA weights (objective "
                             f"{config.objective.name!r} has no extra['ema']).")
        variables = {**variables, "params": state.extra["ema"]}
    members = None
    if weights == "pas_ensemble":
        ends = jpas.validate(config, setup.total_steps, setup.steps_per_epoch)
        if ends is None:
            raise ValueError(f"the run in {workdir} does not use periodic adversarial scheduling "
                             f"(pas.periods is empty): it has no PAS ensemble.")
        members = jpas.load_members(workdir, variables, ends)
        variables = members[ends[-1]]
        logits_fn = jpas.ensemble_logits_fn(setup.model, list(members.values()))
    else:
        logits_fn = jax.jit(lambda x: setup.model.apply(variables, x, train=False))
    return TrainedRun(config, setup.model, variables, logits_fn, setup.dataset, int(state.step),
                      state.extra, setup.threat, members)
