"""Runs a run depends on: the reference run whose difficulty ranks a ``data.subset`` (thesis §4.3.2) and
the pre-trained run a fine-tuning starts from (``train.init_from``, §4.3.4).

Paths given relative are resolved against the dependent run's workdir (``../reference`` = a sibling
directory), so the stored ``config.json`` holds absolute paths. When the reference's files are missing
and its config is named (``data.subset.reference_config`` / ``train.init_from_config``, a
``configs/x.py:arg`` reference), :func:`prepare_references` trains it first in its workdir with the one
training loop (resumable: re-running continues an interrupted reference), so a subset or fine-tuning
command works on a fresh machine.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config_ref(ref: str) -> ml_collections.ConfigDict:
    """The config of ``"path/to/file.py[:arg]"`` (path relative to the working directory or the
    repository root)."""
    path, _, arg = str(ref).partition(":")
    if not os.path.exists(path) and os.path.exists(os.path.join(REPO_ROOT, path)):
        path = os.path.join(REPO_ROOT, path)
    if not path.endswith(".py") or not os.path.exists(path):
        raise FileNotFoundError(f"config {ref!r} not found (expected file.py[:arg] relative to "
                                f"{os.getcwd()} or {REPO_ROOT}).")
    spec = importlib.util.spec_from_file_location("_jaxrobust_reference_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def resolve_path(path: str, workdir: str) -> str:
    """``path`` as an absolute path, relative ones taken from ``workdir``."""
    if not path:
        return path
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(os.path.abspath(workdir), path))


def ensure_trained(workdir: str, config_ref: str, *, need: str = "summary.json",
                   track_difficulty: bool = False, what: str = "reference run") -> None:
    """Trains ``config_ref`` in ``workdir`` unless ``workdir/need`` exists (an interrupted run
    resumes from its checkpoint)."""
    if os.path.exists(os.path.join(workdir, need)):
        return
    if not config_ref:
        raise FileNotFoundError(f"{os.path.join(workdir, need)} not found and no config is given to "
                                f"train the {what}: set its *_config field or train it first.")
    from configs.common import with_defaults
    from jaxrobust.train.loop import train
    cfg = with_defaults(load_config_ref(config_ref))
    if track_difficulty:
        cfg.train.difficulty.enabled = True
    print(f"[references] training the {what} {config_ref} in {workdir}", flush=True)
    train(cfg, workdir)
    if not os.path.exists(os.path.join(workdir, need)):
        raise FileNotFoundError(f"the {what} {config_ref} finished without writing {need}.")


def prepare_references(config, workdir: Optional[str]):
    """Resolves the reference paths of ``config`` against ``workdir`` and trains missing references
    (see the module docstring). Returns ``config`` (modified in place)."""
    sub = config.data.subset
    if sub.kind in ("easy", "hard") and workdir:
        sub.reference = resolve_path(sub.reference, workdir)
        if not sub.reference:
            raise ValueError(f"data.subset.kind={sub.kind!r} needs data.subset.reference.")
        ensure_trained(sub.reference, sub.reference_config, need="difficulty.npy",
                       track_difficulty=True, what="subset's reference run")
    ie = config.train.instance_eval
    if ie.groups_reference and workdir:
        ie.groups_reference = resolve_path(ie.groups_reference, workdir)
    t = config.train
    if t.init_from and workdir:
        t.init_from = resolve_path(t.init_from, workdir)
        ensure_trained(t.init_from, t.init_from_config, what="pre-trained run (train.init_from)")
    return config


def init_state_from(state, init_from: str):
    """``state`` with the parameters and model collections (BatchNorm statistics) of the last
    checkpoint of the run in ``init_from``; optimizer state, step and extra are kept (fresh)."""
    import jax
    from jaxrobust.train.loop import load_trained
    src = load_trained(init_from)
    params = src.variables["params"]
    model_state = {k: v for k, v in src.variables.items() if k != "params"}
    want = jax.tree.structure((state.params, state.model_state))
    got = jax.tree.structure((params, model_state))
    shapes_ok = want == got and all(a.shape == b.shape for a, b in zip(
        jax.tree.leaves((state.params, state.model_state)), jax.tree.leaves((params, model_state))))
    if not shapes_ok:
        raise ValueError(f"train.init_from={init_from!r}: its model ({src.config.model.name}) does not "
                         "have this run's parameter shapes; use the same model config.")
    return state.replace(params=params, model_state=model_state)


__all__ = ["load_config_ref", "resolve_path", "ensure_trained", "prepare_references", "init_state_from"]
