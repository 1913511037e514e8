"""Training monitors: callbacks ``(step, state) -> stop`` for :func:`jaxrobust.train.train`.

:class:`CatastrophicOverfittingMonitor` watches for catastrophic overfitting of single-step adversarial
training (Wong et al. 2020; thesis §5.2.2): every ``every_steps`` it measures clean, FGSM and PGD
accuracy of the current weights on a fixed held-out batch. Catastrophic overfitting shows as the PGD
accuracy collapsing while the FGSM accuracy (the attack the model is trained against) rises: a
*collapse* is recorded when the PGD accuracy is more than ``drop`` (0.2 = 20 points) below the best
PGD accuracy seen so far while the FGSM accuracy is above its value at that best check
(``collapse_drop``), or, when ``gap`` > 0, when the FGSM accuracy exceeds the PGD accuracy by more
than ``gap`` (``collapse_gap``: a run that overfits before its PGD accuracy ever rose, as FGSM-RS at
ε = 0.3 on MNIST does from the first epoch). Each check is written to ``metrics.jsonl`` (split
``'monitor'``: clean/fgsm/pgd accuracy, ``fgsm_pgd_gap``, ``collapse`` 0/1 and its reasons); a
collapse also raises a :class:`CatastrophicOverfittingWarning` and is kept in
``WORKDIR/co_monitor.json`` (with ``num_collapses``, ``first_collapse_step`` and ``seconds``, the
wall time the checks took: part of the run's ``train_seconds``). With ``keep_best`` the state of the best PGD accuracy is checkpointed in
``WORKDIR/best_pgd`` (the last good weights before a collapse; load it with
``Checkpointer(os.path.join(workdir, 'best_pgd')).restore(...)`` or
``load_trained(os.path.join(workdir, 'best_pgd'))`` after copying config.json). ``stop_on_collapse``
stops the run at the first collapse.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import attacks
from jaxrobust.threat import ThreatModel
from jaxrobust.train.checkpoint import Checkpointer
from jaxrobust.train.metrics import MetricWriter


class CatastrophicOverfittingWarning(UserWarning):
    """PGD accuracy collapsed while FGSM accuracy rose (catastrophic overfitting)."""


def _accuracies(model, threat: ThreatModel, pgd_steps: int, pgd_restarts: int):
    """(variables, x, y, key) -> (clean, fgsm, pgd) accuracy, jitted once."""
    def fn(variables, x, y, key):
        logits_fn = lambda z: model.apply(variables, z, train=False)
        correct = lambda z: (jnp.argmax(logits_fn(z), -1) == y)
        clean = correct(x)
        x_fgsm = attacks.fgsm(logits_fn, x, y, key, threat)
        x_pgd = attacks.pgd(logits_fn, x, y, key, threat, steps=pgd_steps, restarts=pgd_restarts)
        mean = lambda c: jnp.mean(c.astype(jnp.float32))
        return mean(clean), mean(clean & correct(x_fgsm)), mean(clean & correct(x_pgd))
    return jax.jit(fn)


class CatastrophicOverfittingMonitor:
    """A training callback; see the module docstring.

    Args: ``model``; ``threat`` (the training threat model); ``images``/``labels``: the fixed held-out
    batch; ``every_steps``: check period (one epoch); ``workdir``: where metrics, warnings and the
    ``best_pgd`` checkpoint go (None: nothing written); ``drop``: collapse threshold in accuracy
    (fraction, 0.2 = 20 points); ``pgd_steps``/``pgd_restarts``; ``keep_best``; ``stop_on_collapse``.
    """

    def __init__(self, model, threat: ThreatModel, images, labels, *, every_steps: int,
                 workdir: Optional[str] = None, drop: float = 0.2, pgd_steps: int = 10,
                 pgd_restarts: int = 1, keep_best: bool = True, stop_on_collapse: bool = False,
                 seed: int = 0, gap: float = 0.0):
        if not isinstance(every_steps, (int, np.integer)) or every_steps < 1:
            raise ValueError(f"every_steps must be an integer >= 1, got {every_steps!r}.")
        if not 0.0 < float(drop) <= 1.0:
            raise ValueError(f"drop must be in (0, 1] (a fraction of accuracy), got {drop!r}.")
        images, labels = np.asarray(images, np.float32), np.asarray(labels)
        if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise ValueError(f"images and labels must be a non-empty batch of equal length, got "
                             f"{images.shape} and {labels.shape}.")
        self.images, self.labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
        if not 0.0 <= float(gap) <= 1.0:
            raise ValueError(f"gap must be in [0, 1] (0 = off), got {gap!r}.")
        self.every_steps, self.drop, self.gap = int(every_steps), float(drop), float(gap)
        self.workdir, self.keep_best, self.stop_on_collapse = workdir, keep_best, stop_on_collapse
        self.key = jax.random.PRNGKey(seed + 104729)
        self._acc = _accuracies(model, threat, int(pgd_steps), int(pgd_restarts))
        self.history: List[Dict[str, Any]] = []
        self.collapses: List[Dict[str, Any]] = []
        self.best: Optional[Dict[str, Any]] = None
        self.seconds = 0.0  # wall time spent in checks (and best-PGD checkpoints), over resumes
        self._writer = MetricWriter(workdir, tensorboard=False) if workdir else None
        self._ckpt = None
        self._load_record()

    # --------------------------------------------------------------------- persistence
    @property
    def record_path(self):
        return None if self.workdir is None else os.path.join(self.workdir, "co_monitor.json")

    def _load_record(self):
        """A resumed run continues from the stored best/collapses (so a collapse across a resume is
        still detected)."""
        p = self.record_path
        if p and os.path.exists(p):
            with open(p) as f:
                rec = json.load(f)
            self.best, self.collapses = rec.get("best"), rec.get("collapses", [])
            self.history = rec.get("history", [])
            self.seconds = float(rec.get("seconds", 0.0))

    def _save_record(self):
        p = self.record_path
        if not p or jax.process_index() != 0:
            return
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"best": self.best, "num_collapses": len(self.collapses),
                       "first_collapse_step": self.collapses[0]["step"] if self.collapses else None,
                       "seconds": self.seconds,
                       "collapses": self.collapses, "history": self.history}, f, indent=2)
        os.replace(tmp, p)

    def _save_best(self, step, state):
        if not (self.keep_best and self.workdir):
            return
        if self._ckpt is None:
            d = os.path.join(self.workdir, "best_pgd")
            self._ckpt = Checkpointer(d, keep=1)
            cfg = os.path.join(self.workdir, "config.json")
            if os.path.exists(cfg) and jax.process_index() == 0:  # so load_trained(best_pgd) works
                shutil.copyfile(cfg, os.path.join(d, "config.json"))
        self._ckpt.save(step, state.checkpoint_tree(), force=True)
        self._ckpt.wait()

    # --------------------------------------------------------------------- the check
    def check(self, step: int, variables) -> Dict[str, Any]:
        """Measures the accuracies at ``step`` and updates best / collapse state. Returns the record."""
        clean, fgsm, pgd = (float(v) for v in jax.device_get(self._acc(
            variables, self.images, self.labels, jax.random.fold_in(self.key, step))))
        rec = {"step": int(step), "clean_accuracy": clean, "fgsm_accuracy": fgsm,
               "pgd_accuracy": pgd, "fgsm_pgd_gap": fgsm - pgd}
        b = self.best
        by_drop = b is not None and b["pgd_accuracy"] - pgd > self.drop and fgsm > b["fgsm_accuracy"]
        by_gap = self.gap > 0 and fgsm - pgd > self.gap
        rec.update(collapse=int(by_drop or by_gap), collapse_drop=int(by_drop),
                   collapse_gap=int(by_gap))
        if rec["collapse"]:
            self.collapses.append(rec)
            why = []
            if by_drop:
                why.append(f"PGD accuracy {pgd:.3f} is {b['pgd_accuracy'] - pgd:.3f} below its best "
                           f"{b['pgd_accuracy']:.3f} (step {b['step']}) while FGSM accuracy rose "
                           f"{b['fgsm_accuracy']:.3f} -> {fgsm:.3f}")
            if by_gap:
                why.append(f"FGSM accuracy {fgsm:.3f} exceeds PGD accuracy {pgd:.3f} by more than "
                           f"{self.gap:.2f}")
            warnings.warn(
                f"catastrophic overfitting at step {step}: {'; '.join(why)}; the best-PGD state is "
                f"kept in {os.path.join(self.workdir or '.', 'best_pgd')}.",
                CatastrophicOverfittingWarning, stacklevel=2)
        rec["new_best"] = int(b is None or pgd > b["pgd_accuracy"])
        if rec["new_best"]:
            self.best = {k: rec[k] for k in ("step", "clean_accuracy", "fgsm_accuracy",
                                             "pgd_accuracy")}
        self.history.append(rec)
        if self._writer is not None:
            self._writer.write(step, "monitor", {k: v for k, v in rec.items() if k != "step"})
        return rec

    def __call__(self, step: int, state) -> bool:
        if step % self.every_steps:
            return False
        t = time.perf_counter()
        rec = self.check(step, state.variables())
        if rec["new_best"]:
            self._save_best(step, state)
        self.seconds += time.perf_counter() - t
        self._save_record()
        return bool(rec["collapse"] and self.stop_on_collapse)

    @property
    def collapsed(self) -> bool:
        return bool(self.collapses)

    def close(self):
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None
        if self._writer is not None:
            self._writer.close()


def monitors_from_config(config, workdir: Optional[str], setup) -> list:
    """The monitors ``config.train.monitor`` asks for (``[]`` when disabled), for a
    :class:`~jaxrobust.train.loop.RunSetup` ``setup``: the held-out batch is the first
    ``num_examples`` of ``monitor.split`` ('' = 'val' if present else 'test'), checked every
    ``every_epochs`` epochs, at the training threat model."""
    m = config.train.monitor
    if not m.enabled:
        return []
    ds = setup.dataset
    split = m.split or ("val" if "val" in ds.splits else "test")
    if split not in ds.splits:
        raise ValueError(f"train.monitor.split {split!r} is not a split of {ds.info.name!r} "
                         f"(has {sorted(ds.splits)}).")
    if m.every_epochs <= 0:
        raise ValueError(f"train.monitor.every_epochs must be > 0, got {m.every_epochs}.")
    sp = ds.split(split)
    n = len(sp) if m.num_examples <= 0 else min(int(m.num_examples), len(sp))
    batch = sp.get(np.arange(n))
    every = max(int(round(m.every_epochs * setup.steps_per_epoch)), 1)
    return [CatastrophicOverfittingMonitor(
        setup.model, setup.threat, batch["image"], batch["label"], every_steps=every,
        workdir=workdir, drop=m.drop, pgd_steps=m.pgd_steps, pgd_restarts=m.pgd_restarts,
        keep_best=m.keep_best, stop_on_collapse=m.stop_on_collapse, seed=config.seed, gap=m.gap)]


__all__ = ["CatastrophicOverfittingMonitor", "CatastrophicOverfittingWarning", "monitors_from_config"]
