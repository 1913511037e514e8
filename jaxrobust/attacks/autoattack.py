"""Robustness evaluation with an ensemble of attacks, AutoAttack-style (Croce & Hein 2020).

``evaluate_robustness`` runs a list of attacks; in ``standard`` mode each attack only sees points that
are still robust after the previous ones (per-point worst case), in ``individual`` mode every attack
runs on all clean-correct points and is reported on its own (thesis Table 4.2). Batches have a fixed
shape (the still-robust points are re-batched on the host and padded), so each attack compiles once.
An interrupted evaluation resumes from ``state_path`` (written atomically after every batch).

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
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.attacks import losses
from jaxrobust.attacks.apgd import apgd, apgd_targeted
from jaxrobust.attacks.fab import fab
from jaxrobust.attacks.pgd import pgd
from jaxrobust.attacks.square import square
from jaxrobust.threat import ThreatModel

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
WHITE_BOX = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t")


def make_attack(name: str, logits_fn, threat: ThreatModel, *, n_iter: int = 100,
                n_queries: int = 5000, pgd_steps: int = 20, pgd_restarts: int = 1,
                n_target_classes: int = 9) -> Callable:
    """A jitted ``(x, y, key) -> x_adv`` for a named attack."""
    table = {
        "pgd": lambda x, y, k: pgd(logits_fn, x, y, k, threat, steps=pgd_steps,
                                   restarts=pgd_restarts, loss="ce"),
        "apgd-ce": lambda x, y, k: apgd(logits_fn, x, y, k, threat, n_iter=n_iter, loss="ce"),
        "apgd-dlr": lambda x, y, k: apgd(logits_fn, x, y, k, threat, n_iter=n_iter, loss="dlr"),
        "apgd-t": lambda x, y, k: apgd_targeted(logits_fn, x, y, k, threat, n_iter=n_iter,
                                                n_target_classes=n_target_classes),
        "fab-t": lambda x, y, k: fab(logits_fn, x, y, k, threat, n_iter=n_iter, targeted=True,
                                     n_target_classes=n_target_classes),
        "square": lambda x, y, k: square(logits_fn, x, y, k, threat, n_queries=n_queries),
    }
    if name not in table:
        raise ValueError(f"Unknown attack {name!r}; available: {sorted(table)}.")
    return jax.jit(table[name])


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


def evaluate_robustness(logits_fn, x, y, key, threat: ThreatModel, *,
                        attacks: Sequence[str] = STANDARD, mode: str = "standard",
                        batch_size: int = 500, state_path: Optional[str] = None,
                        log: Callable = print, **attack_kwargs) -> Dict:
    """Robust accuracy under an ensemble of attacks.

    Args: x (N, ...) numpy/jax inputs; y (N,); ``mode`` 'standard' (sequential worst case) or
    'individual'; ``state_path``: a .npz file to resume an interrupted evaluation.
    Returns a dict with num_examples, clean_accuracy, robust_accuracy (per attack: cumulative in
    standard mode, alone in individual mode), worst_case_robust_accuracy, seconds per attack,
    warnings, robust flags (N,) and worst-case adversarial examples x_adv (N, ...).
    """
    if mode not in ("standard", "individual"):
        raise ValueError(f"mode must be 'standard' or 'individual', got {mode!r}.")
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    threat.validate_inputs(x, y)
    if not np.isscalar(threat.eps) and np.ndim(threat.eps) != 0:
        raise ValueError("evaluate_robustness needs a scalar eps (batches are re-formed).")
    n = len(x)
    clean = np.zeros(n, bool)
    for s in range(0, n, batch_size):
        clean[s:s + batch_size] = np.asarray(jnp.argmax(logits_fn(x[s:s + batch_size]), -1)) == y[s:s + batch_size]
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
        fn = make_attack(name, logits_fn, threat, **attack_kwargs)
        todo = state["todo"]
        t0 = time.time()
        starts = list(range(0, len(todo), batch_size))
        for bi in range(int(state["batch_pos"]), len(starts)):
            idx = todo[starts[bi]:starts[bi] + batch_size]
            pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
            k = jax.random.fold_in(jax.random.fold_in(key, a), bi)
            xa = np.asarray(fn(jnp.asarray(x[pad]), jnp.asarray(y[pad]), k))[:len(idx)]
            still = np.asarray(jnp.argmax(logits_fn(jnp.asarray(xa)), -1)) == y[idx]
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
        s = attacks.index("square")
        wb = [i for i, nme in enumerate(attacks) if nme in WHITE_BOX]
        if wb:
            if mode == "standard" and s > max(wb):
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
