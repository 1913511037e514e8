"""Thesis Tables 5.7–5.9 (§5.1.4): robust binary sub-networks against dense adversarial training and
pruning baselines, ``<dataset>_<net>_<method>[,smoke]``.

    python -m experiments.train --config=configs/table5_7.py:cifar10_rn34_ours --workdir=W
    python -m experiments.reproduce --config=configs/table5_7.py:mnist5k_cnn --workdir=D

Methods (:data:`METHODS`):

- ``at`` / ``at_lbn`` / ``trades``: adversarial training (PGD-10) / with the last BatchNorm (ResNets)
  / TRADES (β = 6) of the unpruned, full-precision net (also HYDRA's pre-training stage);
- ``hydra_prune``: HYDRA's pruning stage (Sehwag et al. 2020): the pre-trained weights frozen
  (``--config.model.kwargs.weights_from=<the at run>``), scores initialised ∝ |W| (√(6/fan_in)·W/max|W|)
  and trained with PGD-10 AT, keep 1% with adaptive allocation γ = 0.1 (the thesis's "HYDRA p = 0.1"),
  20 epochs (CIFAR) at lr 0.1;
- ``hydra_finetune``: HYDRA's fine-tuning: the mask of the pruning stage fixed
  (``scores_from=<the hydra_prune run>``), the full-precision weights trained (from the pre-trained
  ones, ``weights_from``) with PGD-10 AT, lr 0.01, 100 epochs (CIFAR);
- ``ours``: the binary sub-network search (±1 weights, LBN, γ = 0.1, r = 0.99, a = 0.01, PGD-10);
  ``ours_fast``: the same with FGSM + ATTA (100 epochs on CIFAR); ``ours_trades``: with TRADES;
- ``ours_fixed``: the fixed pruning rate (γ = 1, "Ours p = 1.0");
- ``edgepopup``: the original edge-popup (Ramanujan et al. 2020) with PGD-10: Signed Kaiming Constant
  weights, Kaiming-uniform scores, no LBN, fixed rate (γ = 1).

A row set ``<dataset>_<net>`` trains every method for ``experiments.reproduce``, the HYDRA stages
chained through ``{root}`` (the pruning stage reads the ``at`` row's weights, the fine-tuning stage the
pruning stage's scores). Datasets, nets and the per-dataset protocol: ``configs/table5_2.py``.
"""
from __future__ import annotations

from configs import table5_2 as t52
from configs.common import schedule_config, subnet_model

METHODS = ("at", "at_lbn", "trades", "hydra_prune", "hydra_finetune", "ours", "ours_fast",
           "ours_trades", "ours_fixed", "edgepopup")
HYDRA_EPOCHS = {"prune": 20.0, "finetune": 100.0}  # CIFAR / SVHN; ImageNet-100: 10 / 50
MNIST_HYDRA_EPOCHS = {"prune": 3.0, "finetune": 3.0}
LABELS = {"at": "AT (dense, FP)", "at_lbn": "AT + LBN (dense, FP)", "trades": "TRADES (dense, FP)",
          "hydra_prune": "HYDRA pruning stage (FP, γ=0.1)", "hydra_finetune": "HYDRA (FP, γ=0.1)",
          "ours": "Ours (binary, LBN, γ=0.1)", "ours_fast": "Ours fast (FGSM+ATTA)",
          "ours_trades": "Ours + TRADES", "ours_fixed": "Ours, fixed rate (γ=1)",
          "edgepopup": "edge-popup (SKC, no LBN, γ=1)"}
# Thesis CIFAR-10 (Tables 5.7-5.9, RN34): (clean %, AA %); FP for dense/HYDRA, binary for ours
THESIS_CIFAR10 = {"at": (80.99, 43.26), "at_lbn": (80.96, 42.39), "trades": (None, 49.07),
                  "hydra_finetune": (75.31, 42.73), "ours": (76.59, 45.06),
                  "ours_fast": (81.63, 40.77), "ours_fixed": (None, 34.57)}
