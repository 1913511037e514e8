"""Thesis Table 3.6 (l_inf, ReLU): the 11 training schemes of §3.3.4 plus SABR and MTL-IBP.

    python -m experiments.train --config=configs/table3_6.py:mnist5k_fc1_iper_at --workdir=W
    python -m experiments.certify --config=configs/certify/table3_6.py --workdir=W

The argument is ``<dataset>_<net>_<method>[,smoke]``: dataset in {mnist5k, fashion_mnist (TFDS),
fashion_mnist_local (the 60k/10k files at hand), mnist, cifar10}, net in {fc1, cnn} (cnn = the Wong &
Kolter / Croce et al. CNN: two convs, two dense layers), method in :data:`METHODS`. ``,smoke`` = 3
steps with tiny attacks (seconds; for tests).

A *row set* argument ``<dataset>_<net>[,smoke]`` (e.g. ``mnist5k_fc1``) returns the whole table block
for ``python -m experiments.reproduce`` (see :func:`row_set`): every method trained, then certified by
``experiments.certify`` (configs/certify/table3_6.py with the overrides of :func:`certify_overrides`),
our numbers beside the thesis's and the thesis's claims checked (:func:`claims`)::

    python -m experiments.reproduce --config=configs/table3_6.py:mnist5k_fc1 --workdir=D

Protocol (§3.3.4): Adam, lr 1e-3 (CNN: 1e-4 for the last 10 epochs), batch 100, 100 epochs. PER α, β
and ε from Table 3.5 (FC1: ε grows from 0.0064 (l_inf) / 0.02 (l_2) x2 every 20 epochs up to the
budget; CNN: constant ε, the regulariser's weight ramped up from 0 over the first 10 epochs, our
stand-in for the thesis's warm-up without it); C = 4; the envelope of 20 (MNIST CNN) / 10 (CIFAR
CNN) subsampled instances per batch (Algorithm 3.6). MMR (Croce et al.'s regulariser; the thesis
downloaded their checkpoints) on 20 / 10 subsampled instances (input Jacobians are costly). IBP and
CROWN-IBP follow Zhang et al. 2020 with the training length aligned to 100 epochs: ε ramped linearly
from 0 over the first 50 epochs, κ 1 -> 0.5 (IBP) / 1 -> 0 (CROWN-IBP), β 1 -> 0 over the ramp. KW
ramps ε from 0.001 over 20 epochs (Wong & Kolter's starting_epsilon). Beyond the thesis: SABR λ = 0.4,
MTL-IBP α = 0.5 with the IBP ε ramp (not tuned for these nets). fashion_mnist/mnist use the MNIST
values, cifar10 FC1 (absent from the thesis) the CIFAR-10 CNN values.
"""
from configs.common import base_config, schedule_config

DATASETS = ("mnist5k", "fashion_mnist", "fashion_mnist_local", "mnist", "cifar10")
NETS = ("fc1", "cnn")
METHODS = ("plain", "at", "kw", "ibp", "crown_ibp", "mmr", "mmr_at", "lper", "lper_at", "iper",
           "iper_at", "sabr", "mtl_ibp")
OPTIONS = ("smoke", "linf", "l2")
# net name -> (model registry name, activation)
MODELS = {"fc1": ("fc1", "relu"), "cnn": ("cnn_small", "relu"),
          "fc1sigmoid": ("fc1", "sigmoid"), "fc1tanh": ("fc1", "tanh")}
EPS = {("mnist", "linf"): 0.1, ("mnist", "l2"): 0.3, ("cifar10", "linf"): 2.0 / 255,
       ("cifar10", "l2"): 0.1}


def table3_5(kind: str, net: str, norm: str):
    """Table 3.5: (α, β_PER, β_PER+at, initial ε or None for a constant ε)."""
    cnn = net == "cnn"
    if kind == "mnist":
        if norm == "linf":
            return (0.15, 0.3, 0.03, None) if cnn else (0.15, 0.1, 0.1, 0.0064)
        return (0.45, 1.0, 1.0, None) if cnn else (0.45, 1.0, 1.0, 0.02)
    if norm == "linf":
        return 0.1, 3e-4, 1e-3, None
    return 0.15, 0.3, 1.0, None


