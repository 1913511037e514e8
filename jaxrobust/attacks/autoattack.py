"""Robustness evaluation with an ensemble of attacks, AutoAttack-style (Croce & Hein 2020).

``evaluate_robustness`` runs a list of attacks; in ``standard`` mode each attack only sees points that
are still robust after the previous ones (per-point worst case), in ``individual`` mode every attack
runs on all clean-correct points and is reported on its own (thesis Table 4.2). Batches have a fixed
shape (the still-robust points are re-batched on the host and padded), so each attack compiles once.
An interrupted evaluation resumes from ``state_path`` (written atomically after every batch).

Everything is validated before the first attack runs (labels, shapes, box, and what each attack
supports). Compiled attacks are cached per ``logits_fn`` (by identity, weakly) and attack settings;
the threat model is a traced argument, so evaluating the same ``logits_fn`` again (another data
subset, another ε of the same norm) reuses the compiled programs. The targeted attacks (APGD-T,
FAB-T) loop over their target classes on the host around one compiled single-target attack, which
gives the same result as :func:`apgd_targeted` / :func:`fab` with the same key, compiles FAB once
instead of once per target, and lets progress (rate, ETA) be reported per target class.

Warnings mirror AutoAttack's checks: a randomised model (two forward passes differ), outputs that look
like probabilities instead of logits, zero input gradients, and Square beating the white-box attacks
by more than 0.2% (possible gradient masking).

Attacks available: 'pgd' (CE, ``pgd_steps``), 'apgd-ce', 'apgd-dlr', 'apgd-t' (targeted DLR, 9
targets), 'fab-t' (targeted FAB, 9 targets), 'square' (``n_queries``). ``STANDARD`` is AutoAttack's
standard version: APGD-CE, APGD-T, FAB-T, Square-5000.
"""
from __future__ import annotations

import os
import time
import weakref
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.attacks import losses
from jaxrobust.attacks.apgd import apgd, apgd_targeted, top_k_targets
from jaxrobust.attacks.common import check_attack_inputs
from jaxrobust.attacks.fab import fab, fab_run, fab_select
from jaxrobust.attacks.pgd import pgd
from jaxrobust.attacks.square import square
from jaxrobust.threat import ThreatModel

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
WHITE_BOX = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t")
ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
PER_TARGET = ("apgd-t", "fab-t")
DEFAULT_SETTINGS = {"n_iter": 100, "n_queries": 5000, "pgd_steps": 20, "pgd_restarts": 1,
                    "n_target_classes": 9, "pgd_step_size": 0.0}
FLOAT_SETTINGS = ("pgd_step_size",)  # PGD's step in input units; <= 0: 2.5 ε / pgd_steps

# logits_fn -> {(what, settings...): jitted function}. Weak keys: the cached functions only hold a
# weak reference to logits_fn, so an entry disappears with its model function.
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _settings(attack_kwargs) -> Dict[str, Any]:
    unknown = sorted(set(attack_kwargs) - set(DEFAULT_SETTINGS))
    if unknown:
        raise TypeError(f"Unknown attack settings {unknown}; expected some of {sorted(DEFAULT_SETTINGS)}.")
    s = dict(DEFAULT_SETTINGS, **attack_kwargs)
    for k, v in s.items():
        if k in FLOAT_SETTINGS:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v):
                raise ValueError(f"Attack setting {k} must be a finite number, got {v!r}.")
            s[k] = float(v)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"Attack setting {k} must be a positive int, got {v!r}.")
        s[k] = int(v)
    return s


