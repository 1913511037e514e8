"""Atomic, resumable checkpoints with orbax.

orbax writes each step into a temporary directory and renames it when complete, so a run killed while
saving never leaves a half-written "latest" checkpoint. Together with per-step keys derived from the
step and data order derived from (seed, epoch), restoring the state is enough to resume bit-exactly.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, tree, force: bool = False):
        self.manager.save(int(step), args=ocp.args.StandardSave(tree), force=force)

    def restore(self, tree_like, step: Optional[int] = None):
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree_like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
