"""Reproduce a thesis table: train every row (and seed), evaluate/certify/analyze it, and write a
markdown table with the thesis's numbers beside ours.

    python -m experiments.reproduce --config=configs/table3_6.py:mnist5k_fc1 --workdir=D \
        [--config.reproduce.only=kw,ibp] [--config.reproduce.seeds=0,1,2] [--config.reproduce.dry_run=True]

The config is a *row set* (``configs.common.reproduce_config``): ``reproduce.rows.<row>`` names the
training config of each row (``file.py:arg``, plus ``--config.a.b=v`` overrides) and
``reproduce.steps.<step>`` the evaluations run on every row's workdir (``evaluate``, ``certify`` or
``analyze`` with their config and the file they write); ``reproduce.columns`` says which values of
those files make the table (``"certify.json:CRE Lin"``, ``"eval.json:robust_accuracy.pgd*100"``).

Every run is a child process of the ordinary entry points (``python -m experiments.<entry>``) in
``D/<row>/s<seed>``, its output teed to ``D/<row>/s<seed>/<entry>.log``. The command is resumable: a
finished training run (``summary.json``) is not retrained, an evaluation whose output file is newer
than the run's ``summary.json`` is not redone, and an interrupted run resumes from its checkpoint.
Results go to ``D/<name>.md`` and ``D/<name>.json`` (per-seed values, mean, std, the thesis's values,
and the table's claims checked on our numbers when the config names a ``claims`` function).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import flags

from experiments import define_entrypoint_flags, make_main, run, write_json_atomic

define_entrypoint_flags("A table's row-set config (file.py:arg, e.g. configs/table3_6.py:mnist5k_fc1).",
                        "Directory that holds every run of the table and the table itself.")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRIES = ("train", "evaluate", "certify", "analyze")


# ----------------------------------------------------------------------------- the row set
def resolve_config_path(ref: str) -> str:
    """``file.py[:arg]`` with ``file.py`` relative to the working directory or the repository."""
    path, sep, arg = ref.partition(":")
    if not os.path.exists(path) and os.path.exists(os.path.join(REPO_ROOT, path)):
        path = os.path.join(REPO_ROOT, path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {ref.partition(':')[0]!r} not found (relative to "
                                f"{os.getcwd()} or {REPO_ROOT}).")
    return path + sep + arg


def _as_list(v) -> List[Any]:
    if v is None or v == "":
        return []
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    if isinstance(v, (int, float)):
        return [v]
    return list(v)


def parse_column(spec: str) -> Tuple[str, str, float]:
    """``"file.json:key.path[*scale]"`` -> (file, key path, scale)."""
    file, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"reproduce column source {spec!r}: expected 'file.json:key.path[*scale]'.")
    path, _, scale = rest.partition("*")
    return file, path, float(scale) if scale else 1.0


def columns_of(r) -> List[Tuple[str, str, int]]:
    """``reproduce.columns`` as (label, source, decimals) triples."""
    out = []
    for col in r.columns:
        if len(col) not in (2, 3):
            raise ValueError(f"reproduce column {col!r}: expected (label, source[, decimals]).")
        out.append((col[0], col[1], int(col[2]) if len(col) == 3 else int(r.decimals)))
    return out


def lookup(obj, path: str):
    """``a.b.0`` in nested dicts/lists (keys may contain spaces, not dots); None when absent."""
    for part in path.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.lstrip("-").isdigit() and -len(obj) <= int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def validate(r) -> None:
    """One ValueError for a malformed row set, before anything runs."""
    if not len(r.rows):
        raise ValueError("reproduce.rows is empty: the config names no runs.")
    steps = dict(r.steps.items())
    for name, st in steps.items():
        if st.entry not in ENTRIES[1:]:
            raise ValueError(f"reproduce.steps.{name}.entry={st.entry!r}; expected one of {ENTRIES[1:]}.")
    for name, row in r.rows.items():
        if not row.train:
            raise ValueError(f"reproduce.rows.{name}.train is empty.")
        resolve_config_path(row.train)
        bad = [s for s in _as_list(row.steps) if s not in steps and s != "none"]
        if bad:
            raise ValueError(f"reproduce.rows.{name}.steps names unknown steps {bad}; defined: {sorted(steps)}.")
        if len(row.thesis) not in (0, len(r.columns)):
            raise ValueError(f"reproduce.rows.{name}.thesis has {len(row.thesis)} values for "
                             f"{len(r.columns)} columns.")
    for _, spec, _ in columns_of(r):
        parse_column(spec)
    only = _as_list(r.only)
    unknown = [o for o in only if o not in r.rows]
    if unknown:
        raise ValueError(f"reproduce.only names unknown rows {unknown}; rows: {list(r.rows)}.")


# ----------------------------------------------------------------------------- running
def _substitute(s: str, root: str, seed: int) -> str:
    return str(s).replace("{root}", root).replace("{seed}", str(seed))


def _command(entry: str, config_ref: str, workdir: str, overrides: Sequence[str]) -> List[str]:
    return ([sys.executable, "-m", f"experiments.{entry}", f"--config={resolve_config_path(config_ref)}",
             f"--workdir={workdir}"] + [f"--config.{o}" for o in overrides])


def _run_child(cmd: List[str], log_path: str, prefix: str) -> None:
    """Runs one entry point, streaming its output with a prefix and into ``log_path``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=REPO_ROOT)
        try:
            for line in proc.stdout:
                log.write(line)
                sys.stdout.write(f"{prefix} {line}")
                sys.stdout.flush()
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    if code != 0:
        raise RuntimeError(f"{prefix} failed (exit status {code}); see {log_path}. Fix it and re-run "
                           f"the same reproduce command: finished runs are kept.")


