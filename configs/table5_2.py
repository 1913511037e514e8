"""Thesis Tables 5.2–5.4 (§5.1.4): robust binary sub-networks found by pruning a random network.

    python -m experiments.train --config=configs/table5_2.py:mnist5k_cnn_r0.99_g0.1 --workdir=W
    python -m experiments.evaluate --config=configs/eval/autoattack_standard.py --workdir=W \
        --config.source=export          # AutoAttack on the exported binary artifact W/export/
    python -m experiments.reproduce --config=configs/table5_2.py:mnist5k_cnn --workdir=D

A single run is ``<dataset>_<net>_r<r>_g<γ>[,option...]``: dataset in :data:`DATASETS`, net in
:data:`NETS`, r the thesis's pruning rate (0.99 keeps 1% of the weights), γ of eq. 5.11 (1 = fixed
pruning rate); options ``skc`` (Signed Kaiming Constant weights and edge-popup's fan-scaled scores,
a = 1, instead of the binary ±1 initialisation with U[-a, a] scores), ``nolbn`` (no last BatchNorm),
``a<value>`` (the score scale a of Table 5.3), ``fast`` (FGSM + ATTA instead of PGD-10),
``trades`` (TRADES, β = 6), ``smoke`` (a few steps of a tiny net; tests). A row set (``<dataset>_<net>``)
is the whole study of Tables 5.2–5.4 for ``experiments.reproduce``: the r × γ grid, binary vs SKC
with and without LBN, the score scale a, and dense adversarial training of the same net.

Protocol. The thesis (CIFAR-10, RN34): SGD momentum 0.9, lr 0.1 cosine, weight decay 5e-4 (on the
scores), 400 epochs, PGD-10 (step 2/255) at ε = 8/255 in training, AutoAttack at the end, the weights
frozen (only the scores and the BatchNorm statistics are learned); the model selected on a 2%
validation split. Here (a shared 2-core CPU, data at hand): ``mnist5k`` and ``fashion_mnist`` with
the small CNN (``cnn``: conv16-conv32-fc100-fc10, 166k prunable weights) at ε = 0.1, batch 100,
5 epochs (mnist5k: 200 steps) / 200 steps (fashion_mnist: 20,000 of its 60,000 images), PGD-5 of
step 2.5ε/5 in training, the same optimizer; the final model (no validation split). CIFAR-10/100, SVHN and
ImageNet-100 configs follow the thesis (ImageNet-100: RN34 with the ImageNet stem, ε = 2/255,
100 epochs, FGSM + ATTA with the cache at 32x32 in bfloat16, Alg. 5.2: ``configs/table5_10.py``).
"""
from __future__ import annotations

import re

from configs.common import base_config, schedule_config, subnet_model

# name -> (data.name, eps, epochs or -steps, batch size, augment)
DATASETS = {
    "cifar10": ("cifar10", 8 / 255, 400.0, 256, "crop_flip"),
    "cifar100": ("cifar100", 4 / 255, 400.0, 256, "crop_flip"),
    "svhn": ("svhn_cropped", 8 / 255, 200.0, 256, "none"),
    "imagenet100": ("imagenet100", 2 / 255, 100.0, 256, "crop_flip"),
    "mnist5k": ("mnist5k", 0.1, 5.0, 100, "none"),
    "fashion_mnist": ("fashion_mnist_local", 0.1, -200, 100, "none"),
}
CPU_ATTACK_STEPS = 5  # mnist5k / fashion_mnist: PGD-5 (step 2.5ε/5) in training, the CPU budget
# name -> (zoo model, kwargs, smoke kwargs)
NETS = {
    "cnn": ("cnn_small", {}, {}),
    "rn18": ("cifar_resnet18", {"w": 16}, {"w": 1}),
    "rn34": ("cifar_resnet34", {"w": 16}, {"w": 1}),
    "rn50": ("cifar_resnet50", {"w": 16}, {"w": 1}),
    "wrn": ("wrn34_10", {}, None),
    "vgg": ("vgg", {"w": 16}, {"w": 1}),
}
SMOKE_NETS = {"wrn": ("wide_resnet", {"depth": 10, "widen": 1})}
OPTIONS = ("smoke", "skc", "nolbn", "fast", "trades")
MNIST_LIKE = ("mnist5k", "fashion_mnist")


