"""Evaluate the robustness of a trained run with an ensemble of attacks; writes RUN/eval.json.

    python -m experiments.evaluate --config=configs/eval/autoattack_standard.py --workdir=runs/demo \
        [--config.threat.eps=0.2 --config.threat.norm=l2 --config.num_examples=500]
"""
import os

import jax
import numpy as np
from absl import app

from experiments import define_entrypoint_flags, make_main, write_json_atomic

from jaxrobust.attacks.autoattack import evaluate_robustness
from jaxrobust.threat import ThreatModel
from jaxrobust.train import load_trained

define_entrypoint_flags("Evaluation config file.", "Work directory of a training run.")


def evaluate(config, workdir):
    run = load_trained(workdir)
    norm = config.threat.norm or run.config.threat.norm
    eps = config.threat.eps if config.threat.eps >= 0 else run.config.threat.eps
    box = tuple(run.config.threat.box) if run.config.threat.get("box") is not None else None
    threat = ThreatModel(norm=norm, eps=float(eps), box=box)
    split = run.dataset.split(config.split)
    n = len(split) if config.num_examples <= 0 else min(config.num_examples, len(split))
    batch = split.get(np.arange(n))
    state_path = os.path.join(workdir, "eval_state.npz")
    if not config.resume and os.path.exists(state_path):
        os.remove(state_path)
    res = evaluate_robustness(run.logits_fn, batch["image"], batch["label"],
                              jax.random.PRNGKey(config.seed), threat, attacks=tuple(config.attacks),
                              mode=config.mode, batch_size=config.batch_size, state_path=state_path,
                              n_iter=config.n_iter, n_queries=config.n_queries,
                              pgd_steps=config.pgd_steps, pgd_restarts=config.pgd_restarts,
                              n_target_classes=config.n_target_classes)
    if config.save_adversarial:
        np.savez_compressed(os.path.join(workdir, "eval_adversarial.npz"), x_adv=res["x_adv"],
                            index=batch["index"], label=batch["label"], robust=res["robust"])
    out = {k: v for k, v in res.items() if k not in ("x_adv", "robust")}
    out.update(threat={"norm": norm, "eps": float(eps)}, split=config.split, step=run.step,
               attacks=list(config.attacks))
    write_json_atomic(out, os.path.join(workdir, "eval.json"))
    os.remove(state_path) if os.path.exists(state_path) else None  # finished: nothing to resume
    return out


main = make_main(evaluate, lambda out: {k: out[k] for k in ("num_examples", "clean_accuracy", "robust_accuracy",
                                                            "worst_case_robust_accuracy")})


if __name__ == "__main__":
    app.run(main)