def _fresh(output: str, reference: str) -> bool:
    return os.path.exists(output) and os.path.exists(reference) and \
        os.path.getmtime(output) >= os.path.getmtime(reference)


def run_row(r, row_name: str, seed: int, root: str, dry_run: bool) -> Dict[str, Any]:
    """Trains one (row, seed) and runs its steps; returns ``{file: parsed json}`` of its outputs."""
    row = r.rows[row_name]
    wd = os.path.join(root, row_name, f"s{seed}")
    os.makedirs(wd, exist_ok=True)
    overrides = [_substitute(o, root, seed) for o in _as_list(row.overrides)]
    if not any(o.startswith("seed=") for o in overrides):
        overrides.append(f"seed={seed}")
    summary = os.path.join(wd, "summary.json")
    prefix = f"[{row_name}/s{seed}]"
    todo = []
    if not os.path.exists(summary):
        todo.append(("train", _command("train", row.train, wd, overrides)))
    for step_name in ([] if row.steps == "none" else _as_list(row.steps) or list(r.steps)):
        st = r.steps[step_name]
        if not _fresh(os.path.join(wd, st.output), summary) or todo and todo[0][0] == "train":
            todo.append((st.entry, _command(st.entry, st.config, wd,
                                            [_substitute(o, root, seed) for o in _as_list(st.overrides)])))
    for entry, cmd in todo:
        if dry_run:
            print(" ".join(shlex.quote(c) for c in cmd))
            continue
        _run_child(cmd, os.path.join(wd, f"{entry}.log"), f"{prefix} {entry}:")
    outputs = {}
    files = {parse_column(spec)[0] for _, spec, _ in columns_of(r)}
    for f in files:
        p = os.path.join(wd, f)
        if os.path.exists(p):
            with open(p) as fh:
                outputs[f] = json.load(fh)
    return outputs


def column_values(r, outputs: Dict[str, Any]) -> List[Optional[float]]:
    vals = []
    for _, spec, _ in columns_of(r):
        f, path, scale = parse_column(spec)
        v = lookup(outputs.get(f), path)
        vals.append(None if v is None or isinstance(v, (dict, list, str)) else float(v) * scale)
    return vals


# ----------------------------------------------------------------------------- the table
def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None, len(v)


def format_value(mean: Optional[float], std: Optional[float], decimals: int) -> str:
    """``1.56`` or, with a std over seeds, the thesis's ``1.56(17)`` (= 1.56 ± 0.17)."""
    if mean is None:
        return "–"
    s = f"{mean:.{decimals}f}"
    if std is not None:
        s += f"({int(round(std * 10 ** decimals))})"
    return s