def base_run(dataset: str, net: str, smoke: bool = False):
    """The dataset/net/optimizer part shared by every §5.1 run (dense or pruned)."""
    data_name, eps, length, bs, augment = DATASETS[dataset]
    model, kwargs, smoke_kwargs = NETS[net]
    if smoke:
        model, kwargs = SMOKE_NETS.get(net, (model, smoke_kwargs))
    if dataset == "imagenet100" and model.startswith("cifar_resnet"):
        kwargs = dict(kwargs, stem="imagenet")  # 7x7/2 conv + 3x3/2 max-pool at 224x224
    c = base_config()
    c.data.name, c.data.batch_size, c.data.augment = data_name, bs, augment
    c.model.name = model
    for k, v in kwargs.items():
        c.model.kwargs[k] = v
    c.threat.norm, c.threat.eps = "linf", eps
    c.objective.name = "pgd_at"
    steps = CPU_ATTACK_STEPS if dataset in MNIST_LIKE else 10
    c.objective.attack.steps = steps
    c.objective.attack.step_size = 2 / 255 if eps == 8 / 255 else 2.5 * eps / steps
    c.optimizer.name, c.optimizer.lr, c.optimizer.momentum = "sgd", 0.1, 0.9
    c.optimizer.weight_decay = 5e-4
    c.schedule = schedule_config("cosine", start_fraction=1.0, final_fraction=0.0)
    if length > 0:
        c.train.num_epochs = length
    else:
        c.train.num_steps = int(-length)
    c.train.log_every = 50
    c.train.eval_every_epochs = 0.0 if dataset in MNIST_LIKE else 20.0
    c.eval.attack.steps = 20
    c.eval.num_examples = 1000
    if dataset == "imagenet100":
        c.optimizer.weight_decay = 1e-4
    if smoke:
        c.data.batch_size, c.data.eval_batch_size = (32 if dataset in MNIST_LIKE else 8), 16
        if dataset == "fashion_mnist":
            c.data.name = "mnist5k"  # same shapes, bundled
        c.train.num_steps, c.train.log_every, c.train.eval_every_epochs = 3, 1, 0.0
        c.train.tensorboard = False
        c.objective.attack.steps = 2
        c.eval.attack.steps, c.eval.num_examples = 2, 32
    return c


def set_objective(c, method: str, dataset: str, smoke: bool = False):
    """``pgd`` (PGD-10 AT), ``fast`` (FGSM + ATTA, Alg. 5.2: one signed step of ε/2 from each
    example's cached perturbation, as the released scripts' 4/255 at 8/255 and 1/255 at 2/255; 100
    epochs on CIFAR; the ImageNet-100 cache down-sampled to 32x32 in bfloat16) or ``trades`` (β = 6)."""
    if method == "fast":
        c.objective.name = "atta"
        c.objective.fast.atta_step = 0.5
        if dataset in ("cifar10", "cifar100", "svhn") and c.train.num_epochs > 100:
            c.train.num_epochs = 100.0
        if dataset == "imagenet100":
            c.objective.fast.cache_resolution, c.objective.fast.cache_dtype = 32, "bfloat16"
    elif method == "trades":
        c.objective.name, c.objective.beta = "trades", 6.0
    elif method != "pgd":
        raise ValueError(f"unknown training method {method!r}; expected pgd, fast or trades.")
    return c