def _build(what: str, fref, s: Dict[str, int], num_classes: int) -> Callable:
    """A jitted function for one piece of an attack; ``threat`` is always a traced argument."""
    f = lambda z: fref()(z)  # noqa: E731  (the model is looked up at trace time)
    n_t = min(s["n_target_classes"], num_classes - 1)
    if what == "pgd":
        step = s["pgd_step_size"] if s["pgd_step_size"] > 0 else None
        fn = lambda x, y, k, t: pgd(f, x, y, k, t, steps=s["pgd_steps"], restarts=s["pgd_restarts"],
                                    loss="ce", step_size=step)
    elif what == "apgd-ce":
        fn = lambda x, y, k, t: apgd(f, x, y, k, t, n_iter=s["n_iter"], loss="ce")
    elif what == "apgd-dlr":
        fn = lambda x, y, k, t: apgd(f, x, y, k, t, n_iter=s["n_iter"], loss="dlr")
    elif what == "apgd-t":  # the whole attack (make_attack)
        fn = lambda x, y, k, t: apgd_targeted(f, x, y, k, t, n_iter=s["n_iter"],
                                              n_target_classes=s["n_target_classes"])
    elif what == "fab-t":
        fn = lambda x, y, k, t: fab(f, x, y, k, t, n_iter=s["n_iter"], targeted=True,
                                    n_target_classes=s["n_target_classes"])
    elif what == "square":
        fn = lambda x, y, k, t: square(f, x, y, k, t, n_queries=s["n_queries"])
    elif what == "predict":
        fn = lambda x: jnp.argmax(f(x), -1)
    elif what == "targets":  # clean predictions and the top-n_t other classes (n_t, B)
        def fn(x):
            logits = f(x)
            return jnp.argmax(logits, -1), top_k_targets(logits, n_t)
    elif what == "apgd-t/one":  # one target class of APGD-T, as inside apgd_targeted
        def fn(x, y, target, k, t):
            xa = apgd(f, x, y, k, t, n_iter=s["n_iter"], loss="dlr", targeted=True, y_target=target)
            return xa, jnp.argmax(f(xa), -1)
    elif what == "fab-t/one":  # one (target, restart) run of FAB-T, as inside fab
        fn = lambda x, y, target, k, t: fab_run(f, x, y, t, target, k, n_iter=s["n_iter"], n_restarts=1,
                                                num_classes=num_classes)
    elif what == "fab-t/select":
        fn = lambda x, t, best, best_norm, clean_wrong: fab_select(x, t, best, best_norm, clean_wrong)[0]
    else:
        raise ValueError(f"Unknown attack {what!r}; available: {list(ATTACKS)}.")
    return jax.jit(fn)


def _compiled(logits_fn, what: str, s: Dict[str, int], num_classes: int) -> Callable:
    """The cached jitted piece ``what`` for ``logits_fn`` (built on first use)."""
    key = (what, num_classes) + tuple(sorted(s.items()))
    try:
        table = _COMPILED.setdefault(logits_fn, {})
    except TypeError:  # not weak-referenceable or not hashable: no caching
        return _build(what, lambda: logits_fn, s, num_classes)
    if key not in table:
        table[key] = _build(what, weakref.ref(logits_fn), s, num_classes)
    return table[key]


def _scalar_eps_threat(threat: ThreatModel) -> ThreatModel:
    """ε as a float32 0-d array: one traced aval for every ε (no recompile when ε changes)."""
    return threat.replace(eps=jnp.asarray(threat.eps, jnp.float32))


def make_attack(name: str, logits_fn, threat: ThreatModel, *, n_iter: int = 100,
                n_queries: int = 5000, pgd_steps: int = 20, pgd_restarts: int = 1,
                n_target_classes: int = 9, pgd_step_size: float = 0.0) -> Callable:
    """A jitted ``(x, y, key) -> x_adv`` for a named attack (compiled pieces cached per logits_fn)."""
    if name not in ATTACKS:
        raise ValueError(f"Unknown attack {name!r}; available: {sorted(ATTACKS)}.")
    s = _settings(dict(n_iter=n_iter, n_queries=n_queries, pgd_steps=pgd_steps,
                       pgd_restarts=pgd_restarts, n_target_classes=n_target_classes,
                       pgd_step_size=pgd_step_size))
    th = _scalar_eps_threat(threat)

    def attack(x, y, k):
        k_classes = jax.eval_shape(logits_fn, x).shape[-1]
        return _compiled(logits_fn, name, s, k_classes)(x, y, k, th)
    return attack