def markdown(r, table: Dict[str, Any]) -> str:
    cols = columns_of(r)
    labels = [label for label, _, _ in cols]
    head = f"### {r.title}\n\n" if r.title else ""
    lines = [head + "Each cell: ours / thesis" + (f" (ours: mean(std) over seeds {list(table['seeds'])})"
                                                  if len(table["seeds"]) > 1 else "") + ".", "",
             "| " + " | ".join([r.row_header] + labels) + " |",
             "|" + "---|" * (len(labels) + 1)]
    for name, row in table["rows"].items():
        cells = []
        for label, _, dec in cols:
            c = row["columns"][label]
            ours = format_value(c["mean"], c["std"], dec)
            th = c["thesis"]
            cells.append(ours if th is None else f"{ours} / {th:.{dec}f}" if isinstance(th, float)
                         else f"{ours} / {th}")
        lines.append("| " + " | ".join([row["label"]] + cells) + " |")
    if table.get("claims"):
        lines += ["", "| claim | holds here | evidence |", "|---|---|---|"]
        for c in table["claims"]:
            holds = {True: "yes", False: "no", None: "n/a"}[c.get("holds")]
            lines.append(f"| {c['claim']} | {holds} | {c.get('evidence', '')} |")
    if r.notes:
        lines += ["", str(r.notes).strip()]
    return "\n".join(lines) + "\n"


def _load_function(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def build_table(r, per_seed: Dict[str, Dict[int, List[Optional[float]]]]) -> Dict[str, Any]:
    labels = [label for label, _, _ in columns_of(r)]
    rows = {}
    for name, by_seed in per_seed.items():
        row = r.rows[name]
        thesis = list(row.thesis) if len(row.thesis) else [None] * len(labels)
        cols = {}
        for j, label in enumerate(labels):
            vals = [by_seed[s][j] for s in sorted(by_seed)]
            m, sd, n = mean_std(vals)
            th = thesis[j]
            th = None if th is None or (isinstance(th, float) and math.isnan(th)) else th
            cols[label] = {"mean": m, "std": sd, "n": n, "values": vals, "thesis": th}
        rows[name] = {"label": row.label or name, "columns": cols}
    table = {"name": r.name, "title": r.title, "seeds": list(_as_list(r.seeds)), "rows": rows}
    if r.claims:
        means = {n: {l: rows[n]["columns"][l]["mean"] for l in labels} for n in rows}
        table["claims"] = [dict(c) for c in _load_function(r.claims)(means)]
    return table


def reproduce(config, workdir: str) -> Dict[str, Any]:
    if "reproduce" not in config:
        raise ValueError("this config is a single run, not a table's row set (no 'reproduce' field): "
                         "pass the row-set argument, e.g. configs/table3_6.py:mnist5k_fc1.")
    r = config.reproduce
    validate(r)
    root = os.path.abspath(workdir)
    os.makedirs(root, exist_ok=True)
    names = _as_list(r.only) or [n for n in r.get("order", ()) if n in r.rows] or list(r.rows)
    seeds = [int(s) for s in _as_list(r.seeds)] or [0]
    jobs = [(n, s) for n in names for s in seeds]
    per_seed: Dict[str, Dict[int, List[Optional[float]]]] = {}
    t0, done_time = time.time(), []
    for i, (name, seed) in enumerate(jobs):
        t = time.time()
        rate = f" | ETA {time.strftime('%H:%M:%S', time.gmtime(np.mean(done_time) * (len(jobs) - i)))}" \
            if done_time else ""
        print(f"[reproduce] {r.name}: run {i + 1}/{len(jobs)} {name} seed {seed}{rate}", flush=True)
        outputs = run_row(r, name, seed, root, bool(r.dry_run))
        per_seed.setdefault(name, {})[seed] = column_values(r, outputs)
        if time.time() - t > 1.0:  # runs that were skipped do not count towards the ETA
            done_time.append(time.time() - t)
    if r.dry_run:
        return {"dry_run": True, "runs": len(jobs)}
    table = build_table(r, per_seed)
    table["seconds"] = time.time() - t0
    write_json_atomic(table, os.path.join(root, f"{r.name}.json"))
    md = markdown(r, table)
    with open(os.path.join(root, f"{r.name}.md.tmp"), "w") as f:
        f.write(md)
    os.replace(os.path.join(root, f"{r.name}.md.tmp"), os.path.join(root, f"{r.name}.md"))
    print(md, flush=True)
    return table


main = make_main(reproduce, lambda t: {"table": t.get("name"), "rows": len(t.get("rows", {})),
                                       "claims": [(c["claim"], c.get("holds")) for c in t.get("claims", [])]},
                 resume_note="finished runs are kept; re-run the same command to continue")


if __name__ == "__main__":
    run(main)