def pruned_run(dataset: str, net: str, *, r: float, gamma: float, init: str = "binary",
               lbn: bool = True, a=None, method: str = "pgd", smoke: bool = False):
    """One sub-network search (Alg. 5.1): weights frozen at their initialisation, scores trained."""
    c = base_run(dataset, net, smoke)
    base_kwargs = dict(c.model.kwargs)
    if init == "binary":
        kw = dict(weight_init="binary", score_init="uniform", score_scale=0.01 if a is None else a)
    elif init == "skc":  # edge-popup: SKC weights, Kaiming-uniform scores (released: scale 1)
        kw = dict(weight_init="signed_kaiming_constant", score_init="fan_uniform",
                  score_scale=1.0 if a is None else a)
    else:
        raise ValueError(f"unknown init {init!r}; expected binary or skc.")
    subnet_model(c, c.model.name, base_kwargs, keep_rate=round(1.0 - r, 10), gamma=gamma,
                 last_bn=lbn, **kw)
    return set_objective(c, method, dataset, smoke)


def parse(arg: str, table: str = "table5_2"):
    """``<dataset>_<net>_<rest>[,options]`` -> (dataset, net, rest, options)."""
    head, *opts = [s.strip() for s in str(arg).split(",")]
    dataset = next((d for d in sorted(DATASETS, key=len, reverse=True) if head.startswith(d + "_")), None)
    rest = head[len(dataset) + 1:] if dataset else ""
    net = next((n for n in sorted(NETS, key=len, reverse=True) if rest.startswith(n + "_") or rest == n),
               None)
    rest = rest[len(net) + 1:] if net else ""
    return dataset, net, rest, opts


def _opts(opts, table):
    out, a = set(), None
    for o in opts:
        if re.fullmatch(r"a[0-9.e-]+", o):
            a = float(o[1:])
        elif o in OPTIONS:
            out.add(o)
        else:
            raise ValueError(f"{table}: unknown option {o!r}; expected one of {list(OPTIONS)} or a<score "
                             f"scale>, e.g. a0.1.")
    if "fast" in out and "trades" in out:
        raise ValueError(f"{table}: options fast and trades exclude each other.")
    return out, a


def get_config(arg: str = "mnist5k_cnn_r0.99_g0.1"):
    dataset, net, rest, opts = parse(arg)
    valid = (f"'<dataset>_<net>_r<r>_g<gamma>[,option]' (a run) or '<dataset>_<net>' (the row set) with "
             f"dataset in {list(DATASETS)}, net in {list(NETS)}, options {list(OPTIONS)} + a<value>")
    if dataset is None or net is None:
        raise ValueError(f"table5_2: bad config argument {arg!r}; expected {valid}.")
    o, a = _opts(opts, "table5_2")
    if rest == "":
        return row_set(dataset, net, smoke="smoke" in o)
    if rest == "dense":  # adversarial training of the unpruned net (the AT rows of Tables 5.7-5.10)
        c = base_run(dataset, net, "smoke" in o)
        return set_objective(c, "fast" if "fast" in o else "trades" if "trades" in o else "pgd",
                             dataset, "smoke" in o)
    m = re.fullmatch(r"r([0-9.]+)_g([0-9.]+)", rest)
    if not m:
        raise ValueError(f"table5_2: bad config argument {arg!r}; expected {valid}.")
    r, gamma = float(m.group(1)), float(m.group(2))
    if not 0.0 <= r < 1.0:
        raise ValueError(f"table5_2: the pruning rate r must be in [0, 1), got {r} in {arg!r}.")
    return pruned_run(dataset, net, r=r, gamma=gamma, init="skc" if "skc" in o else "binary",
                      lbn="nolbn" not in o, a=a,
                      method="fast" if "fast" in o else "trades" if "trades" in o else "pgd",
                      smoke="smoke" in o)


