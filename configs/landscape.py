"""Thesis Figs 4.5 and 4.8 (§4.2.3): Hessian spectra and mode connectivity of adversarially trained
LeNets on MNIST, scaled to mnist5k and 2 CPU cores.

    python -m experiments.train --config=configs/landscape.py:mnist5k_lenet_eps0.3 --workdir=W
    python -m experiments.analyze --config=configs/analyze/hessian.py --workdir=W
    python -m experiments.reproduce --config=configs/landscape.py:mnist5k_lenet --workdir=D

A *run* argument is ``mnist5k_lenet_eps<ε>[,smoke]`` (PGD-AT at l_inf ε; ε = 0 is clean training).
A *row-set* argument ``mnist5k_lenet`` trains ε ∈ {0, 0.1, 0.2, 0.3, 0.4} and computes the top-20
Hessian eigenvalues of each run's training loss L_ε (Fig 4.5); ``,smoke`` shrinks everything to
seconds (tests).

Protocol (thesis §4.2.3 and its code): LeNet of Table 4.1, PGD-AT, Adam, batch 128, the Hessian of
L_ε by power iteration with deflation (PyHessian: 100 iterations, tol 1e-3) and by Lanczos, both
normalised by the mean loss at random parameters. Deviations (CPU budget; docs/REPRODUCTION.md):
width w = 4 instead of 16, 4,000 training images instead of 60,000, 15 epochs instead of 100,
PGD-10 with step 2.5ε/10 instead of step 0.01 with ε/0.01 + 10 iterations, lr 1e-3 instead of 1e-4
with ε ramped linearly from 0 over the first 5 epochs (so that ε = 0.4 trains in 15 epochs), the
Hessian on 1,000 training images with the PGD points held fixed.
"""
import re

from configs.common import base_config, reproduce_config, reproduce_row, reproduce_step, schedule_config

EPS_VALUES = (0.0, 0.1, 0.2, 0.3, 0.4)
WIDTH = 4
EPOCHS = 15.0
RAMP_EPOCHS = 5.0
_RUN = re.compile(r"^mnist5k_lenet_eps(\d+(?:\.\d+)?)$")
ROW_SETS = ("mnist5k_lenet",)


def _valid() -> str:
    return (f"a run 'mnist5k_lenet_eps<ε>[,smoke]' (e.g. mnist5k_lenet_eps0.3) or a row set "
            f"{list(ROW_SETS)}[,smoke]")


def train_config(eps: float, smoke: bool = False):
    """PGD-AT (ε > 0) or clean training (ε = 0) of LeNet w=4 on mnist5k (see the module docstring)."""
    c = base_config()
    c.data.name = "mnist5k"
    c.data.batch_size = 128
    c.data.eval_batch_size = 500
    c.model.name = "lenet"
    c.model.kwargs.w = WIDTH
    c.threat.norm, c.threat.eps = "linf", float(eps)
    c.objective.name = "pgd_at" if eps > 0 else "standard"
    c.objective.attack.steps = 10
    c.objective.attack.step_size = -1.0  # 2.5 ε / 10
    c.objective.eps_schedule = schedule_config("linear", start_fraction=0.0, final_fraction=1.0,
                                               ramp_epochs=RAMP_EPOCHS)
    c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "adam", 1e-3, 0.0
    c.schedule = schedule_config("constant")
    c.train.num_epochs = EPOCHS
    c.train.log_every = 25
    c.train.eval_every_epochs = 5.0
    c.train.keep_checkpoints = 4
    c.train.tensorboard = False
    c.eval.attack.steps = 20 if eps > 0 else 0
    if smoke:
        c.data.batch_size = 32
        c.model.kwargs.w = 1
        c.objective.attack.steps = 2
        c.objective.eps_schedule = schedule_config("constant")
        c.train.num_steps = 4
        c.train.log_every = 2
        c.train.eval_every_epochs = 0.0
        c.eval.attack.steps = 2 if eps > 0 else 0
        c.eval.num_examples = 64
    return c