def parse(arg: str, table: str, nets, options=("smoke",), row_set: bool = False):
    """``<dataset>_<net>_<method>[,option...]`` -> (dataset, net, method, options); with ``row_set``
    the method may be absent (``<dataset>_<net>``: a table block, method ""). Options: the given
    names and ``epochs<N>`` (the whole protocol on N epochs instead of 100). Unknown names raise one
    ValueError listing the valid ones."""
    head, *opts = [s.strip() for s in str(arg).split(",")]
    valid = (f"dataset in {list(DATASETS)}, net in {list(nets)}, method in {list(METHODS)}, "
             f"options {[',' + o for o in options] + [',epochs<N>']}")
    bad = [o for o in opts if o not in options and not _epochs_option(o)]
    dataset = next((d for d in sorted(DATASETS, key=len, reverse=True) if head.startswith(d + "_")), None)
    rest = head[len(dataset) + 1:] if dataset else ""
    if row_set and rest in nets:
        net, method = rest, ""
    else:
        net = next((n for n in sorted(nets, key=len, reverse=True) if rest.startswith(n + "_")), None)
        method = rest[len(net) + 1:] if net else ""
    if dataset is None or net is None or (method not in METHODS and not (row_set and method == "")) or bad:
        form = "'<dataset>_<net>_<method>[,option]'" + (" or '<dataset>_<net>[,option]' (a row set)"
                                                        if row_set else "")
        raise ValueError(f"{table}: bad config argument {arg!r}; expected {form} with {valid}.")
    return dataset, net, method, set(opts)


def _epochs_option(o: str):
    """``epochs<N>`` -> N (a positive number), else None."""
    if not o.startswith("epochs"):
        return None
    try:
        n = float(o[len("epochs"):])
    except ValueError:
        return None
    return n if n > 0 else None


def epochs_of(opts, default: float = 100.0) -> float:
    """The training length in epochs named by an ``epochs<N>`` option (default 100, §3.3.4)."""
    found = [_epochs_option(o) for o in opts if _epochs_option(o)]
    return found[-1] if found else default


def build(dataset: str, net: str, method: str, norm: str, smoke: bool = False, epochs: float = 100.0):
    """The config of one table row (see the module docstring for the protocol). ``epochs`` < 100
    scales every epoch count of the protocol (ramps, the x2 growth period, warm-up, lr drop) by
    epochs / 100."""
    kind = "cifar10" if dataset == "cifar10" else "mnist"
    model, activation = MODELS[net]
    base_net = "cnn" if net == "cnn" else "fc1"
    eps = EPS[(kind, norm)]
    epochs = float(epochs)
    f = epochs / 100.0  # the protocol's epoch counts are for 100 epochs
    c = base_config()
    c.data.name = dataset
    c.data.batch_size = 100
    c.data.eval_batch_size = 500
    c.model.name = model
    if activation != "relu":
        c.model.kwargs.activation = activation
    c.threat.norm, c.threat.eps = norm, eps
    c.objective.name = {"plain": "plain", "at": "at"}.get(method, method)
    c.objective.attack.steps = 10
    c.objective.attack.step_size = -1.0  # 2.5 ε / steps
    c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "adam", 1e-3, 0.0
    if base_net == "cnn":  # lr 1e-4 for the last 10 epochs
        c.schedule = schedule_config("multistep", milestones=(0.9 * epochs,), gamma=0.1)
    else:
        c.schedule = schedule_config("constant")
    c.train.num_epochs = epochs
    c.train.log_every = 50
    c.train.eval_every_epochs = 10.0 * f
    c.eval.attack.steps = 20

    alpha, beta_per, beta_per_at, eps0 = table3_5(kind, base_net, norm)
    cert = c.objective.certified
    cert.per_alpha = alpha
    cert.per_beta = beta_per_at if method.endswith("_at") else beta_per
    cert.per_c = 4
    cert.subsample = 0 if base_net == "fc1" else (20 if kind == "mnist" else 10)
    if method.startswith("mmr"):  # its per-example input Jacobians cost ~70 PGD-AT steps per batch
        cert.subsample = 20 if kind == "mnist" else 10
    cert.mmr_gamma_b = cert.mmr_gamma_d = alpha
    ramp = schedule_config("linear", start_fraction=0.0, final_fraction=1.0, ramp_epochs=epochs / 2)
    if method in ("lper", "lper_at", "iper", "iper_at", "mmr", "mmr_at"):
        if eps0 is not None:  # ε x2 every 20 epochs from eps0, capped at the budget
            c.objective.eps_schedule = schedule_config("exponential", start_fraction=eps0 / eps,
                                                       final_fraction=1.0, rate=2.0 ** (1.0 / (20.0 * f)))
        if base_net == "cnn":  # adversarial-training warm-up before the regulariser (§3.3.4)
            name = "mmr_lambda" if method.startswith("mmr") else "per_beta"
            value = cert.mmr_lambda if method.startswith("mmr") else cert.per_beta
            c.objective.schedules[name] = schedule_config("constant", value=value, warmup_epochs=10.0 * f)
    elif method in ("ibp", "crown_ibp", "sabr", "mtl_ibp"):
        c.objective.eps_schedule = ramp
        c.objective.schedules.kappa = schedule_config(
            "linear", value=1.0, start_fraction=1.0, final_fraction=0.5 if method == "ibp" else 0.0,
            ramp_epochs=epochs / 2)
        if method == "crown_ibp":
            c.objective.schedules.crown_beta = schedule_config(
                "linear", value=1.0, start_fraction=1.0, final_fraction=0.0, ramp_epochs=epochs / 2)
    elif method == "kw":  # Wong & Kolter: ε from 0.001 linearly to the budget
        c.objective.eps_schedule = schedule_config("linear", start_fraction=min(1e-3 / eps, 1.0),
                                                   final_fraction=1.0, ramp_epochs=20.0 * f)
    if smoke:
        c.train.num_steps = 3
        c.train.log_every = 1
        c.train.eval_every_epochs = 0.0
        c.train.tensorboard = False
        c.objective.attack.steps = 2
        c.eval.attack.steps = 2
        c.eval.num_examples = 64
    return c