# ----------------------------------------------------------------------------- the row set
# The study, scaled to the CPU budget: r x γ (Table 5.2: 7 x 7), binary vs SKC with and without LBN
# at r = 0.99, γ = 0.1 (Table 5.4: 7 γ), a in {0.01, 0.1} (Table 5.3: 4 values), dense AT.
RATES = (0.5, 0.9, 0.99)
GAMMAS = (0.1, 1.0)
INIT_GAMMAS = (0.1,)
SCORE_SCALES = (0.1,)  # besides the default 0.01
AA_ROWS = ("r099_g01", "r099_g1", "dense")  # AutoAttack (200 test images) on these rows
SMALL_STUDY = ("r099_g01", "r099_g1", "dense")  # fashion_mnist
# Thesis (CIFAR-10, RN34, AutoAttack %): Table 5.2 [γ][r], Table 5.4 [init, lbn][γ], Table 5.3 [lbn][a]
THESIS_5_2 = {0.0: {0.5: 2.16, 0.8: 6.86, 0.9: 23.01, 0.95: 41.61, 0.99: 44.60},
              0.1: {0.5: 4.35, 0.8: 15.03, 0.9: 28.12, 0.95: 42.65, 0.99: 44.88},
              0.2: {0.5: 8.01, 0.8: 19.21, 0.9: 27.99, 0.95: 43.72, 0.99: 42.92},
              0.5: {0.5: 9.21, 0.8: 32.70, 0.9: 42.84, 0.95: 43.62, 0.99: 42.45},
              0.8: {0.5: 28.90, 0.8: 41.51, 0.9: 43.64, 0.95: 43.88, 0.99: 39.12},
              0.9: {0.5: 39.09, 0.8: 41.71, 0.9: 43.07, 0.95: 42.28, 0.99: 38.68},
              1.0: {0.5: 42.85, 0.8: 43.23, 0.9: 42.13, 0.95: 41.12, 0.99: 34.57}}
THESIS_5_4 = {("skc", False): {0.0: 39.38, 0.1: 39.62, 0.2: 36.66, 0.5: 39.98, 0.8: 37.96, 0.9: 34.75, 1.0: 36.88},
              ("skc", True): {0.0: 42.83, 0.1: 45.01, 0.2: 45.04, 0.5: 42.64, 0.8: 41.71, 0.9: 40.14, 1.0: 39.32},
              ("binary", False): {0.0: 40.94, 0.1: 41.01, 0.2: 37.85, 0.5: 40.61, 0.8: 35.15, 0.9: 35.64, 1.0: 30.02},
              ("binary", True): {0.0: 44.65, 0.1: 45.06, 0.2: 41.58, 0.5: 39.95, 0.8: 38.95, 0.9: 35.81, 1.0: 30.62}}
THESIS_5_3 = {False: {0.001: 33.08, 0.01: 39.96, 0.1: 41.01, 1.0: 31.04},
              True: {0.001: 45.06, 0.01: 44.88, 0.1: 44.63, 1.0: 44.41}}
THESIS_AT_RN34 = 43.26  # Table 5.7: AT of the unpruned RN34 (FP), CIFAR-10
COLUMNS = (("Clean (%)", "summary.json:eval.test.clean_accuracy*100"),
           ("PGD-20 (%)", "summary.json:eval.test.pgd_accuracy*100"),
           ("AA (%)", "eval_aa.json:worst_case_robust_accuracy*100"),
           ("kept weights", "export/manifest.json:kept_weights"))


def row_name(r, gamma, init="binary", lbn=True, a=None):
    """``r099_g01_skc_nolbn_a01`` (row names take no dots: r0.99 -> r099, γ 0.1 -> g01)."""
    return (f"r{r:g}_g{gamma:g}" + ("_skc" if init == "skc" else "") + ("_nolbn" if not lbn else "")
            + (f"_a{a:g}" if a is not None else "")).replace(".", "")