def sanity_warnings(logits_fn, x, y) -> list:
    """AutoAttack's checks on a few points: randomness, probabilities, zero gradients."""
    out = []
    z1, z2 = logits_fn(x), logits_fn(x)
    if not np.allclose(np.asarray(z1), np.asarray(z2)):
        out.append("The model is randomised (two forward passes differ): use EOT / the 'rand' "
                   "version; deterministic attacks will overestimate robustness.")
    z = np.asarray(z1)
    if np.all(z >= 0) and np.all(z <= 1) and np.allclose(z.sum(-1), 1.0, atol=1e-4):
        out.append("The outputs look like probabilities (rows sum to 1): attacks expect logits; "
                   "CE on softmax outputs can hide gradients.")
    g = jax.grad(lambda v: jnp.sum(losses.ce(logits_fn(v), y)))(x)
    zero = np.mean(np.all(np.asarray(g).reshape(len(x), -1) == 0, axis=1))
    if zero > 0:
        out.append(f"Input gradients are exactly zero for {100 * zero:.1f}% of the points: "
                   "possible gradient masking; trust gradient-free attacks (Square) more.")
    return out


def _save_state(path, state):
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{k: (np.asarray(v) if not isinstance(v, str) else np.asarray(v))
                     for k, v in state.items()})
    os.replace(tmp, path)


