"""Certify a trained run (thesis Ch. 3): writes RUN/certify.json (+ PNG figures under RUN/plots/).

    python -m experiments.certify --config=configs/certify/table3_6.py --workdir=runs/demo
    python -m experiments.certify --config=configs/certify/nonuniform.py --workdir=runs/demo

``table3_6``: CTE, PGD error, CRE IBP / Lin (/ MIP), ACB IBP / Lin / PEC at the budget ε (one-shot,
Table 3.6), the same for extra linear methods, Algorithm 3.5 vs binary search (mean number of bound
computations T_PEC / T_Lin and the radii found, Table 3.9), Fig 3.6 (certified bound vs ε for one
input) and Fig 3.9 (distribution of the optimal certified bounds).
``nonuniform``: Algorithm 3.3, uniform vs non-uniform ε_avg and their ratio (Table 3.2), cosine
similarity of the bounding maps (Table 3.3), Fig 3.5 bounding maps, Fig 3.3 for 2-D data.
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import (define_entrypoint_flags, gather_examples, import_run_modules, make_main,
                         maybe_initialize_distributed, process_slice, run, write_json_atomic)

from jaxrobust.attacks import pgd
from jaxrobust.certify import (certified_radius_curve, certify, cosine_similarity_stats,
                               nonuniform_bounds, optimal_eps_search)
from jaxrobust.models import as_float32
from jaxrobust.train import build_threat, load_trained
from jaxrobust.train.metrics import Progress

define_entrypoint_flags("Certification config file.", "Work directory of a training run.")


def _plots_on(config) -> bool:
    """Figures are drawn by process 0 only."""
    return bool(config.plots.enabled) and jax.process_index() == 0


def _batches(n, batch_size):
    """(start, indices padded to batch_size, mask): static shapes, the last batch padded."""
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(s + batch_size, n))
        mask = np.ones(batch_size, bool)
        mask[len(idx):] = False
        yield s, np.concatenate([idx, np.full(batch_size - len(idx), idx[0])]), mask


def _map_batches(step, x, y, batch_size, name, *extra):
    """Applies a jitted ``step(x, y, *extra) -> dict of (B, ...)`` over padded batches of the
    examples and returns the concatenated outputs of all of them, in order. In a multi-process run
    (``--config.distributed``) each process maps its slice and the slices are all-gathered."""
    n = x.shape[0]
    idx, keep = process_slice(n)
    arrays = [np.asarray(a)[idx] for a in (x, y) + extra]
    m = len(idx)
    bs = min(batch_size, max(m, 1))
    prog = Progress(total=int(keep.sum()), every=1, name=name, unit="images")
    outs = []
    for s, bidx, mask in _batches(m, bs):
        o = jax.device_get(step(*(jnp.asarray(a[bidx]) for a in arrays)))
        outs.append({k: np.asarray(v)[mask] for k, v in o.items()})
        prog.maybe_print(min(s + int(mask.sum()), int(keep.sum())))
    local = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return gather_examples(local, keep)


def table3_6(config, run, threat, fn, x, y, plot_dir):
    eps = float(threat.eps)
    out, timing = {}, {}
    methods = ["ibp", config.lin_method] + [m for m in config.extra_methods
                                            if m not in ("ibp", config.lin_method)]

    def one_shot(xb, yb):
        res = {"correct": jnp.argmax(fn(xb), -1) == yb}
        for m in methods:
            c = certify(fn, xb, yb, threat, method=m)
            res[f"cert_{m}"], res[f"radius_{m}"] = c.certified, c.radius
        return res

    t = time.time()
    r = _map_batches(jax.jit(one_shot), x, y, config.batch_size, "certify")
    timing["certify_s"] = time.time() - t

    key = jax.random.PRNGKey(config.seed)

    def attack(xb, yb):
        xa = pgd(fn, xb, yb, key, threat, steps=config.pgd.steps, restarts=config.pgd.restarts,
                 loss=config.pgd.loss, unroll=False)
        return {"robust": jnp.argmax(fn(xa), -1) == yb}

    t = time.time()
    r.update(_map_batches(jax.jit(attack), x, y, config.batch_size, "pgd"))
    timing["pgd_s"] = time.time() - t
    correct, robust = r["correct"], r["robust"] & r["correct"]
    out["CTE"] = 100 * float(1 - correct.mean())
    out["PGD"] = 100 * float(1 - robust.mean())
    for m in methods:
        cert = r[f"cert_{m}"] & correct
        tag = {"ibp": "IBP", config.lin_method: "Lin"}.get(m, m)
        out[f"CRE {tag}"] = 100 * float(1 - cert.mean())
        out[f"ACB {tag}"] = float(np.mean(np.where(cert, eps, 0.0)))
        if m != "ibp":
            out[f"ACB PEC{'' if tag == 'Lin' else ' ' + m}"] = float(np.mean(np.where(correct, r[f"radius_{m}"], 0.0)))
    any_cert = np.zeros_like(correct)
    for m in methods:
        any_cert |= r[f"cert_{m}"] & correct
    # A certificate broken by an attack would be a soundness bug: report it loudly, never hide it.
    out["certified_but_attacked"] = int(np.sum(any_cert & ~robust))
    if out["certified_but_attacked"]:
        logging.error("%d certified points were broken by PGD: bound propagation is unsound here.",
                      out["certified_but_attacked"])

    if config.milp.enabled:
        if threat.norm != "linf":
            out["CRE MIP"] = None
            out["milp_note"] = "MILP verification is implemented for l_inf only."
        else:
            from jaxrobust.certify.milp import milp_verify
            n = min(config.milp.num_examples, x.shape[0])
            t = time.time()
            res = milp_verify(fn, jnp.asarray(x[:n]), jnp.asarray(y[:n]), threat, method=config.lin_method,
                              time_limit=config.milp.time_limit, progress=True)
            timing["milp_s"] = time.time() - t
            status = np.asarray(res.status)
            out["CRE MIP"] = 100 * float(np.mean(status != "verified"))
            out["milp"] = {"num_examples": int(n), "time_limit_s": config.milp.time_limit,
                           **{s: int(np.sum(status == s)) for s in np.unique(status)},
                           "mean_seconds": float(np.mean(res.seconds)),
                           "CRE Lin (same points)": 100 * float(1 - np.mean(r[f"cert_{config.lin_method}"][:n] & correct[:n]))}

    if config.search.enabled:
        n = min(config.search.num_examples, x.shape[0])
        hi = config.search.eps_high if config.search.eps_high > 0 else 4 * eps
        tol = config.search.tol if config.search.tol > 0 else eps / 100
        xs, ys = x[:n], y[:n]
        for use_pec, tag in ((True, "PEC"), (False, "Lin")):
            t = time.time()
            s = _map_batches(jax.jit(lambda xb, yb, use_pec=use_pec: optimal_eps_search(
                fn, xb, yb, threat, eps_high=hi, tol=tol, method=config.lin_method,
                use_pec=use_pec)._asdict()), xs, ys, config.batch_size, f"search-{tag}")
            timing[f"search_{tag}_s"] = time.time() - t
            rad = np.where(correct[:n], s["radius"], 0.0)
            out[f"T_{tag}"] = float(np.mean(s["bound_computations"]))
            out[f"optimal radius {tag}"] = float(np.mean(rad))
            r[f"search_{tag}"] = rad
        out["search"] = {"num_examples": int(n), "eps_high": hi, "tol": tol}
        if _plots_on(config):
            from jaxrobust import plots
            plots.plot_radius_distribution({"Alg 3.5 (PEC)": r["search_PEC"], "binary search": r["search_Lin"]},
                                           os.path.join(plot_dir, "fig3_9_radius_distribution.png"), eps=eps)

    if _plots_on(config):
        from jaxrobust import plots
        i = min(config.plots.example, x.shape[0] - 1)
        grid = np.linspace(0, config.search.eps_high if config.search.eps_high > 0 else 4 * eps,
                           config.plots.num_eps + 1)[1:]
        pec, plain = certified_radius_curve(fn, jnp.asarray(x[i:i + 1]), jnp.asarray(y[i:i + 1]), threat, grid,
                                            method=config.lin_method)
        plots.plot_certified_vs_eps(grid, np.asarray(pec)[:, 0], np.asarray(plain)[:, 0],
                                    os.path.join(plot_dir, "fig3_6_certified_vs_eps.png"),
                                    title=f"input {i} (label {int(y[i])})", norm=threat.norm)
    out["timing"] = timing
    return out


def nonuniform(config, run, threat, fn, x, y, plot_dir):
    eps0 = config.nonuniform.eps0 if config.nonuniform.eps0 > 0 else float(threat.eps)
    correct = np.asarray(jnp.argmax(fn(jnp.asarray(x)), -1) == jnp.asarray(y))
    x, y = x[correct], y[correct]  # Table 3.2 is over correctly classified points
    kw = dict(norm=threat.norm, box=threat.box if config.nonuniform.use_box else None,
              iterations=config.nonuniform.iterations,
              lr=config.nonuniform.lr if config.nonuniform.lr > 0 else None, delta=config.nonuniform.delta, method=config.nonuniform.method)

    t = time.time()
    uni = _map_batches(jax.jit(lambda xb, yb: nonuniform_bounds(fn, xb, yb, eps0=eps0, uniform=True, **kw)._asdict()),
                       x, y, config.batch_size, "uniform")
    t_uni = time.time() - t
    t = time.time()
    # Warm start from the uniform region (feasible for the non-uniform problem) and keep it as a
    # fallback, so the reported non-uniform volume is never below the uniform one.
    non = _map_batches(jax.jit(lambda xb, yb, ub: nonuniform_bounds(fn, xb, yb, init=0.9 * ub + 1e-6,
                                                                    fallback=ub, **kw)._asdict()),
                       x, y, config.batch_size, "nonuniform", uni["eps"])
    t_non = time.time() - t
    ok = uni["certified"] & non["certified"]
    out = {"num_correct": int(x.shape[0]), "num_certified": int(ok.sum()),
           "uniform eps_avg": float(np.mean(uni["eps_avg"][ok])) if ok.any() else 0.0,
           "nonuniform eps_avg": float(np.mean(non["eps_avg"][ok])) if ok.any() else 0.0}
    out["ratio"] = out["nonuniform eps_avg"] / max(out["uniform eps_avg"], 1e-30)
    out["mean cosine"], out["min cosine"] = cosine_similarity_stats(non["eps"], ok)
    out["timing"] = {"uniform_s": t_uni, "nonuniform_s": t_non}
    if jax.process_index() == 0:
        np.savez_compressed(os.path.join(os.path.dirname(plot_dir), "nonuniform_eps.npz"),
                            uniform=uni["eps"], nonuniform=non["eps"], label=y, certified=ok)
    if _plots_on(config) and ok.any():
        from jaxrobust import plots
        sel = np.nonzero(ok)[0]
        if x.ndim == 2 and x.shape[1] == 2:
            sel = sel[:40]
            plots.plot_synthetic_regions(fn, x[sel], y[sel], uni["eps"][sel][:, 0], non["eps"][sel],
                                         os.path.join(plot_dir, "fig3_3_synthetic_regions.png"),
                                         box=threat.box or (-1.0, 1.0), norm=threat.norm)
        elif x.ndim == 4:
            sel = sel[:config.plots.num_maps]
            plots.plot_bounding_maps(x[sel], [uni["eps"][sel], non["eps"][sel]],
                                     os.path.join(plot_dir, "fig3_5_bounding_maps.png"),
                                     col_titles=["input", "uniform", "non-uniform"])
        if len(sel) >= 2 or ok.sum() >= 2:
            plots.plot_cosine_similarity(non["eps"][ok], os.path.join(plot_dir, "cosine_similarity.png"))
    return out


def certify_run(config, workdir):
    maybe_initialize_distributed(config)
    import_run_modules(workdir)
    run_ = load_trained(workdir)
    threat = build_threat(run_.config, run_.dataset.info, norm=config.threat.norm or None,
                          eps=config.threat.eps)
    # bounds and certificates always in float32 (a bf16-trained model is cast up)
    variables, model = run_.variables, as_float32(run_.model)
    fn = lambda x: model.apply(variables, x, train=False)
    split = run_.dataset.split(config.split)
    n = len(split) if config.num_examples <= 0 else min(config.num_examples, len(split))
    batch = split.get(np.arange(n))
    x, y = np.asarray(batch["image"]), np.asarray(batch["label"])
    plot_dir = os.path.join(workdir, "plots")
    if jax.process_index() == 0:
        os.makedirs(plot_dir, exist_ok=True)
    t = time.time()
    if config.mode == "table3_6":
        out = table3_6(config, run_, threat, fn, x, y, plot_dir)
        name = "certify.json"
    elif config.mode == "nonuniform":
        out = nonuniform(config, run_, threat, fn, x, y, plot_dir)
        name = "certify_nonuniform.json"
    else:
        raise ValueError(f"Unknown certification mode {config.mode!r}; expected 'table3_6' or 'nonuniform'.")
    out.update(mode=config.mode, num_examples=int(n), split=config.split, step=run_.step,
               threat={"norm": threat.norm, "eps": float(threat.eps),
                       "box": None if threat.box is None else [float(b) for b in threat.box]},
               lin_method=config.lin_method, processes=jax.process_count(), total_s=time.time() - t)
    write_json_atomic(out, os.path.join(workdir, config.output or name))
    return out


main = make_main(certify_run, lambda out: {k: v for k, v in out.items() if k not in ("timing",)},
                 resume_note="certification restarts from the beginning; run the same command")


if __name__ == "__main__":
    run(main)