def get_config(arg: str = "mnist5k_fc1_iper_at"):
    dataset, net, method, opts = parse(arg, "table3_6", NETS, row_set=True)
    if not method:
        return row_set("table3_6", dataset, net, "linf", opts)
    return build(dataset, net, method, "linf", smoke="smoke" in opts, epochs=epochs_of(opts))


# ----------------------------------------------------------------------------- row sets (reproduce)
THESIS_METHODS = ("plain", "at", "kw", "ibp", "crown_ibp", "mmr", "mmr_at", "lper", "lper_at", "iper",
                  "iper_at")
LABELS = {"plain": "plain", "at": "AT", "kw": "KW", "ibp": "IBP", "crown_ibp": "CROWN-IBP", "mmr": "MMR",
          "mmr_at": "MMR+at", "lper": "L-PER", "lper_at": "L-PER+at", "iper": "I-PER",
          "iper_at": "I-PER+at", "sabr": "SABR (beyond)", "mtl_ibp": "MTL-IBP (beyond)"}
PER_METHODS = ("lper", "lper_at", "iper", "iper_at")
PROVABLE_BASELINES = ("kw", "ibp", "crown_ibp", "mmr", "mmr_at")
# Methods whose CRE MIP is not computed: PGD already breaks ~all points of plain nets, and the MILPs of
# an adversarially trained FC1 (hundreds of unstable ReLUs per input) time out (thesis: 100% for both).
NO_MIP = ("plain", "at")