def _eps_name(eps: float) -> str:
    return f"eps{eps:g}".replace(".", "")  # eps0, eps01, ..., eps04 (row names: no dots)


def row_set(smoke: bool = False):
    """Fig 4.5: one row per training ε; the Hessian of each run's L_ε."""
    c = reproduce_config(
        "fig4_5_mnist5k_lenet", "Figure 4.5 — top Hessian eigenvalues vs the training ε (mnist5k, LeNet w=4)",
        columns=(("clean acc (%)", "summary.json:eval.test.clean_accuracy*100"),
                 ("PGD-20 acc (%)", "summary.json:eval.test.pgd_accuracy*100"),
                 ("L_ε", "analysis/hessian.json:loss.value"),
                 ("λ1 power", "analysis/hessian.json:power.0"),
                 ("λ1 Lanczos", "analysis/hessian.json:lanczos.0"),
                 ("λ20 Lanczos", "analysis/hessian.json:lanczos.19"),
                 ("λ1 / loss scale", "analysis/hessian.json:normalized.power.0"),
                 ("λ20 / loss scale", "analysis/hessian.json:normalized.power.19")),
        row_header="training ε", decimals=3, claims="configs.landscape:claims",
        notes="λ: top Hessian eigenvalues of the training loss L_ε on 1,000 training images (PGD-10 "
              "points held fixed); '/ loss scale': divided by the mean L_ε at 5 random initialisations "
              "(the thesis's normalisation). The thesis shows Fig 4.5 as curves, not numbers.")
    suffix = ",smoke" if smoke else ""
    for eps in EPS_VALUES:
        reproduce_row(c, _eps_name(eps), f"configs/landscape.py:mnist5k_lenet_eps{eps:g}{suffix}",
                      label=f"ε = {eps:g}", steps="hessian")
    hess = ("data.num_examples=1000", "hessian.lanczos_steps=60") if not smoke else ()
    reproduce_step(c, "hessian", "analyze", f"configs/analyze/hessian.py{':smoke' if smoke else ''}",
                   "analysis/hessian.json", overrides=hess)
    return c


def claims(means):
    """Fig 4.5's claim on our numbers: the top eigenvalue (raw and normalised) grows with ε."""
    rows = [_eps_name(e) for e in EPS_VALUES if _eps_name(e) in means]
    out = []
    for col in ("λ1 power", "λ1 / loss scale", "λ1 Lanczos"):
        vals = [means[r].get(col) for r in rows]
        if any(v is None for v in vals) or len(vals) < 2:
            out.append({"claim": f"{col} grows with the training ε", "holds": None,
                        "evidence": "missing values"})
            continue
        pairs = [(i, j) for i in range(len(vals)) for j in range(i + 1, len(vals))]
        concordant = sum(vals[j] > vals[i] for i, j in pairs)
        monotone = all(vals[i + 1] > vals[i] for i in range(len(vals) - 1))
        out.append({"claim": f"{col} grows with the training ε (Fig 4.5)",
                    "holds": bool(monotone),
                    "evidence": f"{', '.join(f'{v:.3g}' for v in vals)}; {concordant}/{len(pairs)} "
                                f"pairs increasing (Kendall τ = {(2 * concordant - len(pairs)) / len(pairs):.2f})"})
    return out


def get_config(arg: str = "mnist5k_lenet_eps0.3"):
    head, *opts = [s.strip() for s in str(arg).split(",")]
    if any(o != "smoke" for o in opts):
        raise ValueError(f"landscape: bad config argument {arg!r}; expected {_valid()}.")
    smoke = "smoke" in opts
    if head in ROW_SETS:
        return row_set(smoke)
    m = _RUN.match(head)
    if not m:
        raise ValueError(f"landscape: bad config argument {arg!r}; expected {_valid()}.")
    return train_config(float(m.group(1)), smoke)
