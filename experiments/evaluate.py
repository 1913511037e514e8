"""Evaluate the robustness of a trained run with an ensemble of attacks; writes RUN/eval.json
(``--config.output=NAME.json`` for another name).

    python -m experiments.evaluate --config=configs/eval/autoattack_standard.py --workdir=runs/demo \
        [--config.threat.eps=0.2 --config.threat.norm=l2 --config.num_examples=500]

``threat.eps`` unset (None) and ``threat.norm`` "" mean the training run's; the box is the run's data
pixel range (``jaxrobust.train.build_threat``) and is recorded in eval.json. With
``--config.distributed=True`` each process attacks its slice of the examples and process 0 writes the
combined results.
"""
import os

import jax
import numpy as np

from experiments import (define_entrypoint_flags, gather_examples, import_run_modules, make_main,
                         maybe_initialize_distributed, process_slice, run, write_json_atomic)

from jaxrobust.attacks.autoattack import evaluate_robustness
from jaxrobust.train import build_threat, load_trained

define_entrypoint_flags("Evaluation config file.", "Work directory of a training run.")


def combine_process_results(res: dict, n_local: int, allgather=None) -> dict:
    """Sums the per-process accuracies of :func:`evaluate_robustness` weighted by each process's
    number of examples (the counts behind them are integers); seconds are the slowest process's.
    Single process: ``res`` unchanged."""
    if allgather is None:
        if jax.process_count() == 1:
            return res
        from jax.experimental import multihost_utils
        allgather = lambda t: multihost_utils.process_allgather(t, tiled=False)
    names = list(res["robust_accuracy"])
    counts = np.array([n_local, res["clean_accuracy"] * n_local, res["worst_case_robust_accuracy"] * n_local]
                      + [res["robust_accuracy"][k] * n_local for k in names], np.float64)
    seconds = np.array([res["seconds"][k] for k in names], np.float64)
    g = jax.tree.map(np.asarray, allgather({"counts": counts, "seconds": seconds}))
    tot = np.rint(g["counts"]).sum(0)
    n = max(int(tot[0]), 1)
    return dict(res, num_examples=int(tot[0]), clean_accuracy=float(tot[1] / n),
                worst_case_robust_accuracy=float(tot[2] / n),
                robust_accuracy={k: float(tot[3 + i] / n) for i, k in enumerate(names)},
                seconds={k: float(v) for k, v in zip(names, g["seconds"].max(0))})


def evaluate(config, workdir):
    maybe_initialize_distributed(config)
    import_run_modules(workdir)
    run_ = load_trained(workdir)
    threat = build_threat(run_.config, run_.dataset.info, norm=config.threat.norm or None,
                          eps=config.threat.eps)
    split = run_.dataset.split(config.split)
    n = len(split) if config.num_examples <= 0 else min(config.num_examples, len(split))
    idx, mask = process_slice(n)
    if not mask.any():
        raise ValueError(f"{n} examples cannot be split over {jax.process_count()} processes: evaluate "
                         f"at least one example per process.")
    batch = split.get(idx[mask])
    pid, count = jax.process_index(), jax.process_count()
    stem = os.path.splitext(config.output)[0].replace("eval", "eval_state", 1) if \
        config.output.startswith("eval") else "eval_state_" + os.path.splitext(config.output)[0]
    state_path = os.path.join(workdir, f"{stem}.npz" if count == 1 else f"{stem}.{pid}of{count}.npz")
    if not config.resume and os.path.exists(state_path):
        os.remove(state_path)
    key = jax.random.PRNGKey(config.seed)  # one process: the same key as ever (reproducible numbers)
    res = evaluate_robustness(run_.logits_fn, batch["image"], batch["label"],
                              key if count == 1 else jax.random.fold_in(key, pid), threat,
                              attacks=tuple(config.attacks), mode=config.mode, batch_size=config.batch_size,
                              state_path=state_path, n_iter=config.n_iter, n_queries=config.n_queries,
                              pgd_steps=config.pgd_steps, pgd_restarts=config.pgd_restarts,
                              pgd_step_size=config.pgd_step_size,
                              n_target_classes=config.n_target_classes)
    if config.save_adversarial:
        pad = lambda a: np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[:1], len(mask) - len(a), 0)])
        full = gather_examples({"x_adv": pad(res["x_adv"]), "index": pad(batch["index"]),
                                "label": pad(batch["label"]), "robust": pad(res["robust"])}, mask)
        if pid == 0:
            np.savez_compressed(os.path.join(workdir, "eval_adversarial.npz"), **full)
    res = combine_process_results(res, int(mask.sum()))
    out = {k: v for k, v in res.items() if k not in ("x_adv", "robust")}
    out.update(threat={"norm": threat.norm, "eps": float(threat.eps),
                       "box": None if threat.box is None else [float(b) for b in threat.box]},
               split=config.split, step=run_.step, attacks=list(config.attacks), processes=count)
    write_json_atomic(out, os.path.join(workdir, config.output))
    if os.path.exists(state_path):
        os.remove(state_path)  # finished: nothing to resume
    return out


main = make_main(evaluate, lambda out: {k: out[k] for k in ("num_examples", "clean_accuracy", "robust_accuracy",
                                                            "worst_case_robust_accuracy")},
                 resume_note="the finished attacks are kept in RUN/eval_state.npz; resume with the same command")


if __name__ == "__main__":
    run(main)
