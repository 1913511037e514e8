"""Instance difficulty tracked by the training loop (thesis §4.3.1, eq. 4.30) and periodic
per-instance evaluations with difficulty groups (eq. 4.32, Figs. 4.17-4.21).

``train.difficulty.enabled``: the objective is wrapped by :func:`with_difficulty`, which adds three
per-instance arrays to ``extra['instance']`` (``difficulty_loss_sum``, ``difficulty_correct_sum``,
``difficulty_count``) and adds to them, at every visit, the per-example loss and correctness the
objective reports in :attr:`ObjectiveOutput.per_example` for the forward pass it trains on (clean for
``standard``, adversarial for ``pgd_at``, ATTA, ATAS, FGSM-RS, TRADES, MART...): no extra forward
pass. With Free AT's m replays each replay counts as a visit. :class:`DifficultyRecorder` writes
``RUN/difficulty.npy`` (d of eq. 4.30 per dataset index, NaN for indices outside the training split),
``RUN/instance_stats.npz`` and ``RUN/difficulty.json`` at the end of every epoch and of training.

``train.instance_eval.sources`` (e.g. ``("train:pgd", "test:clean",
"cifar10_corrupted/fog_3@test:clean")``, every ``every_epochs``): :class:`InstanceEvaluator` records the
per-instance loss and correctness of the current model on ``num_examples`` examples of a split (a
seeded subset; all with ``num_examples <= 0``), clean, FGSM (step ε) or PGD (``eval.attack``) at the
training threat model, into ``RUN/instance_eval/<source>.npz`` (``(T, N)`` arrays; the difficulty of a
test set or of a corrupted test set, Table 4.4, is eq. 4.30 of their average). With
``train.instance_eval.groups_reference`` (a run whose ``difficulty.npy`` defines G0..G9) the group
means of loss and accuracy are written as JSON lines to ``RUN/groups.jsonl`` (Fig. 4.21's curves;
the ``groups`` analysis computes them after training from the run's own difficulty too).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrobust import attacks
from jaxrobust.train import objectives as jobj

SUM_NAMES = ("difficulty_loss_sum", "difficulty_correct_sum", "difficulty_count")
EVAL_KINDS = ("clean", "fgsm", "pgd")


# ----------------------------------------------------------------------------- the objective wrapper
def _strip(extra):
    """``extra`` without the difficulty arrays (what the wrapped objective created)."""
    if not isinstance(extra, dict) or "instance" not in extra:
        return extra
    inst = {k: v for k, v in extra["instance"].items() if k not in SUM_NAMES}
    out = {k: v for k, v in extra.items() if k != "instance"}
    if inst:
        out["instance"] = inst
    return out


def _restore(inner, extra):
    """``inner`` (the wrapped objective's extra) with the difficulty arrays of ``extra`` put back."""
    if not isinstance(inner, dict):
        inner = {"base": inner}
    inst = dict(inner.get("instance", {}))
    inst.update({k: extra["instance"][k] for k in SUM_NAMES})
    return {**inner, "instance": inst}


def with_difficulty(objective: jobj.Objective) -> jobj.Objective:
    """``objective`` plus the per-instance sums of eq. 4.30's average loss (and 0-1 correctness) of
    the examples it trains on, read from its ``ObjectiveOutput.per_example`` (``loss`` (B,),
    ``correct`` (B,)) and scattered by the loop at ``batch['index']`` (padding rows dropped)."""
    if not isinstance(objective, jobj.Objective):
        raise TypeError(f"with_difficulty expects an Objective, got {type(objective).__name__}.")

    def init(ctx, params, n_train, input_shape):
        inner = objective.init_extra(ctx, params, n_train, input_shape)
        if isinstance(inner, dict) and "instance" in inner and any(
                k in inner["instance"] for k in SUM_NAMES):
            raise ValueError(f"the objective's extra['instance'] already uses the names {SUM_NAMES}.")
        zeros = {"difficulty_loss_sum": jnp.zeros((n_train,), jnp.float32),
                 "difficulty_correct_sum": jnp.zeros((n_train,), jnp.float32),
                 "difficulty_count": jnp.zeros((n_train,), jnp.int32)}
        if not isinstance(inner, dict):
            inner = {"base": inner}
        return {**inner, "instance": {**inner.get("instance", {}), **zeros}}

    def inner_extra(extra):
        e = _strip(extra)
        if isinstance(e, dict) and set(e) == {"base"} and not isinstance(e["base"], dict):
            return e["base"]
        return e

    def loss(ctx, params, model_state, extra, batch, key, step):
        value, out = objective.loss(ctx, params, model_state, inner_extra(extra), batch, key, step)
        out = jobj.ObjectiveOutput(*out)
        pe = out.per_example
        if not pe or "loss" not in pe or "correct" not in pe:
            raise ValueError(
                f"objective {ctx.cfg.name!r} does not report per-example values "
                "(ObjectiveOutput.per_example = {'loss': (B,), 'correct': (B,)}), so "
                "train.difficulty cannot track it; objectives that do: "
                f"{sorted(per_example_objectives())}.")
        n = batch["image"].shape[0]
        if pe["loss"].shape != (n,) or pe["correct"].shape != (n,):
            raise ValueError(f"per_example loss/correct must have shape ({n},), got "
                             f"{pe['loss'].shape} and {pe['correct'].shape}.")
        inst, idx = extra["instance"], batch["index"]
        upd = dict(out.instance_updates)
        upd["difficulty_loss_sum"] = inst["difficulty_loss_sum"][idx] + \
            jax.lax.stop_gradient(pe["loss"]).astype(jnp.float32)
        upd["difficulty_correct_sum"] = inst["difficulty_correct_sum"][idx] + \
            pe["correct"].astype(jnp.float32)
        upd["difficulty_count"] = inst["difficulty_count"][idx] + 1
        return value, out._replace(instance_updates=upd)

    def after_update(ctx, params, extra, step):
        if objective.after_update is None:
            return extra
        return _restore(objective.after_update(ctx, params, inner_extra(extra), step), extra)

    return jobj.Objective(init=init, loss=loss, after_update=after_update,
                          param_labels=objective.param_labels, schedules=objective.schedules,
                          validate=objective.validate, replays=objective.replays)


def reports_per_example(objective: jobj.Objective, ctx, params_shape, model_state_shape,
                        input_shape, batch_size: int, n_train: int) -> bool:
    """Whether ``objective.loss`` fills ``per_example`` (abstract evaluation: nothing is computed)."""
    b = int(batch_size)
    batch = {"image": jax.ShapeDtypeStruct((b,) + tuple(input_shape), jnp.float32),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32),
             "index": jax.ShapeDtypeStruct((b,), jnp.int32),
             "mask": jax.ShapeDtypeStruct((b,), jnp.bool_),
             "crop_offset": jax.ShapeDtypeStruct((b, 2), jnp.int32),
             "flip": jax.ShapeDtypeStruct((b,), jnp.bool_)}
    if int(objective.replays) > 1:
        batch["replay"] = jax.ShapeDtypeStruct((), jnp.int32)

    def run(params, model_state, batch):
        extra = objective.init_extra(ctx, params, n_train, tuple(input_shape))
        _, out = objective.loss(ctx, params, model_state, extra, batch, jax.random.PRNGKey(0),
                                jnp.int32(0))
        return jobj.ObjectiveOutput(*out).per_example

    pe = jax.eval_shape(run, params_shape, model_state_shape, batch)
    return bool(pe) and "loss" in pe and "correct" in pe


