"""Robust-overfitting analyses of ``python -m experiments.analyze`` (thesis §4.3): registered as

- ``difficulty``: the run's instance difficulty (eq. 4.30, ``RUN/difficulty.npy``): its summary, the
  correlation of the loss-based and the 0-1-error-based difficulty (Fig. 4.15), per-class means, the
  easiest / hardest instances of every class (Fig. 4.16; their images in the plot);
- ``ddistance``: eq. 4.31 between this run's difficulty and other runs' (Tables 4.3 and 4.4),
  ``ddistance.against = "label=DIR[!SOURCE][@CONFIG[#key=value,...]];..."``: each DIR a run (``{seed}``
  = this run's seed; a glob matches several runs, this one excluded, and their distances are
  averaged), trained first with CONFIG (``configs/x.py:arg``, overrides after ``#``) when missing;
  ``ddistance.source`` (this run) and ``!SOURCE`` (the other's) pick a per-instance evaluation source
  (``test:pgd``, ``cifar10_corrupted/fog_3@test:clean``...) instead of the training difficulty;
- ``lipschitz``: AutoLip and SeqLip upper bounds averaged over ``lipschitz.runs`` runs (Table 4.5) and
  the gradient-norm lower estimate on test points (:mod:`jaxrobust.analysis.lipschitz`);
- ``groups``: loss and accuracy of the difficulty groups G0..G9 over training (eq. 4.32, Fig. 4.21)
  from the run's per-instance evaluations (``train.instance_eval``) and its own (or
  ``groups.reference``'s) difficulty;
- ``overfitting``: best vs last robust test accuracy of the periodic evaluations (the robust
  overfitting gap of Tables 4.5-4.6) and the learning curves (Figs. 4.17-4.20, 4.25), other runs
  overlaid (``overfitting.others = "label=DIR;..."``).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Tuple

import numpy as np

from jaxrobust.analysis import difficulty as D
from jaxrobust.analysis.registry import register_analysis


# ----------------------------------------------------------------------------- helpers
def parse_runs(spec: str, with_source: bool = False):
    """``"label=DIR[!SOURCE][@CONFIG[#k=v,...]];..."`` -> [(label, dir, config, overrides)] (with
    ``with_source``: [(label, dir, source, config, overrides)], SOURCE '' = the training
    difficulty)."""
    out = []
    for part in [p.strip() for p in str(spec).split(";") if p.strip()]:
        label, sep, rest = part.partition("=")
        if not sep or not label or not rest:
            raise ValueError(f"run entry {part!r}: expected 'label=DIR[!SOURCE][@CONFIG[#key=value,...]]'.")
        # the CONFIG (a .py file) follows the last '@' (a SOURCE may hold '@' itself)
        where, at, cfg = rest.rpartition("@")
        if not at or ".py" not in cfg:
            where, cfg = rest, ""
        where, _, source = where.partition("!")
        cfg, _, over = cfg.partition("#")
        overrides = {}
        for kv in [s for s in over.split(",") if s]:
            k, s2, v = kv.partition("=")
            if not s2:
                raise ValueError(f"override {kv!r} in {part!r}: expected key=value.")
            overrides[k.strip()] = v.strip()
        if with_source:
            out.append((label.strip(), where.strip(), source.strip(), cfg.strip(), overrides))
        else:
            out.append((label.strip(), where.strip(), cfg.strip(), overrides))
    return out


def _run_seed(workdir: str) -> int:
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return int(json.load(f).get("seed", 0))
    except FileNotFoundError:
        return 0


def _train_missing(path: str, config_ref: str, overrides: Dict[str, str], need: str) -> None:
    if os.path.exists(os.path.join(path, need)):
        return
    if not config_ref:
        raise FileNotFoundError(f"{os.path.join(path, need)} not found and no @CONFIG is given to train it.")
    from configs.common import with_defaults
    from jaxrobust.train.loop import train
    from jaxrobust.train.references import load_config_ref
    cfg = with_defaults(load_config_ref(config_ref))
    flat = {}
    for k, v in overrides.items():
        old = cfg
        for p in k.split(".")[:-1]:
            old = old[p]
        cur = old[k.split(".")[-1]]
        flat[k] = type(cur)(v) if not isinstance(cur, bool) else v.lower() in ("1", "true", "yes")
    cfg.update_from_flattened_dict(flat)
    cfg.train.difficulty.enabled = True
    print(f"[ddistance] training {config_ref} {overrides} in {path}", flush=True)
    train(cfg, path)


def _load_runs(ctx, spec: str, need_file: str, twins=(), twin_offset: int = 100):
    """The runs of ``spec`` (see the module docstring): {label: [(dir, source), ...]}. An entry naming
    this run itself with the training difficulty is replaced by its twin ``<workdir>_twin`` (the same
    CONFIG with seed + ``twin_offset``, trained when missing) when its label is in ``twins``, and left
    out otherwise (no distance of a difficulty function to itself)."""
    seed = _run_seed(ctx.workdir)
    me = os.path.realpath(ctx.workdir)
    runs = {}
    for label, where, source, cfg, over in parse_runs(spec, with_source=True):
        where = where.replace("{seed}", str(seed))
        if not os.path.isabs(where):
            where = os.path.normpath(os.path.join(ctx.workdir, where))
        need = need_file if not source else "summary.json"
        if any(ch in where for ch in "*?["):
            dirs = sorted(d for d in glob.glob(where) if os.path.realpath(d) != me)
        elif os.path.realpath(where) == me and source == ctx.cfg.ddistance.source:
            if label not in twins:
                runs[label] = []
                continue
            where = os.path.normpath(ctx.workdir) + "_twin"
            _train_missing(where, cfg, {**over, "seed": str(seed + int(twin_offset))}, need)
            dirs = [where]
        else:
            if os.path.realpath(where) != me:
                _train_missing(where, cfg, over, need)
            dirs = [where]
        runs[label] = [(d, source) for d in dirs]
    return runs


def _difficulty_of(workdir: str, source: str) -> np.ndarray:
    return D.load_difficulty(workdir, source)


# ----------------------------------------------------------------------------- difficulty
def run_difficulty(ctx) -> dict:
    cfg = ctx.cfg.difficulty
    stats_path = os.path.join(ctx.workdir, D.STATS_FILE)
    if not os.path.exists(stats_path):
        raise FileNotFoundError(f"{stats_path} not found: train the run with "
                                "--config.train.difficulty.enabled=True.")
    with np.load(stats_path) as z:
        stats = {k: z[k].astype(np.float64) for k in z.files}
    d = stats["difficulty"]
    summary = D.summarize(stats)
    ds = ctx.run.dataset
    train = ds.split("train")
    idx = train.dataset_indices
    labels = train.labels()
    per_class, extremes = {}, {}
    k = int(cfg.examples_per_class)
    for c in np.unique(labels):
        sel = idx[labels == c]
        dc = d[sel]
        ok = np.isfinite(dc)
        per_class[int(c)] = float(np.mean(dc[ok])) if ok.any() else None
        order = sel[ok][np.argsort(dc[ok], kind="stable")]
        extremes[int(c)] = {"hardest": order[:k].tolist(), "easiest": order[::-1][:k].tolist()}
    hist, edges = np.histogram(stats["mean_loss"][np.isfinite(stats["mean_loss"])], bins=30)
    groups = D.difficulty_groups(d)
    sizes = [int(np.sum(groups == g)) for g in range(D.NUM_GROUPS)]
    return {**summary, "per_class_mean_difficulty": per_class, "extremes": extremes,
            "group_sizes": sizes, "mean_loss_histogram": {"counts": hist, "edges": edges}}


def plot_difficulty(result, path, cfg):
    from jaxrobust.plots import _save, plt
    workdir = os.path.dirname(os.path.dirname(path))
    with np.load(os.path.join(workdir, D.STATS_FILE)) as z:
        d, d01 = z["difficulty"], z["difficulty_01"]
    ok = np.isfinite(d) & np.isfinite(d01)
    classes = sorted(result["extremes"], key=int)[:int(cfg.difficulty.plot_classes)]
    k = int(cfg.difficulty.examples_per_class)
    images = {}
    try:
        from jaxrobust.train import load_config
        from jaxrobust.train.loop import build_dataset
        ds = build_dataset(load_config(workdir))
        split = ds.split("train")
        pos_of = {int(i): p for p, i in enumerate(split.dataset_indices)}
        for c in classes:
            for which in ("easiest", "hardest"):
                ids = result["extremes"][c][which]
                images[(c, which)] = split.get([pos_of[int(i)] for i in ids])["image"]
    except Exception:  # noqa: BLE001 - the images are optional in the figure
        images = {}
    rows = len(classes) * 2 if images else 0
    fig = plt.figure(figsize=(4.5 + (0.6 * k if images else 0), max(3.5, 0.6 * rows)))
    ax = fig.add_axes([0.08, 0.12, 0.36 if images else 0.85, 0.78])
    ax.scatter(d[ok], d01[ok], s=2, alpha=0.3)
    ax.set_xlabel("difficulty (average loss), eq. 4.30")
    ax.set_ylabel("difficulty (average 0-1 error)")
    ax.set_title(f"corr = {result['loss_vs_01_correlation']:.3f}")
    if images:
        for r, (c, which) in enumerate([(c, w) for c in classes for w in ("easiest", "hardest")]):
            for j, im in enumerate(images[(c, which)][:k]):
                a = fig.add_axes([0.52 + j * 0.46 / k, 0.9 - (r + 1) * 0.8 / rows, 0.44 / k,
                                  0.78 / rows])
                a.imshow(np.squeeze(im), cmap="gray" if im.shape[-1] == 1 else None)
                a.set_xticks([])
                a.set_yticks([])
                if j == 0:
                    a.set_ylabel(f"{c} {which[:4]}", fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- D-distance
def run_ddistance(ctx) -> dict:
    cfg = ctx.cfg.ddistance
    mine = _difficulty_of(ctx.workdir, cfg.source)
    twins = [t.strip() for t in cfg.twins.split(",") if t.strip()]
    runs = _load_runs(ctx, cfg.against, D.DIFFICULTY_FILE, twins, cfg.twin_seed_offset)
    out, per_run = {}, {}
    for label, entries in runs.items():
        vals = [D.d_distance(mine, _difficulty_of(d, src)) for d, src in entries]
        per_run[label] = {f"{d}!{src}" if src else d: v for (d, src), v in zip(entries, vals)}
        out[label] = float(np.mean(vals)) if vals else None
    return {"distances": out, "per_run": per_run, "source": cfg.source,
            "instances": int(np.isfinite(mine).sum())}


def validate_ddistance(cfg):
    parse_runs(cfg.ddistance.against)
    if not cfg.ddistance.against:
        raise ValueError("ddistance.against is empty: name the runs to compare with "
                         "('label=DIR[@CONFIG];...').")


def plot_ddistance(result, path, cfg):
    from jaxrobust.plots import _save, plt
    labels = [k for k, v in result["distances"].items() if v is not None]
    vals = [result["distances"][k] for k in labels]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(labels), 3.2))
    ax.bar(labels, vals, color="C0")
    ax.axhline(1 / 3, color="C3", ls="--", lw=0.8, label="independent (1/3)")
    ax.set_ylabel("D-distance (eq. 4.31)")
    ax.legend(frameon=False, fontsize=8)
    ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)


# ----------------------------------------------------------------------------- Lipschitz
def run_lipschitz(ctx) -> dict:
    from jaxrobust.analysis import lipschitz as L
    cfg = ctx.cfg.lipschitz
    run = ctx.run
    shape = run.dataset.info.image_shape
    progress = (lambda s: print(f"[lipschitz] {s}", flush=True))
    res = L.lipschitz_bounds(run.model, run.variables, shape, ctx.key, runs=int(cfg.runs),
                             iters=int(cfg.power_iters), restarts=int(cfg.restarts),
                             methods=tuple(m for m in cfg.methods.split(",") if m),
                             max_dense=int(cfg.max_dense), progress=progress,
                             seqlip_runs=int(cfg.seqlip_runs))
    if cfg.gradient_examples > 0:
        split = run.dataset.split(ctx.cfg.data.split)
        n = min(int(cfg.gradient_examples), len(split))
        x = split.get(np.arange(n))["image"]
        est = {"max": 0.0, "mean": 0.0}
        for s in range(0, n, 100):
            e = L.gradient_norm_estimate(run.logits_fn, x[s:s + 100])
            est["max"] = max(est["max"], e["max"])
            est["mean"] += e["mean"] * len(x[s:s + 100]) / n
        res["gradient_norm"] = est
    return res


def plot_lipschitz(result, path, cfg):
    from jaxrobust.plots import _save, plt
    names = [m for m in ("autolip", "seqlip") if m in result]
    vals = [result[m]["mean"] for m in names]
    errs = [result[m]["std"] for m in names]
    if "gradient_norm" in result:
        names.append("max ‖∇‖ (lower)")
        vals.append(result["gradient_norm"]["max"])
        errs.append(0.0)
    fig, ax = plt.subplots(figsize=(4, 3.2))
    ax.bar(names, vals, yerr=errs, color=["C0", "C1", "C2"][:len(names)])
    ax.set_yscale("log")
    ax.set_ylabel("l2 Lipschitz constant")
    return _save(fig, path)


# ----------------------------------------------------------------------------- groups
def run_groups(ctx) -> dict:
    cfg = ctx.cfg.groups
    ref = cfg.reference or ctx.workdir
    d = D.load_difficulty(ref)
    groups_all = D.difficulty_groups(d)
    out = {"reference": ref, "sources": {}}
    for tag in [s for s in cfg.sources.split(",") if s]:
        h = D.load_instance_history(ctx.workdir, tag)
        idx = h["index"]
        g = np.where(idx < len(groups_all), groups_all[np.minimum(idx, len(groups_all) - 1)], -1)
        out["sources"][tag] = {
            "steps": h["steps"], "group_sizes": [int(np.sum(g == i)) for i in range(D.NUM_GROUPS)],
            "loss": D.group_means(h["loss"], g), "accuracy": D.group_means(h["correct"], g)}
    try:
        from jaxrobust.train.metrics import read_metrics
        test = [m for m in read_metrics(ctx.workdir) if m.get("split") == "test"]
        out["test"] = {"steps": [m["step"] for m in test],
                       "pgd_accuracy": [m.get("pgd_accuracy") for m in test],
                       "clean_accuracy": [m.get("clean_accuracy") for m in test]}
    except FileNotFoundError:
        pass
    return out


def validate_groups(cfg):
    if not [s for s in cfg.groups.sources.split(",") if s]:
        raise ValueError("groups.sources is empty: name the per-instance evaluations "
                         "(e.g. 'train:clean,train:pgd').")


def plot_groups(result, path, cfg):
    from jaxrobust.plots import _save, plt
    tags = list(result["sources"])
    show = [int(g) for g in cfg.groups.show.split(",") if g != ""]
    fig, axes = plt.subplots(2, len(tags), figsize=(4.2 * len(tags), 6.4), squeeze=False)
    for j, tag in enumerate(tags):
        s = result["sources"][tag]
        steps = np.asarray(s["steps"], float)
        for i, key in enumerate(("loss", "accuracy")):
            ax = axes[i][j]
            vals = np.asarray(s[key], float)
            for g in show:
                ax.plot(steps, vals[:, g], label=f"G{g}", color=f"C{g % 10}")
            ax.set_title(f"{tag}: group {key}")
            ax.set_xlabel("step")
            if "test" in result and key == "accuracy" and tag.endswith("pgd"):
                t = result["test"]
                ax.plot(t["steps"], t["pgd_accuracy"], "k-", lw=1.5, alpha=0.6, label="test PGD")
            ax.legend(frameon=False, fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- overfitting gap
def robust_gap(workdir: str, split: str = "test", key: str = "pgd_accuracy") -> dict:
    """Best and last value of ``key`` over the run's periodic evaluations on ``split``
    (``metrics.jsonl``), the gap best − last and where the best was."""
    from jaxrobust.train.metrics import read_metrics
    recs = [m for m in read_metrics(workdir) if m.get("split") == split and key in m]
    if not recs:
        raise ValueError(f"{workdir}/metrics.jsonl has no {split} evaluation with {key!r} (periodic "
                         "evaluation: train.eval_every_epochs > 0 and eval.attack.steps > 0).")
    vals = np.asarray([m[key] for m in recs], float)
    b = int(np.argmax(vals))
    clean = [m.get("clean_accuracy") for m in recs]
    return {"best": float(vals[b]), "last": float(vals[-1]), "gap": float(vals[b] - vals[-1]),
            "best_step": int(recs[b]["step"]), "last_step": int(recs[-1]["step"]),
            "clean_at_best": clean[b], "clean_last": clean[-1], "evaluations": len(recs),
            "steps": [int(m["step"]) for m in recs], "values": vals.tolist()}


def _train_curve(workdir: str):
    from jaxrobust.train.metrics import read_metrics
    tr = [m for m in read_metrics(workdir) if m.get("split") == "train"]
    key = "adv_accuracy" if any("adv_accuracy" in m for m in tr) else "accuracy"
    return [m["step"] for m in tr if key in m], [m[key] for m in tr if key in m]


def run_overfitting(ctx) -> dict:
    cfg = ctx.cfg.overfitting
    out = {**robust_gap(ctx.workdir, cfg.split, cfg.key)}
    out["train_steps"], out["train_accuracy"] = _train_curve(ctx.workdir)
    others = {}
    for label, where, _, _ in parse_runs(cfg.others):
        where = where if os.path.isabs(where) else os.path.normpath(os.path.join(ctx.workdir, where))
        try:
            g = robust_gap(where, cfg.split, cfg.key)
            g["train_steps"], g["train_accuracy"] = _train_curve(where)
            others[label] = g
        except (FileNotFoundError, ValueError) as e:
            others[label] = {"error": str(e)}
    out["others"] = others
    return out


def plot_overfitting(result, path, cfg):
    from jaxrobust.plots import _save, plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    curves = {cfg.overfitting.label or "this run": result, **{k: v for k, v in result["others"].items()
                                                             if "values" in v}}
    for i, (label, r) in enumerate(curves.items()):
        c = f"C{i % 10}"
        ax.plot(r["steps"], 1 - np.asarray(r["values"]), "-", color=c, label=f"{label} test")
        if r.get("train_steps"):
            ax.plot(r["train_steps"], 1 - np.asarray(r["train_accuracy"], float), "--", color=c,
                    alpha=0.7, label=f"{label} train")
    ax.set_xlabel("step")
    ax.set_ylabel("robust error")
    ax.set_title("robust error: test (solid), training (dashed)")
    ax.legend(frameon=False, fontsize=7)
    return _save(fig, path)


register_analysis("difficulty", run_difficulty, plot=plot_difficulty,
                  summary=lambda r: {k: r[k] for k in ("instances", "loss_vs_01_correlation",
                                                       "mean_loss")})
register_analysis("ddistance", run_ddistance, plot=plot_ddistance, validate=validate_ddistance,
                  summary=lambda r: r["distances"])
register_analysis("lipschitz", run_lipschitz, plot=plot_lipschitz,
                  summary=lambda r: {m: r[m]["mean"] for m in ("autolip", "seqlip") if m in r})
register_analysis("groups", run_groups, plot=plot_groups, validate=validate_groups,
                  summary=lambda r: {"sources": list(r["sources"])})
register_analysis("overfitting", run_overfitting, plot=plot_overfitting,
                  summary=lambda r: {k: r[k] for k in ("best", "last", "gap")})

__all__ = ["parse_runs", "robust_gap", "run_difficulty", "run_ddistance", "run_lipschitz",
           "run_groups", "run_overfitting"]