# Table 3.6 as printed in the thesis (CTE, PGD, CRE Lin, CRE IBP, CRE MIP, ACB Lin, ACB IBP, ACB PEC);
# keys (kind, net, norm).
THESIS = {
    ("mnist", "fc1", "linf"): """
plain 1.99 98.37 100.00 100.00 100.00 0.0000 0.0000 0.0000
at 1.42 9.00 97.94 100.00 100.00 0.0021 0.0000 0.0099
kw 2.26 8.59 12.91 69.20 10.90 0.0871 0.0308 0.0928
ibp 1.65 9.67 87.27 15.20 12.36 0.0127 0.0848 0.0705
crown_ibp 1.98 9.50 67.39 14.45 11.39 0.0326 0.0855 0.0800
mmr 2.11 17.82 33.75 99.88 24.90 0.0663 0.0001 0.0832
mmr_at 2.04 10.39 17.64 95.09 14.10 0.0824 0.0049 0.0905
lper 1.60 7.45 11.71 92.89 7.69 0.0883 0.0071 0.0935
lper_at 1.81 7.73 12.90 99.90 8.22 0.0871 0.0001 0.0925
iper 1.60 6.28 11.96 93.33 8.10 0.0880 0.0067 0.0934
iper_at 1.54 7.15 13.96 98.55 8.48 0.0868 0.0014 0.0927""",
    ("mnist", "cnn", "linf"): """
plain 1.28 85.75 100.00 100.00 100.00 0.0000 0.0000 0.0000
at 1.02 4.75 91.91 100.00 100.00 0.0081 0.0000 0.0189
kw 1.21 3.03 4.44 100.00 4.40 0.0956 0.0000 0.0971
ibp 1.51 4.43 23.89 8.13 5.23 0.0761 0.0919 0.0872
crown_ibp 1.85 4.28 10.72 6.91 4.83 0.0893 0.0931 0.0928
mmr 1.65 6.07 11.56 100.00 6.10 0.0884 0.0000 0.0928
mmr_at 1.19 3.35 9.49 100.00 3.60 0.0905 0.0000 0.0939
lper 1.44 3.44 5.13 100.00 3.62 0.0949 0.0000 0.0965
lper_at 0.50 2.02 4.85 100.00 2.21 0.0952 0.0000 0.0969
iper 1.03 2.40 4.64 99.55 2.52 0.0954 0.0004 0.0967
iper_at 0.48 1.29 4.61 99.94 1.47 0.0954 0.0001 0.0971""",
    ("cifar10", "cnn", "linf"): """
plain 24.62 86.29 100.00 100.00 100.00 0.0000 0.0000 0.0000
at 27.04 48.53 85.36 100.00 88.50 0.0011 0.0000 0.0015
kw 39.27 46.60 53.81 99.98 48.00 0.0036 0.0000 0.0040
ibp 46.74 56.38 61.81 67.58 58.80 0.0030 0.0025 0.0034
crown_ibp 58.32 63.56 66.28 69.10 65.44 0.0026 0.0024 0.0029
mmr 34.59 57.17 69.28 100.00 61.00 0.0024 0.0000 0.0032
mmr_at 35.36 49.27 59.91 100.00 54.20 0.0031 0.0000 0.0037
lper 39.21 50.98 57.45 99.98 52.70 0.0033 0.0000 0.0038
lper_at 28.87 43.55 56.59 100.00 48.43 0.0034 0.0000 0.0040
iper 29.34 51.54 64.34 99.98 54.87 0.0028 0.0000 0.0036
iper_at 26.66 43.35 57.72 100.00 47.87 0.0033 0.0000 0.0040""",
}
COLUMNS = (("CTE (%)", "certify.json:CTE"), ("PGD (%)", "certify.json:PGD"),
           ("CRE Lin (%)", "certify.json:CRE Lin"), ("CRE IBP (%)", "certify.json:CRE IBP"),
           ("CRE MIP (%)", "certify.json:CRE MIP"), ("100·ACB Lin", "certify.json:ACB Lin*100"),
           ("100·ACB IBP", "certify.json:ACB IBP*100"), ("100·ACB PEC", "certify.json:ACB PEC*100"))
# Table 3.9's search interval [0, ε̄] and the binary search's number of bound computations T_Lin
# (the precision ε_Δ = ε̄ / 2^T_Lin): (kind, norm) -> (ε̄, T_Lin).
SEARCH = {("mnist", "linf"): (0.4, 12), ("mnist", "l2"): (1.2, 14), ("cifar10", "linf"): (0.1, 10),
          ("cifar10", "l2"): (0.4, 12)}


def parse_thesis(text: str, columns: int):
    """The thesis's rows as printed, ``method v1 v2 ...`` per line -> {method: (floats)}."""
    rows = {}
    for line in text.strip().splitlines():
        name, *vals = line.split()
        if len(vals) != columns:
            raise ValueError(f"thesis row {name!r} has {len(vals)} values, expected {columns}.")
        rows[name] = tuple(float(v) for v in vals)
    return rows


def thesis_row(table: str, kind: str, net: str, norm: str, method: str, labels):
    """The thesis's values of one row aligned with ``labels`` (ACB columns x100 like ours), or ()."""
    import importlib
    text = importlib.import_module(f"configs.{table}").THESIS.get((kind, net, norm))
    rows = parse_thesis(text, len(labels)) if text else {}
    if method not in rows:
        return ()
    return tuple(round(v * 100, 6) if lab.startswith("100·") else v for v, lab in zip(rows[method], labels))