def study_rows(dataset: str, net: str):
    """``[(row name, label, config argument, thesis AA %, steps)]`` of the Tables 5.2–5.4 study."""
    rows = []
    for r in RATES:
        for g in GAMMAS:
            rows.append((row_name(r, g), f"binary+LBN r={r:g} γ={g:g}", f"r{r:g}_g{g:g}",
                         THESIS_5_2[g][r], "aa"))
    for g in INIT_GAMMAS:
        for init, lbn in (("binary", False), ("skc", True), ("skc", False)):
            opts = ("," + init if init == "skc" else "") + ("" if lbn else ",nolbn")
            rows.append((row_name(0.99, g, init, lbn), f"{'SKC' if init == 'skc' else 'binary'}"
                         f"{'+LBN' if lbn else ' no LBN'} r=0.99 γ={g:g}", f"r0.99_g{g:g}{opts}",
                         THESIS_5_4[(init, lbn)][g], "aa"))
    for a in SCORE_SCALES:
        for lbn in (True, False):
            rows.append((row_name(0.99, 0.1, "binary", lbn, a), f"binary{'+LBN' if lbn else ' no LBN'} "
                         f"r=0.99 γ=0.1 a={a:g}", f"r0.99_g0.1,a{a:g}" + ("" if lbn else ",nolbn"),
                         THESIS_5_3[lbn][a], "aa"))
    rows.append(("dense", "dense AT (unpruned, FP)", "dense", THESIS_AT_RN34, "aa"))
    if dataset == "fashion_mnist":
        rows = [row for row in rows if row[0] in SMALL_STUDY]
    return [(n, lab, arg, th, (st if n in AA_ROWS else "none")) for n, lab, arg, th, st in rows]


def row_set(dataset: str, net: str, smoke: bool = False):
    from configs.common import reproduce_config, reproduce_row, reproduce_step
    if dataset not in MNIST_LIKE and not smoke:
        note = "Thesis numbers: CIFAR-10 RN34 (AutoAttack)."
    else:
        note = ("Thesis numbers (last column group): CIFAR-10 RN34, AutoAttack, 400 epochs; ours: "
                f"{dataset} {net} ε = {DATASETS[dataset][1]:g}, " +
                ("5 epochs of 4,000 images" if dataset == "mnist5k" else "200 steps of 100 images")
                + " with PGD-5, PGD-20 on 1,000 test images, AutoAttack (standard) on 200 test images "
                "of the exported binary artifact (pruned rows) or of the dense checkpoint.")
    c = reproduce_config(f"table5_2_{dataset}_{net}{'_smoke' if smoke else ''}",
                         f"Tables 5.2–5.4: {dataset} {net}, pruned random binary networks",
                         columns=COLUMNS, claims="configs.table5_2:claims", row_header="Run", notes=note)
    aa = "configs/eval/autoattack_standard.py" + (":smoke" if smoke else "")
    reproduce_step(c, "aa", "evaluate", aa, "eval_aa.json",
                   overrides=("source=export", "output=eval_aa.json") + (() if smoke else ("num_examples=200",)))
    reproduce_step(c, "aa_dense", "evaluate", aa, "eval_aa.json",
                   overrides=("output=eval_aa.json",) + (() if smoke else ("num_examples=200",)))
    suffix = ",smoke" if smoke else ""
    for name, label, arg, thesis, steps in study_rows(dataset, net):
        if name == "dense":
            steps = "aa_dense"
        head, _, opts = arg.partition(",")
        ref = f"configs/table5_2.py:{dataset}_{net}_{head}" + ("," + opts if opts else "") + suffix
        reproduce_row(c, name, ref, label=label, thesis=(None, None, thesis, None), steps=steps)
    return c


# ----------------------------------------------------------------------------- claims
def _get(means, row, col):
    v = means.get(row, {}).get(col)
    return None if v is None else float(v)


def robust_col(means, rows):
    """AutoAttack where every row in ``rows`` has it, else PGD-20."""
    ok = all(_get(means, r, "AA (%)") is not None for r in rows)
    return "AA (%)" if ok else "PGD-20 (%)"


