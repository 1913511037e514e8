"""A training run's work directory: its ``config.json`` is the record of how the checkpoints in it
were trained, so it is written only once the config is known to be valid, atomically, and never
silently replaced by a different config when a run is resumed.

``prepare_workdir(config, workdir)`` is called by ``train()`` after the config has been validated and
the dataset, model and threat model built from it (any of them may reject the config): it compares the
new config with the stored one when the workdir already holds checkpoints, refuses a change of any key
outside :data:`RESUMABLE_KEYS` with the list of changed keys (``path: old -> new``), unless
``allow_config_changes`` is set (``--config.allow_config_changes=True``), and then writes
``config.json`` through a temporary file and a rename. Accepted changes of non-resumable keys are
appended to ``config_changes.jsonl`` so the run keeps the history of what it was trained with.

``import_modules(config.imports)`` imports the user's modules named in a config (e.g. modules that
register objectives with :func:`jaxrobust.train.register`), before the config is validated.
"""
from __future__ import annotations

import fnmatch
import importlib
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax

# Keys that may differ between the stored config of a run and the config it is resumed with: how long
# to train, how often to log / evaluate / checkpoint / monitor, what and where to evaluate, where the
# data lives and how the job is launched. Everything else (data, model, threat, objective, optimizer,
# schedule, seed, batch size) defines the trained model and must not change silently. A changed length
# (num_epochs / num_steps) also rescales epoch-based lr and ε schedules from the resumed step on.
# ``*`` matches any suffix.
RESUMABLE_KEYS: Tuple[str, ...] = (
    "train.num_epochs", "train.num_steps", "train.log_every", "train.eval_every_epochs",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.tensorboard", "train.monitor.*",
    "eval.*", "data.eval_batch_size", "data.data_dir", "distributed",
    "allow_config_changes", "imports",
)

_ABSENT = "<absent>"


def config_to_dict(config) -> Dict[str, Any]:
    """A ConfigDict (or dict) as plain JSON data, exactly as ``config.json`` stores it."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; empty sub-dicts are kept as leaves ({})."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, path + "."))
        else:
            out[path] = v
    return out


def is_resumable(path: str, resumable: Sequence[str] = RESUMABLE_KEYS) -> bool:
    return any(fnmatch.fnmatchcase(path, pat) or path.startswith(pat + ".") for pat in resumable)


def diff_configs(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """Changed leaves ``(path, old, new)`` of two (nested) config dicts, sorted by path; a key present
    in only one of them has the value ``"<absent>"`` in the other."""
    a, b = flatten(old), flatten(new)
    out = []
    for path in sorted(set(a) | set(b)):
        va, vb = a.get(path, _ABSENT), b.get(path, _ABSENT)
        if va != vb:
            out.append((path, va, vb))
    return out


def _show(v) -> str:
    return v if v is _ABSENT else json.dumps(v)


def format_changes(changes: Sequence[Tuple[str, Any, Any]]) -> str:
    """``path: old -> new; ...`` (values as JSON)."""
    return "; ".join(f"{p}: {_show(o)} -> {_show(n)}" for p, o, n in changes)


def has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir/checkpoints`` holds a finished orbax step (a directory named by its step;
    orbax's unfinished saves carry a temporary suffix and do not count)."""
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any(n.isdigit() and os.path.isdir(os.path.join(d, n)) for n in os.listdir(d))