# Built-in objectives whose loss fills ObjectiveOutput.per_example (others may too: the check is
# an abstract evaluation of the configured objective, this list only makes the error message useful).
PER_EXAMPLE_OBJECTIVES = ("standard", "pgd_at", "at", "fgsm_rs", "nfgsm", "atta", "atas", "trades",
                          "mart", "awp", "awp_at", "awp_trades", "iat", "sat", "at_rw", "atta_rw")


def per_example_objectives():
    return list(PER_EXAMPLE_OBJECTIVES)


def check_difficulty_support(config, objective, ctx, params_shape, model_state_shape, input_shape,
                             n_train: int) -> None:
    """Raises the ValueError of :func:`with_difficulty` before the run writes anything when
    ``train.difficulty.enabled`` and the objective does not report per-example values."""
    name = config.objective.name
    ok = reports_per_example(objective, ctx, params_shape, model_state_shape, input_shape,
                             config.data.batch_size, n_train)
    if not ok:
        raise ValueError(
            f"train.difficulty.enabled: objective {name!r} does not report per-example values "
            "(ObjectiveOutput.per_example = {'loss': (B,), 'correct': (B,)}); objectives that do: "
            f"{per_example_objectives()}.")


# ----------------------------------------------------------------------------- the recorder
class DifficultyRecorder:
    """Callback writing the run's difficulty files from the per-instance sums at the end of every
    epoch and at the last step (``RUN/difficulty.npy`` etc., :func:`jaxrobust.analysis.difficulty.
    write_difficulty`); the indices of the training split only (NaN elsewhere)."""

    def __init__(self, workdir: str, train_indices: np.ndarray, num_indices: int,
                 steps_per_epoch: int, total_steps: int, info: Optional[dict] = None):
        self.workdir, self.every, self.total = workdir, max(int(steps_per_epoch), 1), int(total_steps)
        self.in_split = np.zeros(num_indices, bool)
        self.in_split[np.asarray(train_indices)] = True
        self.num_indices = int(num_indices)
        self.info = dict(info or {})
        self.last_summary: Dict[str, Any] = {}

    def write(self, step: int, state) -> Dict[str, Any]:
        from jaxrobust.analysis import difficulty as D
        inst = state.extra["instance"]
        sums = [np.asarray(jax.device_get(inst[k]))[:self.num_indices] for k in SUM_NAMES]
        loss_sum, correct_sum, count = sums
        count = np.where(self.in_split, count, 0)
        stats = D.instance_statistics(loss_sum, correct_sum, count)
        if jax.process_index() == 0:
            self.last_summary = D.write_difficulty(self.workdir, stats,
                                                   {**self.info, "step": int(step),
                                                    "epochs": step / self.every})
        return self.last_summary

    def __call__(self, step: int, state) -> bool:
        if step % self.every == 0 or step == self.total:
            self.write(step, state)
        return False

    def close(self):
        pass