def certify_overrides(kind: str, norm: str, *, lin_method: str = "fastlin", mip: bool = False,
                      smoke: bool = False, num_search: int = 1000):
    """experiments.certify overrides of a table block: CRE/ACB "Lin" from ``lin_method`` (Fast-Lin =
    KW on ReLU nets, as the thesis's "CRE Lin"; CROWN for Table 3.8's "CRO"), CROWN also reported,
    Table 3.9's search interval and precision (:data:`SEARCH`), CRE MIP on 200 test points."""
    hi, t_lin = SEARCH[(kind, norm)]
    o = [f"lin_method={lin_method}", "extra_methods=('crown',)" if lin_method != "crown" else "extra_methods=()",
         f"search.eps_high={hi}", f"search.tol={hi / 2 ** t_lin * 1.0001!r}"]
    if not smoke:
        o += ["num_examples=1000", f"search.num_examples={num_search}"]
    if mip:
        o += ["milp.enabled=True"] + ([] if smoke else ["milp.num_examples=200", "milp.time_limit=20.0"])
    return tuple(o)


def row_set(table: str, dataset: str, net: str, norm: str, opts, *, methods=None, columns=COLUMNS,
            lin_method: str = "fastlin", claims_fn: str = ""):
    """The table block ``<dataset>_<net>`` for experiments.reproduce: one row per method (the
    thesis's 11 and the two beyond it), each trained from ``configs/<table>.py:<dataset>_<net>_<method>``
    (+ the options) and certified; CRE MIP (l_inf, ReLU) on 200 test points except :data:`NO_MIP`."""
    from configs.common import reproduce_config, reproduce_row, reproduce_step
    kind = "cifar10" if dataset == "cifar10" else "mnist"
    smoke = "smoke" in opts
    epochs = epochs_of(opts)
    suffix = "".join("," + o for o in sorted(opts))
    if methods is None:
        methods = METHODS if not dataset.startswith("fashion") else (
            "at", "kw", "ibp", "crown_ibp", "lper_at", "iper_at")
    labels = [lab for lab, _ in columns]
    mip = norm == "linf" and any(lab.startswith("CRE MIP") for lab in labels)
    title = {"table3_6": "Table 3.6", "table3_7": "Table 3.7", "table3_8": "Table 3.8"}[table]
    thesis_data = "MNIST" if kind == "mnist" else "CIFAR-10"
    notes = (f"{dataset} {net} {norm} ε = {EPS[(kind, norm)]:.4g}, {epochs:g} epochs"
             + (" (thesis: 100)" if epochs != 100 else "") + f"; thesis numbers: {thesis_data}"
             + (" with 60,000 training images (ours: 4,000)" if dataset == "mnist5k" else "")
             + ". CRE/ACB 'Lin' = " + {"fastlin": "Fast-Lin/KW", "crown": "CROWN"}[lin_method]
             + "; ACB columns x100." + (" CRE MIP on the first 200 test points (HiGHS, 20 s per point; "
                                       "plain/AT not run)." if mip else ""))
    c = reproduce_config(f"{table}_{dataset}_{net}_{norm}{'_smoke' if smoke else ''}",
                         f"{title}: {dataset} {net}, {norm}", columns=columns,
                         claims=claims_fn or f"configs.{table}:claims", notes=notes)
    cert_cfg = "configs/certify/table3_6.py" + (":smoke" if smoke else "")
    num_search = 1000 if net.startswith("fc1") else 200
    reproduce_step(c, "certify", "certify", cert_cfg, "certify.json",
                   overrides=certify_overrides(kind, norm, lin_method=lin_method, mip=mip, smoke=smoke,
                                               num_search=num_search))
    if mip:
        reproduce_step(c, "certify_nomip", "certify", cert_cfg, "certify.json",
                       overrides=certify_overrides(kind, norm, lin_method=lin_method, smoke=smoke,
                                                   num_search=num_search))
    for m in methods:
        reproduce_row(c, m, f"configs/{table}.py:{dataset}_{net}_{m}{suffix}", label=LABELS[m],
                      thesis=thesis_row(table, kind, net, norm, m, labels)
                      if dataset in ("mnist5k", "mnist", "cifar10") else (),
                      steps=("certify_nomip" if mip and m in NO_MIP else "certify") if mip else "")
    return c


# ----------------------------------------------------------------------------- claims
def _min(means, rows, col):
    vals = [(means[r][col], r) for r in rows if r in means and means[r].get(col) is not None]
    return min(vals) if vals else (None, None)