def write_text_atomic(text: str, path: str) -> None:
    """Write through a temporary file in the same directory and a rename: readers never see a
    partial file, and a crash leaves the previous version."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_workdir(config, workdir: str, *, allow_config_changes: Optional[bool] = None,
                    resumable: Sequence[str] = RESUMABLE_KEYS) -> List[Tuple[str, Any, Any]]:
    """Checks ``config`` against the run stored in ``workdir`` and writes ``workdir/config.json``.

    Call it only once the config has been validated (and the dataset, model and threat model built
    from it): a config that fails validation never reaches the workdir. When ``workdir`` holds
    checkpoints and a ``config.json``, keys outside ``resumable`` must be unchanged; otherwise a
    ``ValueError`` lists every changed key as ``path: old -> new`` and nothing is written, unless
    ``allow_config_changes`` (default: ``config.allow_config_changes``) is true, in which case the
    changes are appended to ``config_changes.jsonl``. A workdir with checkpoints but no config.json is
    refused the same way (nothing tells what its checkpoints were trained with). Without checkpoints
    nothing was trained with a stored config, so it is simply replaced.

    Returns the list of changed keys ``(path, old, new)`` (resumable ones included). Only process 0
    writes; every process checks, so all of them fail alike.
    """
    if not isinstance(workdir, str) or not workdir:
        raise ValueError(f"workdir must be a non-empty path, got {workdir!r}.")
    if allow_config_changes is None:
        allow_config_changes = bool(config.get("allow_config_changes", False)) if hasattr(config, "get") \
            else False
    new = config_to_dict(config)
    path = os.path.join(workdir, "config.json")
    changes: List[Tuple[str, Any, Any]] = []
    if os.path.isdir(workdir) and has_checkpoints(workdir):
        if not os.path.exists(path):
            if not allow_config_changes:
                raise ValueError(f"{workdir} holds checkpoints but no config.json, so they cannot be checked "
                                 f"against this config; use another --workdir, or pass "
                                 f"--config.allow_config_changes=True to resume with this config.")
        else:
            with open(path) as f:
                try:
                    old = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} is not valid JSON ({e}); restore it or use another --workdir.") from None
            changes = diff_configs(_with_defaults(old), new)
            fixed = [c for c in changes if not is_resumable(c[0], resumable)]
            if fixed and not allow_config_changes:
                raise ValueError(
                    f"{workdir} holds a run trained with a different config; changed keys: "
                    f"{format_changes(fixed)}. Use another --workdir, or pass "
                    f"--config.allow_config_changes=True to resume this run with the new values "
                    f"(what may change freely: jaxrobust.train.workdir.RESUMABLE_KEYS).")
            if fixed and jax.process_index() == 0:
                with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
                    f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        "changes": [{"key": p, "old": o, "new": n} for p, o, n in fixed]})
                            + "\n")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_text_atomic(json.dumps(new, indent=2) + "\n", path)
    return changes


def _with_defaults(stored: Dict[str, Any]) -> Dict[str, Any]:
    """A stored config with the fields it lacks (added to the schema since) set to their defaults, as
    the library reads it (``configs.common.with_defaults``); unchanged where that is unavailable."""
    try:
        import ml_collections
        from configs.common import with_defaults
    except ImportError:
        return stored
    return config_to_dict(with_defaults(ml_collections.ConfigDict(stored)))


def parse_imports(imports) -> Tuple[str, ...]:
    """``imports`` as a tuple of module names: a tuple/list of names and/or comma-separated strings."""
    if imports is None:
        return ()
    if isinstance(imports, str):
        imports = (imports,)
    if not isinstance(imports, (tuple, list)):
        raise TypeError(f"imports must be a module name, a comma-separated string or a tuple of names, "
                        f"got {type(imports).__name__}.")
    names = []
    for item in imports:
        if not isinstance(item, str):
            raise TypeError(f"imports must hold module names (str), got {item!r}.")
        names += [n.strip() for n in item.split(",") if n.strip()]
    return tuple(names)


def import_modules(imports) -> Tuple[str, ...]:
    """Imports the modules named by ``imports`` (see :func:`parse_imports`), e.g. the user's modules
    that register objectives; a module that cannot be found is a ``ValueError`` naming it."""
    names = parse_imports(imports)
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.split(".")[:len(e.name.split("."))] == e.name.split("."):
                raise ValueError(f"imports: module {name!r} not found ({e}); is its directory on PYTHONPATH?") \
                    from None
            raise
    return names