# ----------------------------------------------------------------------------- periodic evaluation
def parse_source(spec: str) -> Tuple[str, str, str]:
    """``"[dataset@]split:kind"`` -> (dataset or '', split, kind)."""
    where, sep, kind = str(spec).rpartition(":")
    if not sep or kind not in EVAL_KINDS or not where:
        raise ValueError(f"train.instance_eval.sources entry {spec!r}: expected '[dataset@]split:kind' "
                         f"with kind in {EVAL_KINDS} (e.g. 'train:pgd', 'cifar10_corrupted/fog_3@test:clean').")
    dataset, _, split = where.rpartition("@")
    return dataset, split, kind


def make_instance_eval_fn(model, threat, kind: str, attack_cfg):
    """(variables, x, y, key) -> (loss (B,), correct (B,)) of eval-mode logits on the clean, FGSM
    (one signed step of ε from x) or PGD (``attack_cfg``: eval.attack) points."""
    if kind not in EVAL_KINDS:
        raise ValueError(f"kind must be one of {EVAL_KINDS}, got {kind!r}.")

    def f(variables, x, y, key):
        logits_fn = lambda z: model.apply(variables, z, train=False)
        if kind == "clean":
            xa = x
        elif kind == "fgsm":
            xa = attacks.fgsm(logits_fn, x, y, key, threat, step_size=threat.eps)
        else:
            a = attack_cfg
            xa = attacks.pgd(logits_fn, x, y, key, threat, steps=a.steps,
                             step_size=None if a.step_size <= 0 else a.step_size, loss=a.loss,
                             restarts=a.restarts, random_start=a.random_start)
        logits = logits_fn(jax.lax.stop_gradient(xa))
        return (optax.softmax_cross_entropy_with_integer_labels(logits, y),
                jnp.argmax(logits, -1) == y)

    return jax.jit(f)