def _load_state(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


class _Progress:
    """Rate and ETA of one attack, logged at most every ``interval`` seconds (and at the first and
    last unit), like the training and certification progress lines."""

    def __init__(self, name: str, total: int, unit: str, log: Callable, enabled: bool,
                 interval: float = 10.0):
        self.name, self.total, self.unit, self.log, self.enabled = name, total, unit, log, enabled
        self.interval, self.t0, self.last = interval, time.time(), -np.inf

    def update(self, done: int, extra: str = ""):
        now = time.time()
        if not self.enabled or not (done in (1, self.total) or now - self.last >= self.interval):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
        self.log(f"[{self.name} {done}/{self.total} {self.unit}] {100 * done / max(self.total, 1):.0f}% "
                 f"| {rate:.2f} {self.unit}/s | ETA {eta_s}{' | ' + extra if extra else ''}")


def _validate(logits_fn, x, y, threat, attacks, mode, batch_size, log) -> int:
    """Every check of evaluate_robustness, before any attack runs; returns the number of classes."""
    if mode not in ("standard", "individual"):
        raise ValueError(f"mode must be 'standard' or 'individual', got {mode!r}.")
    if isinstance(attacks, str) or not len(attacks):
        raise ValueError(f"attacks must be a non-empty sequence of names from {list(ATTACKS)}, "
                         f"got {attacks!r}.")
    for name in attacks:
        if name not in ATTACKS:
            raise ValueError(f"Unknown attack {name!r}; available: {sorted(ATTACKS)}.")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks must not repeat a name, got {list(attacks)}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not callable(log):
        raise TypeError(f"log must be callable (e.g. print), got {type(log).__name__}.")
    if np.ndim(threat.eps) != 0:
        raise ValueError("evaluate_robustness needs a scalar eps (batches are re-formed).")
    num_classes = check_attack_inputs(logits_fn, x, y, threat, name="evaluate_robustness")
    if len(x) == 0:
        raise ValueError("evaluate_robustness needs at least one example, got x of shape "
                         f"{tuple(x.shape)}.")
    if "square" in attacks:
        if threat.norm not in ("linf", "l2"):
            raise ValueError(f"Square attack supports 'linf' and 'l2', got {threat.norm!r}: "
                             "drop 'square' from attacks.")
        if x.ndim not in (2, 4) or int(np.prod(x.shape[1:])) < 2:
            raise ValueError(f"Square attack needs NHWC images (N, H, W, C) or flat vectors (N, d), "
                             f"got shape {x.shape}.")
    if threat.per_feature_eps is not None:
        bad = [a for a in attacks if a in ("fab-t", "square")]
        if bad:
            raise ValueError(f"{bad} do not support per-feature eps.")
        if np.ndim(threat.per_feature_eps) != x.ndim - 1:
            raise ValueError("evaluate_robustness needs per_feature_eps of one input's shape "
                             f"{x.shape[1:]} (batches are re-formed).")
    return num_classes


def _run_attack(name, logits_fn, xb, yb, k, threat, s, num_classes, progress, unit0, n_real):
    """One attack on one fixed-shape batch; returns x_adv (numpy). Per-target attacks loop over
    their targets here (same keys and selection as apgd_targeted / fab) and report progress."""
    if name not in PER_TARGET:
        out = np.asarray(_compiled(logits_fn, name, s, num_classes)(xb, yb, k, threat))
        progress.update(unit0 + 1)
        return out
    pred, targets = _compiled(logits_fn, "targets", s, num_classes)(xb)
    n_t = targets.shape[0]
    y_np = np.asarray(yb)
    best = np.asarray(xb)
    if name == "apgd-t":
        one = _compiled(logits_fn, "apgd-t/one", s, num_classes)
        keys = jax.random.split(k, n_t)
        robust = np.asarray(pred) == y_np
        for j in range(n_t):
            xa, pa = one(xb, yb, targets[j], keys[j], threat)
            broke = robust & (np.asarray(pa) != y_np)
            best = np.where(broke.reshape((-1,) + (1,) * (best.ndim - 1)), np.asarray(xa), best)
            robust &= ~broke
            progress.update(unit0 + j + 1, f"target {j + 1}/{n_t}: {int(robust[:n_real].sum())} robust")
        return best
    one = _compiled(logits_fn, "fab-t/one", s, num_classes)
    keys = jax.random.split(k, s["n_target_classes"])  # as fab with n_restarts=1
    best_norm = np.full(len(y_np), np.inf, np.float32)
    for j in range(n_t):
        bx, bn = one(xb, yb, targets[j], keys[j], threat)
        bn = np.asarray(bn)
        better = bn < best_norm
        best = np.where(better.reshape((-1,) + (1,) * (best.ndim - 1)), np.asarray(bx), best)
        best_norm = np.where(better, bn, best_norm)
        progress.update(unit0 + j + 1, f"target {j + 1}/{n_t}: "
                                       f"{int(np.sum(best_norm[:n_real] <= float(threat.eps) * (1 + 1e-5)))} broken")
    select = _compiled(logits_fn, "fab-t/select", s, num_classes)
    return np.asarray(select(xb, threat, jnp.asarray(best), jnp.asarray(best_norm),
                             np.asarray(pred) != y_np))


def evaluate_robustness(logits_fn, x, y, key, threat: ThreatModel, *,
                        attacks: Sequence[str] = STANDARD, mode: str = "standard",
                        batch_size: int = 500, state_path: Optional[str] = None,
                        log: Callable = print, verbose: bool = True, **attack_kwargs) -> Dict:
    """Robust accuracy under an ensemble of attacks.

    Args: x (N, ...) numpy/jax inputs in the box (images (N, H, W, C) or vectors (N, d)); y (N,)
    int labels in [0, K); ``mode`` 'standard' (sequential worst case) or 'individual';
    ``state_path``: a .npz file to resume an interrupted evaluation; ``log``: where the per-attack
    summaries, warnings and progress go; ``verbose=False`` silences the progress lines (rate and ETA
    per batch, and per target class for APGD-T / FAB-T); attack settings ``n_iter``, ``n_queries``,
    ``pgd_steps``, ``pgd_restarts``, ``pgd_step_size`` (input units; <= 0: 2.5 ε / steps),
    ``n_target_classes``.
    Returns a dict with num_examples, clean_accuracy, robust_accuracy (per attack: cumulative in
    standard mode, alone in individual mode), worst_case_robust_accuracy, seconds per attack,
    warnings, robust flags (N,) and worst-case adversarial examples x_adv (N, ...).
    """
    s = _settings(attack_kwargs)
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer):
        y = y.astype(np.int32)
    num_classes = _validate(logits_fn, x, y, threat, attacks, mode, batch_size, log)
    th = _scalar_eps_threat(threat)
    n = len(x)
    predict = _compiled(logits_fn, "predict", s, num_classes)

    def padded(idx):
        return np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])

    clean = np.zeros(n, bool)
    for st in range(0, n, batch_size):
        idx = np.arange(st, min(st + batch_size, n))
        clean[idx] = np.asarray(predict(jnp.asarray(x[padded(idx)])))[:len(idx)] == y[idx]
    state = {"robust": clean.copy(), "x_adv": x.copy(), "attack_pos": np.int64(0),
             "batch_pos": np.int64(0), "todo": np.flatnonzero(clean),
             "individual_robust": np.zeros((len(attacks), n), bool),
             "seconds": np.zeros(len(attacks))}
    if state_path and os.path.exists(state_path):
        state.update(_load_state(state_path))
        log(f"Resuming evaluation from {state_path}: attack {int(state['attack_pos'])}, "
            f"batch {int(state['batch_pos'])}.")
    warnings = sanity_warnings(logits_fn, jnp.asarray(x[:min(n, 32)]), jnp.asarray(y[:min(n, 32)]))
    for w in warnings:
        log("WARNING: " + w)

    for a in range(int(state["attack_pos"]), len(attacks)):
        name = attacks[a]
        todo = state["todo"]
        t0 = time.time()
        starts = list(range(0, len(todo), batch_size))
        per_batch = min(s["n_target_classes"], num_classes - 1) if name in PER_TARGET else 1
        b_first = int(state["batch_pos"])
        progress = _Progress(name, (len(starts) - b_first) * per_batch,
                             "targets" if name in PER_TARGET else "batches", log, verbose)
        for bi in range(b_first, len(starts)):
            idx = todo[starts[bi]:starts[bi] + batch_size]
            pad = padded(idx)
            k = jax.random.fold_in(jax.random.fold_in(key, a), bi)
            xa = _run_attack(name, logits_fn, jnp.asarray(x[pad]), jnp.asarray(y[pad]), k, th, s,
                             num_classes, progress, (bi - b_first) * per_batch, len(idx))[:len(idx)]
            still = np.asarray(predict(jnp.asarray(xa[padded(np.arange(len(idx)))])))[:len(idx)] == y[idx]
            if not np.all(threat.contains(jnp.asarray(x[idx]), jnp.asarray(xa))):
                raise RuntimeError(f"attack {name} returned points outside the threat model")
            if mode == "standard":
                broke = idx[~still]
                state["robust"][broke] = False
                state["x_adv"][broke] = xa[~still]
            else:
                state["individual_robust"][a][idx[still]] = True
                first = idx[~still & state["robust"][idx]]
                state["x_adv"][first] = xa[~still & state["robust"][idx]]
                state["robust"][idx[~still]] = False
            state["batch_pos"] = np.int64(bi + 1)
            state["seconds"][a] += time.time() - t0
            t0 = time.time()
            if state_path:
                _save_state(state_path, state)
        acc = (state["robust"].mean() if mode == "standard" else state["individual_robust"][a].mean())
        state["attack_pos"] = np.int64(a + 1)
        state["batch_pos"] = np.int64(0)
        state["todo"] = np.flatnonzero(state["robust"]) if mode == "standard" else np.flatnonzero(clean)
        if mode == "standard":
            state["individual_robust"][a] = state["robust"]
        if state_path:
            _save_state(state_path, state)  # before reporting: a kill now never redoes this attack
        log(f"[{name}] robust accuracy {100 * acc:.2f}% ({state['seconds'][a]:.1f}s)")

    per_attack = {name: float(state["individual_robust"][a].mean()) for a, name in enumerate(attacks)}
    # Gradient-masking check: Square doing better than every white-box attack.
    if "square" in attacks:
        sq = attacks.index("square")
        wb = [i for i, nme in enumerate(attacks) if nme in WHITE_BOX]
        if wb:
            if mode == "standard" and sq > max(wb):
                gap = per_attack[attacks[max(wb)]] - per_attack["square"]
            else:
                gap = min(per_attack[attacks[i]] for i in wb) - per_attack["square"]
            if gap > 0.002:
                warnings.append(f"Square lowered robust accuracy by {100 * gap:.2f}% beyond the "
                                "white-box attacks: possible gradient masking.")
                log("WARNING: " + warnings[-1])
    return {"num_examples": n, "clean_accuracy": float(clean.mean()), "mode": mode,
            "robust_accuracy": per_attack,
            "worst_case_robust_accuracy": float(state["robust"].mean()),
            "seconds": {name: float(state["seconds"][a]) for a, name in enumerate(attacks)},
            "warnings": warnings, "robust": state["robust"], "x_adv": state["x_adv"]}
