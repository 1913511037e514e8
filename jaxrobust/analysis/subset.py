"""Losses of a model over a fixed data subset, in masked batches (the building block of every
landscape analysis, thesis §4.2.3).

A subset is a dict of stacked batches ``{'image': (nb, bs, *f), 'label': (nb, bs), 'mask': (nb, bs)}``
(:func:`stack_batches`): the last batch is padded and masked, so every function below is jit-able with
static shapes and every example counts exactly once. Losses are *sums* over the valid examples divided
by the subset size N, so the subset loss ``L(θ) = (1/N) Σ_i ℓ_i(θ)`` (eq. 4.1) is the exact sum of the
per-batch terms, and so are its gradient and Hessian-vector products.

The model enters as ``apply_fn(params, x) -> logits (B, K)`` (eval-mode BatchNorm: a fixed function
of the parameters). The adversarial loss ``L_ε`` of eq. 4.1 uses PGD points computed at the
parameters being analysed; they are treated as constants when differentiating (Danskin's theorem for
the gradient; the Hessian is that of the loss at the fixed worst-case points, as in Liu et al. 2020).
``AttackSpec`` describes the PGD attack; ``AttackSpec(eps=0)`` or ``None`` is the clean loss.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrobust import attacks
from jaxrobust.threat import ThreatModel

Batches = Dict[str, jax.Array]
ApplyFn = Callable[[object, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """PGD settings of the adversarial loss (thesis §4.2.3: l_inf PGD; ``step_size`` None = 2.5 ε /
    steps)."""
    threat: ThreatModel
    steps: int = 10
    step_size: Optional[float] = None
    restarts: int = 1
    random_start: bool = True
    loss: str = "ce"

    @property
    def active(self) -> bool:
        return float(self.threat.eps) > 0 and self.steps > 0


def stack_batches(images, labels, batch_size: int) -> Batches:
    """``(N, *f)`` images and ``(N,)`` labels -> stacked batches ``(nb, bs, ...)`` with a mask; the
    last batch is padded with copies of the first example (mask False)."""
    images, labels = np.asarray(images), np.asarray(labels)
    n = images.shape[0]
    if n == 0:
        raise ValueError("the data subset is empty.")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not np.all(np.isfinite(images)):
        raise ValueError("the data subset holds NaN or inf pixels.")
    bs = min(batch_size, n)
    nb = -(-n // bs)
    pad = nb * bs - n
    x = np.concatenate([images, np.repeat(images[:1], pad, 0)]) if pad else images
    y = np.concatenate([labels, np.repeat(labels[:1], pad, 0)]) if pad else labels
    mask = np.arange(nb * bs) < n
    return {"image": jnp.asarray(x.reshape((nb, bs) + images.shape[1:]), jnp.float32),
            "label": jnp.asarray(y.reshape(nb, bs), jnp.int32),
            "mask": jnp.asarray(mask.reshape(nb, bs))}


def subset_size(batches: Batches) -> jax.Array:
    return jnp.sum(batches["mask"])


def attack_inputs(apply_fn: ApplyFn, params, x, y, key, attack: Optional[AttackSpec]):
    """The inputs the loss is evaluated at: ``x`` (clean) or PGD points at ``params`` (constants)."""
    if attack is None or not attack.active:
        return x
    params = jax.lax.stop_gradient(params)
    x_adv = attacks.pgd(lambda z: apply_fn(params, z), x, y, key, attack.threat, steps=attack.steps,
                        step_size=attack.step_size, loss=attack.loss, restarts=attack.restarts,
                        random_start=attack.random_start)
    return jax.lax.stop_gradient(x_adv)


def batch_sums(apply_fn: ApplyFn, params, x, y, mask) -> Tuple[jax.Array, jax.Array]:
    """Sums over the valid examples of the cross-entropy and of the correct predictions."""
    logits = apply_fn(params, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    m = mask.astype(logits.dtype)
    return jnp.sum(ce * m), jnp.sum((jnp.argmax(logits, -1) == y) * m)


def batch_key(key, i):
    """The PGD key of batch ``i``: fixed per batch, so a regenerated attack is the same function of
    the parameters every time it runs (the Hessian operator stays symmetric and deterministic)."""
    return jax.random.fold_in(key, i)


def subset_loss(apply_fn: ApplyFn, params, batches: Batches, key=None,
                attack: Optional[AttackSpec] = None) -> Tuple[jax.Array, jax.Array]:
    """``(L(θ), accuracy)`` over the subset (eq. 4.1; ``attack`` given: L_ε with PGD points generated
    at ``params``). Pure and jit-able."""
    key = jax.random.PRNGKey(0) if key is None else key
    n = jnp.maximum(subset_size(batches), 1)

    def body(carry, inp):
        batch, i = inp
        x = attack_inputs(apply_fn, params, batch["image"], batch["label"], batch_key(key, i), attack)
        s, c = batch_sums(apply_fn, params, x, batch["label"], batch["mask"])
        return (carry[0] + s, carry[1] + c), None

    nb = batches["label"].shape[0]
    (s, c), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), (batches, jnp.arange(nb)))
    return s / n, c / n


def adversarial_batches(apply_fn: ApplyFn, params, batches: Batches, key,
                        attack: Optional[AttackSpec]) -> Batches:
    """The subset with every image replaced by its PGD point at ``params`` (the "fixed" mode: the
    points are generated once and held while the parameters are perturbed / the Hessian is probed)."""
    if attack is None or not attack.active:
        return batches

    @jax.jit
    def run(params, batches, key):
        def body(_, inp):
            batch, i = inp
            return None, attack_inputs(apply_fn, params, batch["image"], batch["label"],
                                       batch_key(key, i), attack)
        nb = batches["label"].shape[0]
        _, xs = jax.lax.scan(body, None, (batches, jnp.arange(nb)))
        return xs

    return {**batches, "image": run(params, batches, key)}


def subset_from_split(split, num_examples: int, batch_size: int, *, seed: int = -1) -> Batches:
    """The first ``num_examples`` examples of a data split (``seed >= 0``: a random subset drawn with
    that seed; ``num_examples <= 0``: the whole split) as stacked masked batches."""
    n_all = len(split)
    n = n_all if num_examples <= 0 else min(int(num_examples), n_all)
    idx = np.arange(n) if seed < 0 else np.sort(np.random.default_rng(seed).permutation(n_all)[:n])
    data = split.get(idx)
    return stack_batches(data["image"], data["label"], batch_size)
