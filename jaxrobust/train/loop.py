"""The one training loop of jaxrobust.

``train(config, workdir)`` runs any registered objective (standard ERM, PGD-AT, and those later issues
add) with:
- one ``jax.jit`` update step over a ``('data',)`` mesh of all devices: the batch sharded with
  ``NamedSharding(mesh, P('data'))``, the state replicated and donated (multi-host through
  ``jax.distributed.initialize()`` when ``config.distributed``; each process reads its own slice);
- per-step PRNG keys ``fold_in(key, step)`` and data order from ``(seed, epoch)``, so restoring a
  checkpoint resumes bit-exactly (tested: killed-and-resumed == uninterrupted);
- periodic clean + PGD evaluation on val/test with masked, padded batches (every example once);
- orbax checkpoints (atomic), ``metrics.jsonl``, TensorBoard, ``config.json``, ``summary.json``,
  progress with rate and ETA.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrobust import attacks, data as jdata, models as jmodels
from jaxrobust.data import augment as jaug
from jaxrobust.threat import ThreatModel
from jaxrobust.train import objectives as jobj
from jaxrobust.train.checkpoint import Checkpointer
from jaxrobust.train.eps_schedules import make_eps_schedule
from jaxrobust.train.metrics import MetricWriter, Progress
from jaxrobust.train.optim import make_optimizer
from jaxrobust.train.state import TrainState


# ----------------------------------------------------------------------------- building blocks
def build_dataset(config):
    d = config.data
    return jdata.load_dataset(d.name, data_dir=d.get("data_dir") or None,
                              val_fraction=d.get("val_fraction", 0.0), seed=d.get("split_seed", 0),
                              pixel_range=tuple(d.get("pixel_range", (0.0, 1.0))))


def build_model(config, info):
    kwargs = dict(config.model.get("kwargs", {}))
    if config.model.get("normalize", True) and info.image_shape != (2,):
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
    if t.get("box") is not None:
        if info is not None:
            box = tuple(float(v) for v in info.pixel_range)
        else:
            box = tuple(float(v) for v in config.data.get("pixel_range", t.box))
    return ThreatModel(norm=norm or t.norm, eps=float(t.eps if eps is None else eps), box=box)


def make_mesh():
    """A 1-D data-parallel mesh over every device. Axis type Auto (GSPMD propagation): recent JAX
    defaults to Explicit sharding-in-types, which would force every per-example op (vmapped crops,
    attacks) to spell out shardings; Auto lets XLA propagate the batch sharding."""
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def create_train_state(config, model, info, tx, train_size: int, ctx) -> TrainState:
    key = jax.random.PRNGKey(config.seed)
    init_key, state_key = jax.random.split(key)
    variables = jmodels.init_variables(model, init_key, info.image_shape)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    objective = jobj.get_objective(config.objective.name)
    init_inst = getattr(objective, "init_instance_state", None)
    instance_state = init_inst(ctx, train_size, info.image_shape) if init_inst else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params), key=state_key, instance_state=instance_state,
                      apply_fn=model.apply, tx=tx)


def make_update_fn(ctx, objective, lr_schedule, augment: str):
    """The training step: (state, batch) -> (state, metrics). Pure; jitted by the caller."""

    def update(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        k_aug, k_obj = jax.random.split(key)
        if augment == "crop_flip":
            images, _, _ = jaug.random_crop_flip(k_aug, batch["image"])
            batch = {**batch, "image": images}

        def loss_fn(params):
            return objective(ctx, params, state.model_state, batch, k_obj, state.step,
                             state.instance_state)

        (loss, (new_model_state, inst_updates, metrics)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        inst = dict(state.instance_state)
        for name, value in inst_updates.items():
            n = inst[name].shape[0]
            # Padding rows (mask False) are dropped by pointing them out of range.
            idx = jnp.where(batch["mask"], batch["index"], n)
            inst[name] = inst[name].at[idx].set(value, mode="drop")
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=lr_schedule(state.step))
        new_state = state.replace(step=state.step + 1, params=params, model_state=new_model_state,
                                  opt_state=opt_state, instance_state=inst)
        return new_state, metrics

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


# ----------------------------------------------------------------------------- the loop
def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Trains (or resumes) a run in ``workdir``; returns the summary dict."""
    if config.get("distributed", False):
        _initialize_distributed()
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    ds = build_dataset(config)
    info = ds.info
    train_split = ds.split("train")
    model = build_model(config, info)
    threat = build_threat(config, info)
    bs = config.data.batch_size
    steps_per_epoch = len(train_split) // bs
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {bs} is larger than the training set ({len(train_split)}).")
    total = config.train.num_steps if config.train.get("num_steps", -1) > 0 else \
        int(round(config.train.num_epochs * steps_per_epoch))
    tx, lr_schedule = make_optimizer(config.optimizer, config.schedule, total, steps_per_epoch)
    eps_at = make_eps_schedule(config.objective.get("eps_schedule", ml_collections.ConfigDict()),
                               float(config.threat.eps), steps_per_epoch)
    ctx = jobj.ObjectiveContext(model=model, threat=threat, eps_at=eps_at, cfg=config.objective,
                                num_classes=info.num_classes)
    objective = jobj.get_objective(config.objective.name)

    mesh = make_mesh()
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    state = create_train_state(config, model, info, tx, len(train_split), ctx)
    ckpt = Checkpointer(workdir, keep=config.train.get("keep_checkpoints", 3))
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(state.checkpoint_tree())
        state = state.from_checkpoint_tree(restored)
        print(f"Resumed from step {int(state.step)} in {ckpt.directory}", flush=True)
    state = jax.device_put(state, replicated)

    update = jax.jit(make_update_fn(ctx, objective, lr_schedule, config.data.augment),
                     in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
                     donate_argnums=(0,))
    eval_step = jax.jit(make_eval_fn(model, threat, config.eval),
                        in_shardings=(replicated, data_sharding, replicated),
                        out_shardings=replicated)
    writer = MetricWriter(workdir, tensorboard=config.train.get("tensorboard", True))
    eval_splits = [s for s in config.eval.splits if s in ds.splits]
    eval_every = max(int(round(config.train.eval_every_epochs * steps_per_epoch)), 1) \
        if config.train.eval_every_epochs > 0 else 0
    ckpt_every = config.train.checkpoint_every_steps if config.train.checkpoint_every_steps > 0 \
        else steps_per_epoch
    stop_after = config.train.get("stop_after_steps", -1)

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
            if eval_every and step % eval_every == 0 and step < total:
                evaluate(step)
            if step % ckpt_every == 0 or step == total or step == stop_after:
                ckpt.save(step, state.checkpoint_tree())
            if step == stop_after:
                ckpt.close()
                writer.close()
                return {"stopped_at": step}
            if step >= total:
                break
    ckpt.save(step, state.checkpoint_tree())  # no-op if this step is saved already
    ckpt.close()
    final = evaluate(step)
    summary = {"steps": step, "epochs": step / steps_per_epoch, "train_seconds": time.time() - t0,
               "devices": jax.device_count(), "final_train_metrics": {
                   k: float(v) for k, v in last_metrics.items() if np.ndim(v) == 0},
               "eval": final, "threat": {"norm": threat.norm, "eps": float(config.threat.eps)}}
    if jax.process_index() == 0:
        tmp = os.path.join(workdir, "summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, os.path.join(workdir, "summary.json"))
    writer.close()
    return summary


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


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training run's workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_trained(workdir: str, step: Optional[int] = None) -> TrainedRun:
    """Loads a finished (or interrupted) run: config, model, variables and an eval-mode logits_fn."""
    config = load_config(workdir)
    ds = build_dataset(config)
    model = build_model(config, ds.info)
    steps_per_epoch = max(len(ds.split("train")) // config.data.batch_size, 1)
    tx, _ = make_optimizer(config.optimizer, config.schedule, 1, steps_per_epoch)
    ctx = jobj.ObjectiveContext(model=model, threat=build_threat(config, ds.info),
                                eps_at=lambda s: config.threat.eps, cfg=config.objective,
                                num_classes=ds.info.num_classes)
    state = create_train_state(config, model, ds.info, tx, len(ds.split("train")), ctx)
    ckpt = Checkpointer(workdir)
    restored = ckpt.restore(state.checkpoint_tree(), step)
    ckpt.close()
    state = state.from_checkpoint_tree(restored)
    variables = state.variables()
    logits_fn = jax.jit(lambda x: model.apply(variables, x, train=False))
    return TrainedRun(config, model, variables, logits_fn, ds, int(state.step))
