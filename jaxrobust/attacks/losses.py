"""Attack losses on logits (B, K) and labels (B,). All return per-example values (B,) to MAXIMISE
for an untargeted attack; targeted forms take the target labels and are also maximised."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def margin(logits, y):
    """z_y - max_{i != y} z_i (B,): negative iff misclassified."""
    k = logits.shape[-1]
    one_hot = jax.nn.one_hot(y, k, dtype=bool)
    z_y = jnp.sum(jnp.where(one_hot, logits, 0.0), axis=-1)
    z_other = jnp.max(jnp.where(one_hot, -jnp.inf, logits), axis=-1)
    return z_y - z_other


def ce(logits, y):
    """Cross-entropy -log softmax(z)_y."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]


def cw(logits, y):
    """Carlini-Wagner margin loss max_{i!=y} z_i - z_y."""
    return -margin(logits, y)


def dlr(logits, y):
    """Difference of logits ratio (Croce & Hein 2020): -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)."""
    srt = jnp.sort(logits, axis=-1)
    return -margin(logits, y) / (srt[:, -1] - srt[:, -3] + 1e-12)


def ce_targeted(logits, y, target):
    return -ce(logits, target)


def cw_targeted(logits, y, target):
    z_t = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
    z_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    return z_t - z_y


def dlr_targeted(logits, y, target):
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    srt = jnp.sort(logits, axis=-1)
    return cw_targeted(logits, y, target) / (srt[:, -1] - 0.5 * (srt[:, -3] + srt[:, -4]) + 1e-12)


UNTARGETED = {"ce": ce, "cw": cw, "dlr": dlr}
TARGETED = {"ce": ce_targeted, "cw": cw_targeted, "dlr": dlr_targeted}


def get_loss(name: str, targeted: bool = False):
    table = TARGETED if targeted else UNTARGETED
    if name not in table:
        raise ValueError(f"Unknown attack loss {name!r}; expected one of {sorted(table)}.")
    return table[name]
