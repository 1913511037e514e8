"""absl entry points: python -m experiments.<name> --config=configs/<file>.py --workdir=DIR.

Shared by ``train``, ``evaluate`` and ``certify``:
- :func:`run` parses the flags (``--config`` and its ``--config.a.b=v`` overrides) and turns user errors
  into one line on stderr and exit code 2: unknown config keys (with the closest valid names), bad
  values, a config file that does not load, and, while the job runs, ``ValueError``/``TypeError``
  (validation) and ``FileNotFoundError`` (missing data or runs). Other exceptions are bugs and keep
  their traceback (``--traceback`` shows it for user errors too).
- :func:`make_main` imports ``config.imports``, runs the job, prints its summary and exits cleanly on
  SIGINT/SIGTERM (status 130/143, pending checkpoints finished, one line saying how to resume) without
  the interpreter teardown that crashes while XLA threads still run.
- :func:`write_json_atomic` and :func:`round_floats` write results without float noise.
- :func:`process_slice` / :func:`gather_examples`: multi-host evaluation, each process its slice.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import signal
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from jaxrobust.train.metrics import round_floats  # noqa: F401 (re-exported: one rounding rule)

USER_ERROR_EXIT = 2


class _Interrupted(KeyboardInterrupt):
    """SIGTERM turned into an exception (status 143 instead of SIGINT's 130)."""


def define_entrypoint_flags(config_help: str, workdir_help: str) -> None:
    """Defines --config, --workdir and --traceback once per process, so several entry-point modules
    can be imported together (tests, notebooks) without absl's DuplicateFlagError."""
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    if "workdir" not in flags.FLAGS:
        flags.DEFINE_string("workdir", None, workdir_help)
        flags.mark_flags_as_required(["config", "workdir"])
    if "traceback" not in flags.FLAGS:
        flags.DEFINE_boolean("traceback", False, "Show the full traceback of user errors too.")


# ----------------------------------------------------------------------------- user errors
def user_error(message: str) -> None:
    """Prints ``error: message`` as one line on stderr and exits with status 2."""
    first, *rest = [ln.rstrip() for ln in str(message).strip().splitlines()] or [""]
    # One line; messages that carry instructions (e.g. how to prepare a dataset) keep them, indented.
    sys.stderr.write("error: " + "\n  ".join([first] + [ln.strip() for ln in rest if ln.strip()]) + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    raise SystemExit(USER_ERROR_EXIT)


def config_paths(config, prefix: str = "") -> List[str]:
    """Every field path of a ConfigDict, sub-dicts included (``threat``, ``threat.eps``, ...)."""
    out = []
    for k in config.keys():
        path = prefix + k
        out.append(path)
        v = config[k]
        if hasattr(v, "keys"):
            out += config_paths(v, path + ".")
    return out


def suggest_paths(bad: str, valid: Sequence[str], n: int = 3) -> List[str]:
    """The closest valid config paths to a misspelled one, ranked by the similarity of the last
    component (``epsilon`` -> ``threat.eps``: a prefix counts extra), ties broken towards the same
    parent section."""
    parent, _, last = bad.rpartition(".")
    scored = []
    for p in valid:
        vp, _, vl = p.rpartition(".")
        s = difflib.SequenceMatcher(None, last, vl).ratio()
        if vl.startswith(last) or last.startswith(vl):
            s += 0.3
        if vp == parent:
            s += 0.1
        scored.append((s, p))
    scored.sort(key=lambda t: -t[0])
    if not scored or scored[0][0] < 0.6:
        return []
    best = scored[0][0]
    return [p for s, p in scored if s >= max(0.6, best - 0.15)][:n]


def unknown_key_message(path: str, config) -> Optional[str]:
    """None when ``path`` names a field of ``config``; otherwise the message for the unknown key."""
    node, walked = config, []
    for part in path.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            where = f" (in {'.'.join(walked)})" if walked else ""
            msg = f"unknown config key {path!r}: no field {part!r}{where}"
            valid = config_paths(config)
            rest = path.split(".")[len(walked) + 1:]
            hints = suggest_paths(".".join(walked + [part]), valid)
            if rest:  # 'modle.name' -> 'model.name' when that exists
                hints = [h for h in (".".join([h] + rest) for h in hints) if h in valid] or hints
            return msg + (f"; did you mean {' or '.join(hints)}?" if hints else ".")
        node = node[part]
        walked.append(part)
    return None


def _override_paths(argv: Sequence[str]) -> List[str]:
    paths = []
    for a in argv[1:]:
        m = re.match(r"^--?(?:no)?config\.([^=]+)", a)
        if m:
            paths.append(m.group(1))
    return paths


def _config_load_error(text: str) -> str:
    """The informative line of ml_collections' 'Error whilst parsing config file' message."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", ln) or "No such file" in ln:
            return ln
    return lines[-1] if lines else text


def _load_config_arg(argv: Sequence[str]):
    """The config named by ``--config=file.py[:arg]`` in ``argv`` (None if absent or not loadable):
    flag parsing may fail before absl has stored it."""
    import importlib.util
    for a in argv[1:]:
        m = re.match(r"^--?config=(.+)$", a)
        if m:
            path, _, arg = m.group(1).partition(":")
            try:
                spec = importlib.util.spec_from_file_location("_jaxrobust_cli_config", path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                return mod.get_config(arg) if arg else mod.get_config()
            except Exception:  # noqa: BLE001 - reported by absl's own error instead
                return None
    return None


def _report_unknown_keys(argv: Sequence[str]) -> None:
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config is None:
        config = _load_config_arg(argv)
    if config is not None:
        for path in _override_paths(argv):
            m = unknown_key_message(path, config)
            if m:
                user_error(m)


def parse_flags(argv: List[str]) -> List[str]:
    """absl flag parsing (``app.run``'s ``flags_parser``) with one-line errors and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        msg = str(e)
        if isinstance(e, flags.UnrecognizedFlagError) or "Unknown command line flag" in msg:
            _report_unknown_keys(argv)
        if "Error whilst parsing config file" in msg or "Attempted" in msg:
            flag = msg.split(":", 1)[0]
            user_error(f"{flag}: could not load the config: {_config_load_error(msg)}")
        user_error(msg.splitlines()[0] if msg else type(e).__name__)
    except (AttributeError, KeyError):  # ml_collections: an override of a missing field
        _report_unknown_keys(argv)
        raise


def run(main: Callable) -> None:
    """``app.run(main)`` with :func:`parse_flags` (one-line flag errors, status 2)."""
    app.run(main, flags_parser=parse_flags)


def _is_user_error(e: BaseException) -> bool:
    """Validation errors (ValueError/TypeError), missing files and a diverged run (the loop's
    FloatingPointError says where and what to do); not JAX's tracing errors (bugs)."""
    if type(e).__module__.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax"):
        return False
    return isinstance(e, (ValueError, TypeError, FileNotFoundError, FloatingPointError))


# ----------------------------------------------------------------------------- interruption
def _finish_checkpoints(tb) -> None:
    """Waits for the orbax saves still running in the frames being unwound (the checkpoint written
    before the interruption completes; an unfinished one is a temporary directory orbax ignores)."""
    from jaxrobust.train.checkpoint import Checkpointer
    seen = set()
    while tb is not None:
        for v in list(tb.tb_frame.f_locals.values()):
            if isinstance(v, Checkpointer) and id(v) not in seen:
                seen.add(id(v))
                try:
                    v.wait()
                except BaseException:  # noqa: BLE001 - best effort while exiting
                    pass
        tb = tb.tb_next


def _resume_command() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None and spec.name else f"python {sys.argv[0]}"
    return " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]])


def _raise_interrupted(signum, frame):
    raise _Interrupted()


def _exit_now(signum, frame):  # a second signal while finishing: leave at once
    os._exit(128 + signum)


def make_main(job: Callable[[Any, str], dict], summarise: Callable[[dict], Any], *,
              resume_note: str = "re-run the same command to resume"):
    """The absl ``main`` of an entry point: rejects positional arguments, keeps logs at WARNING unless
    --verbosity is given (orbax logs every checkpoint at INFO), imports ``config.imports``, runs
    ``job(config, workdir)`` and prints ``round_floats(summarise(result))`` as JSON.

    User errors (see :func:`_is_user_error`) print one line and exit with status 2. SIGINT (Ctrl-C)
    and SIGTERM end the job with status 130 / 143: checkpoint saves in flight are finished, one line
    says how to resume, and the process leaves through ``os._exit`` (skipping the interpreter
    teardown, which segfaults while XLA's compilation or execution threads are still running)."""
    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            config = flags.FLAGS.config
            config.keys()  # ml_collections defers the error of a config file that failed to load
        except OSError as e:
            arg = next((a for a in sys.argv[1:] if re.match(r"^--?config=", a)), "--config")
            user_error(f"{arg}: could not load the config: {_config_load_error(str(e))}")
        workdir = flags.FLAGS.workdir
        try:
            try:
                from jaxrobust.train.workdir import import_modules
                import_modules(config.get("imports", ()))
                out = job(config, workdir)
            except KeyboardInterrupt as e:
                signal.signal(signal.SIGINT, _exit_now)
                signal.signal(signal.SIGTERM, _exit_now)
                code = 143 if isinstance(e, _Interrupted) else 130
                _finish_checkpoints(e.__traceback__)
                sys.stderr.write(f"\nInterrupted ({'SIGTERM' if code == 143 else 'SIGINT'}); "
                                 f"{resume_note}: {_resume_command()}\n")
                sys.stderr.flush()
                sys.stdout.flush()
                os._exit(code)
            except Exception as e:  # noqa: BLE001 - classified below
                if not _is_user_error(e) or flags.FLAGS["traceback"].value:
                    raise
                where = "" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: "
                user_error(f"{where}{e} (--traceback shows where)")
            print(json.dumps(round_floats(summarise(out)), indent=2, default=str), flush=True)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return main


# ----------------------------------------------------------------------------- JSON outputs


def write_json_atomic(obj, path: str, *, digits: int = 7) -> None:
    """Write JSON (floats rounded by :func:`round_floats`) through a temporary file and a rename:
    readers never see a partial file. Only process 0 writes in a multi-process job."""
    import jax
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(round_floats(obj, digits), f, indent=2)
    os.replace(tmp, path)


def import_run_modules(workdir: str) -> None:
    """Imports a training run's ``config.imports`` (evaluate/certify load runs trained with objectives
    registered in the user's modules)."""
    from jaxrobust.train.workdir import import_modules
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            import_modules(json.load(f).get("imports", ()))


# ----------------------------------------------------------------------------- multi-host
def maybe_initialize_distributed(config) -> None:
    """``--config.distributed=True``: ``jax.distributed.initialize()`` as in training (BUILD.md)."""
    if config.get("distributed", False):
        import jax
        from jaxrobust.train.loop import _initialize_distributed
        if not jax.distributed.is_initialized():
            _initialize_distributed()


def process_slice(n: int, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """This process's contiguous slice of ``n`` examples, padded to ``ceil(n / process_count)``
    (static shapes for the all-gather): ``(indices, mask)``, padding rows repeat the slice's first
    index (or 0) and have ``mask`` False."""
    import jax
    p = jax.process_index() if process_index is None else process_index
    k = jax.process_count() if process_count is None else process_count
    if n < 0 or k < 1 or not 0 <= p < k:
        raise ValueError(f"need n >= 0 and 0 <= process_index < process_count, got n={n}, "
                         f"process_index={p}, process_count={k}.")
    per = -(-n // k) if n else 0
    idx = np.arange(p * per, min((p + 1) * per, n))
    mask = np.zeros(per, bool)
    mask[:len(idx)] = True
    fill = idx[0] if len(idx) else 0
    return np.concatenate([idx, np.full(per - len(idx), fill, idx.dtype)]).astype(np.int64), mask


def gather_examples(values: Dict[str, np.ndarray], mask: np.ndarray,
                    allgather: Optional[Callable] = None) -> Dict[str, np.ndarray]:
    """Concatenates every process's per-example arrays (leading axis = this process's padded slice
    from :func:`process_slice`) in process order and drops the padding: every process gets the
    arrays of all ``n`` examples in their original order. ``allgather`` defaults to
    ``jax.experimental.multihost_utils.process_allgather`` (stacks a new leading process axis)."""
    import jax
    if allgather is None:
        if jax.process_count() == 1:
            return {k: np.asarray(v)[np.asarray(mask)] for k, v in values.items()}
        from jax.experimental import multihost_utils
        allgather = lambda t: multihost_utils.process_allgather(t, tiled=False)
    tree = {"mask": np.asarray(mask), **{k: np.asarray(v) for k, v in values.items()}}
    g = jax.tree.map(np.asarray, allgather(tree))
    m = g["mask"].reshape(-1)
    return {k: g[k].reshape((-1,) + g[k].shape[2:])[m] for k in values}