def _compare(claim, means, a, b, margin=0.0, col=None):
    col = col or robust_col(means, (a, b))
    va, vb = _get(means, a, col), _get(means, b, col)
    if va is None or vb is None:
        return {"claim": claim, "holds": None, "evidence": f"{a} or {b} missing"}
    return {"claim": claim, "holds": bool(va >= vb - margin),
            "evidence": f"{col}: {a} {va:.2f} vs {b} {vb:.2f}" + (f" (margin {margin:g})" if margin else "")}


def claim_best_gamma_decreases(means):
    """Table 5.2: the best γ (by PGD-20, available for every grid row) does not increase with r."""
    col = "PGD-20 (%)"
    best = {}
    for r in RATES:
        vals = [(_get(means, row_name(r, g), col), g) for g in GAMMAS]
        vals = [(v, g) for v, g in vals if v is not None]
        if vals:
            best[r] = max(vals)[1]
    claim = "the best γ decreases as the pruning rate r grows (Table 5.2)"
    if len(best) < 2:
        return {"claim": claim, "holds": None, "evidence": "grid rows missing"}
    seq = [best[r] for r in sorted(best)]
    return {"claim": claim, "holds": bool(all(x >= y for x, y in zip(seq, seq[1:]))),
            "evidence": "best γ per r: " + ", ".join(f"r={r:g}: γ={best[r]:g}" for r in sorted(best))}


def claim_lbn_less_sensitive(means):
    col = robust_col(means, [row_name(0.99, 0.1, "binary", lbn, a) for lbn in (True, False)
                             for a in SCORE_SCALES] + [row_name(0.99, 0.1), row_name(0.99, 0.1, lbn=False)])
    spread = {}
    for lbn in (True, False):
        vals = [_get(means, row_name(0.99, 0.1, "binary", lbn, a), col) for a in SCORE_SCALES] + \
            [_get(means, row_name(0.99, 0.1, "binary", lbn), col)]
        vals = [v for v in vals if v is not None]
        if len(vals) >= 2:
            spread[lbn] = max(vals) - min(vals)
    claim = "LBN makes robust accuracy less sensitive to the score scale a (Table 5.3)"
    if len(spread) < 2:
        return {"claim": claim, "holds": None, "evidence": "rows missing"}
    return {"claim": claim, "holds": bool(spread[True] <= spread[False]),
            "evidence": f"{col} range over a: LBN {spread[True]:.2f}, no LBN {spread[False]:.2f}"}


def claims(means):
    """The claims of §5.1.4 (Tables 5.2–5.4) checked on ``{row: {column: mean}}``."""
    pgd = "PGD-20 (%)"
    return [
        _compare("at r = 0.99 a small γ (0.1) beats the fixed pruning rate (γ = 1) (Table 5.2)",
                 means, row_name(0.99, 0.1), row_name(0.99, 1.0)),
        _compare("at r = 0.5 the fixed pruning rate (γ = 1) is at least as good as γ = 0.1 (Table 5.2)",
                 means, row_name(0.5, 1.0), row_name(0.5, 0.1), col=pgd),
        claim_best_gamma_decreases(means),
        _compare("LBN helps the binary initialisation (r = 0.99, γ = 0.1; Tables 5.3/5.4)", means,
                 row_name(0.99, 0.1), row_name(0.99, 0.1, lbn=False)),
        _compare("LBN helps the Signed Kaiming Constant initialisation (r = 0.99, γ = 0.1; Table 5.4)",
                 means, row_name(0.99, 0.1, "skc"), row_name(0.99, 0.1, "skc", False)),
        _compare("binary initialisation >= SKC, both with LBN (r = 0.99, γ = 0.1; Table 5.4; within 1 point)",
                 means, row_name(0.99, 0.1), row_name(0.99, 0.1, "skc"), margin=1.0),
        claim_lbn_less_sensitive(means),
        _compare("the binary sub-network (1% of the weights, r = 0.99, γ = 0.1) is comparable to dense AT "
                 "(within 2 points; Table 5.7's 'comparable with AT on the unpruned model')", means,
                 row_name(0.99, 0.1), "dense", margin=2.0),
    ]