class InstanceEvaluator:
    """Callback: per-instance loss/correctness on a fixed set of examples every ``every_steps`` (and
    at the last step), appended to ``RUN/instance_eval/<tag>.npz``; group means to
    ``RUN/groups.jsonl`` when ``groups`` (N,) (G0..G9 of the examples, −1 = none) is given."""

    def __init__(self, workdir: str, tag: str, eval_fn, images, labels, index, num_indices: int,
                 every_steps: int, total_steps: int, batch_size: int, seed: int,
                 groups: Optional[np.ndarray] = None):
        self.workdir, self.tag, self.fn = workdir, tag, eval_fn
        self.images, self.labels, self.index = images, labels, np.asarray(index)
        self.num_indices = int(num_indices)
        self.every, self.total, self.bs = max(int(every_steps), 1), int(total_steps), int(batch_size)
        self.key = jax.random.PRNGKey(seed + 4241)
        self.groups = groups

    def evaluate(self, variables, step: int) -> Tuple[np.ndarray, np.ndarray]:
        n = len(self.labels)
        losses, correct = [], []
        for i, s in enumerate(range(0, n, self.bs)):
            x, y = self.images[s:s + self.bs], self.labels[s:s + self.bs]
            pad = self.bs - len(y)
            if pad:  # static shapes: pad with the first example, drop afterwards
                x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
                y = np.concatenate([y, np.repeat(y[:1], pad, 0)])
            l, c = self.fn(variables, x, y, jax.random.fold_in(jax.random.fold_in(self.key, step), i))
            losses.append(np.asarray(l)[:self.bs - pad])
            correct.append(np.asarray(c)[:self.bs - pad])
        return np.concatenate(losses), np.concatenate(correct)

    def _append(self, step: int, loss: np.ndarray, correct: np.ndarray) -> None:
        from jaxrobust.analysis.difficulty import instance_eval_path
        path = instance_eval_path(self.workdir, self.tag)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        steps, L, C = np.zeros((0,), np.int64), np.zeros((0, len(loss)), np.float32), \
            np.zeros((0, len(loss)), bool)
        if os.path.exists(path):
            with np.load(path) as z:
                keep = z["steps"] < step  # a resumed run replaces evaluations past its checkpoint
                steps, L, C = z["steps"][keep], z["loss"][keep], z["correct"][keep]
        steps = np.concatenate([steps, [step]])
        L = np.concatenate([L, loss[None].astype(np.float32)])
        C = np.concatenate([C, correct[None]])
        tmp = path + ".tmp.npz"
        np.savez_compressed(tmp, steps=steps, loss=L, correct=C, index=self.index,
                            num_indices=np.int64(self.num_indices))
        os.replace(tmp, path)

    def __call__(self, step: int, state) -> bool:
        if step % self.every and step != self.total:
            return False
        loss, correct = self.evaluate(state.variables(), step)
        if jax.process_index() == 0:
            self._append(step, loss, correct)
            if self.groups is not None:
                from jaxrobust.analysis.difficulty import group_means
                rec = {"step": int(step), "source": self.tag,
                       "loss": [None if np.isnan(v) else float(v) for v in
                                group_means(loss, self.groups)],
                       "accuracy": [None if np.isnan(v) else float(v) for v in
                                    group_means(correct.astype(np.float64), self.groups)]}
                with open(os.path.join(self.workdir, "groups.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
        return False

    def close(self):
        pass


def _source_split(setup, dataset: str, split: str):
    ds = setup.dataset
    if dataset and dataset != ds.info.name:
        from jaxrobust import data as jdata
        d = setup.config.data
        other = jdata.load_dataset(dataset, data_dir=d.data_dir or None,
                                   pixel_range=tuple(d.pixel_range))
        if other.info.image_shape != ds.info.image_shape:
            raise ValueError(f"train.instance_eval: {dataset!r} has images of shape "
                             f"{other.info.image_shape}, the run's data {ds.info.image_shape}.")
        return other.split(split)
    return ds.split(split)


def callbacks_from_config(config, workdir: Optional[str], setup) -> List[Any]:
    """The difficulty recorder and per-instance evaluators the config asks for (``[]`` when off)."""
    out: List[Any] = []
    if workdir is None:
        return out
    if config.train.difficulty.enabled:
        train_split = setup.dataset.split("train")
        out.append(DifficultyRecorder(workdir, train_split.dataset_indices, setup.num_indices,
                                      setup.steps_per_epoch, setup.total_steps,
                                      {"objective": config.objective.name,
                                       "quantity": "per-example loss of the objective's training "
                                                   "forward pass"}))
    ie = config.train.instance_eval
    if ie.sources:
        if ie.every_epochs <= 0:
            raise ValueError(f"train.instance_eval.every_epochs must be > 0, got {ie.every_epochs}.")
        every = max(int(round(ie.every_epochs * setup.steps_per_epoch)), 1)
        ref = None
        if ie.groups_reference:
            from jaxrobust.analysis.difficulty import difficulty_groups, load_difficulty
            ref = difficulty_groups(load_difficulty(ie.groups_reference))
        for spec in ie.sources:
            dataset, split, kind = parse_source(spec)
            sp = _source_split(setup, dataset, split)
            n = len(sp) if ie.num_examples <= 0 else min(int(ie.num_examples), len(sp))
            pos = np.arange(len(sp)) if n == len(sp) else \
                np.sort(np.random.default_rng(int(ie.seed)).choice(len(sp), n, replace=False))
            b = sp.get(pos)
            num_indices = int(np.max(sp.dataset_indices)) + 1
            groups = None
            if ref is not None and split == "train" and not dataset:
                groups = np.where(b["index"] < len(ref), ref[np.minimum(b["index"], len(ref) - 1)], -1)
            fn = make_instance_eval_fn(setup.model, setup.threat, kind, config.eval.attack)
            tag = (dataset + "@" if dataset else "") + f"{split}:{kind}"
            out.append(InstanceEvaluator(workdir, tag, fn, b["image"], b["label"], b["index"],
                                         num_indices, every, setup.total_steps,
                                         config.data.eval_batch_size, config.seed, groups))
    return out


__all__ = ["with_difficulty", "reports_per_example", "check_difficulty_support", "DifficultyRecorder",
           "InstanceEvaluator", "make_instance_eval_fn", "parse_source", "callbacks_from_config",
           "SUM_NAMES", "EVAL_KINDS"]