THESIS_CIFAR100 = {"at": (61.48, 36.63), "at_lbn": (57.73, 35.15), "trades": (None, 35.28),
                   "hydra_finetune": (55.92, 33.00), "ours": (60.16, 34.83),
                   "ours_fast": (63.73, 34.45), "ours_fixed": (None, 26.32)}


def _hydra_epochs(dataset: str, stage: str) -> float:
    if dataset in t52.MNIST_LIKE:
        return MNIST_HYDRA_EPOCHS[stage]
    return HYDRA_EPOCHS[stage] / (2 if dataset == "imagenet100" else 1)


def build(dataset: str, net: str, method: str, smoke: bool = False, attack: str = ""):
    """One method's run; ``attack`` forces 'fast' (ImageNet-100: FGSM + ATTA for every method)."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {list(METHODS)}.")
    how = attack or {"ours_fast": "fast", "trades": "trades", "ours_trades": "trades"}.get(method, "pgd")
    if method in ("at", "at_lbn", "trades"):
        c = t52.base_run(dataset, net, smoke)
        if method == "at_lbn":
            if not c.model.name.startswith(("cifar_resnet", "resnet")):
                raise ValueError(f"at_lbn needs a ResNet (the zoo's last_bn); net {net!r} has none.")
            c.model.kwargs.last_bn = True
        return t52.set_objective(c, how, dataset, smoke)
    if method in ("ours", "ours_fast", "ours_trades", "ours_fixed"):
        return t52.pruned_run(dataset, net, r=0.99, gamma=1.0 if method == "ours_fixed" else 0.1,
                              method=how, smoke=smoke)
    if method == "edgepopup":
        return t52.pruned_run(dataset, net, r=0.99, gamma=1.0, init="skc", lbn=False, method=how,
                              smoke=smoke)
    # HYDRA stages: full-precision weights of a pre-trained dense run, no LBN
    c = t52.base_run(dataset, net, smoke)
    base_kwargs = dict(c.model.kwargs)
    stage = "prune" if method == "hydra_prune" else "finetune"
    kw = dict(keep_rate=0.01, gamma=0.1, last_bn=False, weight_init="pretrained")
    if stage == "prune":
        kw.update(score_init="magnitude", score_scale=1.0)
    else:
        kw.update(score_init="pretrained")
    subnet_model(c, c.model.name, base_kwargs, train="scores" if stage == "prune" else "weights", **kw)
    if not smoke:
        c.train.num_epochs, c.train.num_steps = _hydra_epochs(dataset, stage), -1
    if stage == "finetune":
        c.optimizer.lr = 0.01
    c.schedule = schedule_config("cosine", start_fraction=1.0, final_fraction=0.0)
    return t52.set_objective(c, how, dataset, smoke)


def get_config(arg: str = "cifar10_rn34_ours"):
    dataset, net, rest, opts = t52.parse(arg)
    o, a = t52._opts(opts, "table5_7")
    extra = o - {"smoke"}
    if dataset is None or net is None or (rest and rest not in METHODS) or extra or a is not None:
        raise ValueError(f"table5_7: bad config argument {arg!r}; expected '<dataset>_<net>_<method>"
                         f"[,smoke]' (a run) or '<dataset>_<net>[,smoke]' (the row set) with dataset in "
                         f"{list(t52.DATASETS)}, net in {list(t52.NETS)}, method in {list(METHODS)}.")
    if not rest:
        return row_set(dataset, net, smoke="smoke" in o)
    return build(dataset, net, rest, smoke="smoke" in o)


# ----------------------------------------------------------------------------- the row set
COLUMNS = (("Clean (%)", "summary.json:eval.test.clean_accuracy*100"),
           ("PGD-20 (%)", "summary.json:eval.test.pgd_accuracy*100"),
           ("AA (%)", "eval_aa.json:worst_case_robust_accuracy*100"))
PRUNED = ("hydra_finetune", "ours", "ours_fast", "ours_trades", "ours_fixed", "edgepopup")
CHAIN = {"hydra_prune": ("model.kwargs.weights_from={root}/at/s{seed}",),
         "hydra_finetune": ("model.kwargs.weights_from={root}/at/s{seed}",
                            "model.kwargs.scores_from={root}/hydra_prune/s{seed}")}


def row_methods(dataset: str, net: str):
    out = [m for m in METHODS if m != "at_lbn" or t52.NETS[net][0].startswith("cifar_resnet")]
    return out


def row_set(dataset: str, net: str, smoke: bool = False, table: str = "table5_7", attack: str = "",
            thesis=None, title: str = ""):
    from configs.common import reproduce_config, reproduce_row, reproduce_step
    thesis = thesis if thesis is not None else {"cifar10": THESIS_CIFAR10,
                                                "cifar100": THESIS_CIFAR100}.get(dataset, THESIS_CIFAR10)
    c = reproduce_config(f"{table}_{dataset}_{net}{'_smoke' if smoke else ''}",
                         title or f"Tables 5.7–5.9: {dataset} {net}, binary sub-networks vs baselines",
                         columns=COLUMNS, claims=f"configs.table5_7:claims",
                         notes=("Thesis numbers: CIFAR-10 RN34 (Tables 5.7, 5.9; FP for the dense and "
                                "HYDRA rows, binary for ours). AutoAttack on 200 test images of the "
                                "exported artifact (pruned rows) or of the checkpoint (dense rows)."))
    aa = "configs/eval/autoattack_standard.py" + (":smoke" if smoke else "")
    n = () if smoke else ("num_examples=200",)
    reproduce_step(c, "aa", "evaluate", aa, "eval_aa.json", overrides=("source=export", "output=eval_aa.json") + n)
    reproduce_step(c, "aa_dense", "evaluate", aa, "eval_aa.json", overrides=("output=eval_aa.json",) + n)
    suffix = ",smoke" if smoke else ""
    ref = "configs/table5_10.py" if table == "table5_10" else "configs/table5_7.py"
    for m in row_methods(dataset, net):
        arg = f"{net}_{m}" if table == "table5_10" else f"{dataset}_{net}_{m}"
        th = thesis.get(m)
        reproduce_row(c, m, f"{ref}:{arg}{suffix}", label=LABELS[m],
                      thesis=(th[0], None, th[1]) if th else (), overrides=CHAIN.get(m, ()),
                      steps="none" if m == "hydra_prune" else "aa" if m in PRUNED else "aa_dense")
    return c


def _robust(means, row):
    for col in ("AA (%)", "PGD-20 (%)"):
        v = means.get(row, {}).get(col)
        if v is not None:
            return col, float(v)
    return None, None


def claims(means):
    """§5.1.4's comparison claims on ``{row: {column: mean}}`` (AutoAttack, else PGD-20)."""
    out = []

    def better(claim, a, b, margin=0.0):
        ca, va = _robust(means, a)
        cb, vb = _robust(means, b)
        if va is None or vb is None:
            out.append({"claim": claim, "holds": None, "evidence": f"{a} or {b} missing"})
            return
        out.append({"claim": claim, "holds": bool(va >= vb - margin),
                    "evidence": f"{a} {va:.2f} ({ca}) vs {b} {vb:.2f} ({cb})"})
    better("ours (binary) beats HYDRA's fine-tuned sub-network at 1% of the weights", "ours", "hydra_finetune")
    better("adaptive pruning (γ = 0.1) beats the fixed rate (γ = 1) for our method", "ours", "ours_fixed")
    better("ours beats the original edge-popup (SKC, no LBN, fixed rate)", "ours", "edgepopup")
    better("ours is comparable to dense AT with 100x the parameters (within 2 points)", "ours", "at", 2.0)
    better("the fast variant (FGSM + ATTA) stays within 5 points of ours (PGD)", "ours_fast", "ours", 5.0)
    better("TRADES degrades in the binary case (ours with AT >= ours with TRADES)", "ours", "ours_trades")
    return out
