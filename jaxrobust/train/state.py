"""Training state: everything a step needs, and everything a checkpoint must hold."""
from __future__ import annotations

from typing import Any, Dict

import jax
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """``params``, mutable model collections (``model_state``: batch_stats...), ``opt_state``,
    ``step``, base PRNG ``key`` (per-step keys are ``fold_in(key, step)`` so a resumed run draws the same
    numbers) and the objective's ``extra`` state: a pytree whose ``extra['instance']`` arrays have a
    leading axis indexed by dataset index (padded to a multiple of the device count and sharded over
    the ``'data'`` mesh axis), the rest (EMA weights, masks...) replicated."""
    step: jax.Array
    params: Any
    model_state: Dict[str, Any]
    opt_state: Any
    key: jax.Array
    extra: Any
    # -1, or the step whose loss/gradient was not finite (its update and all later ones were skipped).
    nonfinite_step: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def variables(self):
        return {"params": self.params, **self.model_state}

    def checkpoint_tree(self):
        """The array part of the state (what orbax saves)."""
        return {"step": self.step, "params": self.params, "model_state": self.model_state,
                "opt_state": self.opt_state, "key": self.key, "extra": self.extra}

    def from_checkpoint_tree(self, tree):
        return self.replace(**tree)