def claim_best(means, col, claim, ours=PER_METHODS, others=PROVABLE_BASELINES):
    """``claim``: the best (lowest) ``col`` among ``ours`` beats every one of ``others``."""
    a, ra = _min(means, ours, col)
    b, rb = _min(means, others, col)
    if a is None or b is None:
        return {"claim": claim, "holds": None, "evidence": f"{col} missing"}
    return {"claim": claim, "holds": bool(a < b),
            "evidence": f"best PER {LABELS[ra]} {a:.2f} vs best other {LABELS[rb]} {b:.2f}"}


def claim_per_at_cleaner_than_kw(means):
    c = "CTE (%)"
    vals = {r: means.get(r, {}).get(c) for r in ("lper_at", "iper_at", "kw")}
    if any(v is None for v in vals.values()):
        return {"claim": "PER+at has a better clean accuracy than KW", "holds": None,
                "evidence": "CTE missing"}
    return {"claim": "PER+at has a better clean accuracy than KW",
            "holds": bool(max(vals["lper_at"], vals["iper_at"]) < vals["kw"]),
            "evidence": f"CTE L-PER+at {vals['lper_at']:.2f}, I-PER+at {vals['iper_at']:.2f}, "
                        f"KW {vals['kw']:.2f}"}


def claim_ibp_only_ibp_trained(means, ibp_trained=("ibp", "crown_ibp"), col="CRE IBP (%)"):
    """IBP certifies IBP-trained models well and every other model much worse."""
    claim = "IBP certifies only IBP-trained models well"
    inside = [means[r][col] for r in ibp_trained if r in means and means[r].get(col) is not None]
    outside = {r: means[r][col] for r in means if r not in ibp_trained and r not in ("plain", "at", "sabr", "mtl_ibp")
               and means[r].get(col) is not None}
    if not inside or not outside:
        return {"claim": claim, "holds": None, "evidence": f"{col} missing"}
    worst_in, best_out = max(inside), min(outside.values())
    r = min(outside, key=outside.get)
    return {"claim": claim, "holds": bool(worst_in < best_out),
            "evidence": f"CRE IBP of IBP/CROWN-IBP <= {worst_in:.2f}; best other {LABELS[r]} {best_out:.2f}"}


def claim_iper_on_par(means, col):
    """I-PER(+at) within max(3 points, 15 % relative) of L-PER(+at) on ``col``."""
    claim = f"I-PER is on par with L-PER ({col})"
    pairs = [("iper", "lper"), ("iper_at", "lper_at")]
    diffs = []
    for i, l in pairs:
        a, b = means.get(i, {}).get(col), means.get(l, {}).get(col)
        if a is None or b is None:
            return {"claim": claim, "holds": None, "evidence": f"{col} missing"}
        diffs.append((a, b, abs(a - b) <= max(3.0, 0.15 * max(a, b))))
    return {"claim": claim, "holds": all(ok for _, _, ok in diffs),
            "evidence": "; ".join(f"{LABELS[i]} {a:.2f} vs {LABELS[l]} {b:.2f}"
                                  for (i, l), (a, b, _) in zip(pairs, diffs)) + " (tolerance max(3, 15%))"}


def claim_pec_at_least_lin(means, lin="100·ACB Lin", pec="100·ACB PEC"):
    claim = "PEC's average certified bound >= the one-shot linear certifier's (§3.3.2)"
    rows = [r for r in means if means[r].get(lin) is not None and means[r].get(pec) is not None]
    if not rows:
        return {"claim": claim, "holds": None, "evidence": "ACB missing"}
    bad = [r for r in rows if means[r][pec] < means[r][lin] - 1e-9]
    gain = max(rows, key=lambda r: means[r][pec] - means[r][lin])
    return {"claim": claim, "holds": not bad,
            "evidence": (f"violated by {[LABELS[r] for r in bad]}" if bad else f"all {len(rows)} rows")
            + f"; largest gain {LABELS[gain]} {means[gain][lin]:.2f} -> {means[gain][pec]:.2f}"}


def claims(means):
    """Table 3.6 (l_inf): the qualitative claims of §3.3.4 checked on ``{row: {column: mean}}``."""
    return [claim_best(means, "CRE MIP (%)", "PER/PER+at have the best CRE MIP (complete verifier)"),
            claim_per_at_cleaner_than_kw(means),
            claim_ibp_only_ibp_trained(means),
            claim_iper_on_par(means, "CRE MIP (%)"),
            claim_pec_at_least_lin(means)]
