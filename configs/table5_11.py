"""Thesis Table 5.11 (§5.2.4): fast adversarial training methods, ``<dataset>_<net>_<method>[,smoke]``.

    python -m experiments.train --config=configs/table5_11.py:cifar10_rn18_atas --workdir=runs/atas
    python -m experiments.train --config=configs/table5_11.py:mnist5k_cnn_fgsm_rs,smoke --workdir=/tmp/s

dataset ∈ {cifar10, cifar100, imagenet, fashion_mnist, mnist5k}; net ∈ {rn18, wrn28, rn50, cnn};
method ∈ {pgd10, free, yopo, fgsm_rs, fgsm_ga, atta, atas, nfgsm} (objectives of
jaxrobust/train/fast_at.py; ``pgd10`` is the objective ``at`` with PGD-10, step ε/4).

The thesis's settings (§5.2.4): CIFAR-10/100 l_inf ε = 8/255, 30 epochs, ImageNet ε = 2/255, 90 epochs;
SGD momentum 0.9, initial lr 0.1, weight decay 5e-4 (ImageNet 1e-4), crop+flip; the cyclic (one-cycle)
learning rate of the fast-AT papers (the thesis reports the better of cyclic and piece-wise). FGSM-RS
α = 1.25ε; FGSM-GA λ = 0.2 / 0.5 / 0.005 (CIFAR-10 / CIFAR-100 / ImageNet); ATTA-1 α = 4/255 (ε/2);
ATAS: β = 0.5, c = 0.01 (ImageNet 0.1) with the released code's clamped step rule
(CIFAR/ImageNet: 5 warm-up epochs of a constant step ε, the cache re-drawn every 10th epoch but
the last;
``objective.fast.atas_rule='released'``: α_i = clip(2ε·c/(c + √v_i), ε/2, 1.75ε), at ImageNet's
ε = 2/255 the released script's clip(16/255·c/(c + √v_i), 4/255, 8/255); switch to eq. 5.16 with
``--config.objective.fast.atas_rule=thesis``); FreeAT m = 8 (ImageNet 4) for 10 (45) epochs;
YOPO-5-3 for 12 (36) epochs. ImageNet caches (ATTA/ATAS/Free) are stored at 32x32 in bfloat16.
fashion_mnist (ε = 0.1) and mnist5k (ε = 0.3: where single-step methods overfit catastrophically)
use Adam 1e-3 (cyclic), no augmentation, 20 epochs. The catastrophic-overfitting monitor
(``train.monitor``) is on. Evaluation (PGD-10, PGD-50, AutoAttack): ``experiments.evaluate`` with
configs/eval/ (``pgd20.py --config.pgd_steps=10 / 50``, ``autoattack_standard.py``).

``rn18`` is PreActResNet-18 on CIFAR (as the released fast-AT codes) and the 3x3-stem ResNet-18
(w = 16: 64-512 channels) elsewhere. ``rn50`` is the library's CIFAR-stem ResNet-50 (``cifar_resnet50``: 3x3 stem, non-affine BN); the
thesis's ImageNet ResNet-50 has the 7x7/stride-2 stem, which the model zoo does not provide yet.
Options (comma-separated after the name): ``smoke`` = a few steps of a tiny net on tfds mock data
(CIFAR/ImageNet) or the bundled mnist5k; ``epochs=E`` = the single-step methods' epochs set to E and
Free's/YOPO's scaled by the same factor (the CPU reproductions on Fashion-MNIST); ``eps=ε`` = another
budget (every step size follows ε).

Row sets for ``python -m experiments.reproduce --config=configs/table5_11.py:<set> --workdir=D``
(:data:`ROW_SETS`): ``mnist5k_cnn`` (all methods, ε = 0.3, 20 epochs), ``fashion_mnist_cnn`` (all
methods, ε = 0.1, 1 epoch), and the ε sweeps ``mnist5k_cnn_co`` / ``fashion_mnist_cnn_co`` (FGSM-RS
and ATAS) that show where single-step training overfits catastrophically; ``,smoke`` for tests.
Claims checked on our numbers: :func:`claims`, :func:`claims_co`.
"""
from configs.common import base_config, schedule_config

DATASETS = {  # name -> (data.name, eps, epochs, weight decay, augment, batch size)
    "cifar10": ("cifar10", 8 / 255, 30.0, 5e-4, "crop_flip", 128),
    "cifar100": ("cifar100", 8 / 255, 30.0, 5e-4, "crop_flip", 128),
    "imagenet": ("imagenet2012", 2 / 255, 90.0, 1e-4, "crop_flip", 128),
    "fashion_mnist": ("fashion_mnist_local", 0.1, 20.0, 0.0, "none", 100),
    "mnist5k": ("mnist5k", 0.3, 20.0, 0.0, "none", 100),
}
NETS = {  # name -> (model.name, kwargs, smoke kwargs)
    "rn18": ("resnet18", {"w": 16}, {"w": 1}),  # CIFAR: preact_resnet18 (see below)
    "wrn28": ("wrn28_10", {}, None),
    "rn50": ("cifar_resnet50", {"w": 16}, {"w": 1}),
    "cnn": ("cnn_small", {}, {}),
}
METHODS = {"pgd10": "at", "free": "free", "yopo": "yopo", "fgsm_rs": "fgsm_rs", "fgsm_ga": "fgsm_ga",
           "atta": "atta", "atas": "atas", "nfgsm": "nfgsm"}
FREE_REPLAYS = {"cifar10": 8, "cifar100": 8, "imagenet": 4, "fashion_mnist": 8, "mnist5k": 8}
FREE_PASSES = {"cifar10": 80, "cifar100": 80, "imagenet": 180, "fashion_mnist": 40, "mnist5k": 40}
YOPO_EPOCHS = {"cifar10": 12, "cifar100": 12, "imagenet": 36, "fashion_mnist": 8, "mnist5k": 8}
GA_LAMBDA = {"cifar10": 0.2, "cifar100": 0.5, "imagenet": 0.005, "fashion_mnist": 0.2, "mnist5k": 0.2}


OPTIONS = ("smoke", "epochs=<E>", "eps=<ε>")


def _parse(arg: str):
    """``<dataset>_<net>_<method>[,smoke][,epochs=E][,eps=ε]`` -> (dataset, net, method, options)."""
    name, *opts = [o.strip() for o in str(arg).split(",")]
    options = {"smoke": False, "epochs": None, "eps": None}
    for o in opts:
        key, sep, val = o.partition("=")
        if o == "smoke":
            options["smoke"] = True
        elif sep and key in ("epochs", "eps"):
            try:
                options[key] = float(val)
            except ValueError:
                raise ValueError(f"table5_11: option {o!r} needs a number.") from None
            if not options[key] > 0:
                raise ValueError(f"table5_11: option {o!r} must be > 0.")
        else:
            raise ValueError(f"Unknown config variant {o!r}; expected one of {OPTIONS}.")
    parts = name.split("_")
    if len(parts) < 3:
        raise ValueError(f"table5_11: expected <dataset>_<net>_<method>[,smoke], got {arg!r}.")
    # datasets and methods may contain '_' (fashion_mnist, fgsm_rs): match the net in the middle
    for i in range(1, len(parts) - 1):
        if parts[i] in NETS and "_".join(parts[:i]) in DATASETS:
            ds, net, method = "_".join(parts[:i]), parts[i], "_".join(parts[i + 1:])
            break
    else:
        raise ValueError(f"table5_11: expected <dataset>_<net>_<method>[,smoke] with dataset in "
                         f"{sorted(DATASETS)} and net in {sorted(NETS)}, got {arg!r}.")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {sorted(METHODS)}.")
    return ds, net, method, options


def get_config(arg: str = "cifar10_rn18_atas"):
    """A run's config (``<dataset>_<net>_<method>[,options]``) or a row set of
    :data:`ROW_SETS` for ``python -m experiments.reproduce``."""
    if str(arg).split(",")[0] in ROW_SETS:
        return row_set(arg)
    ds, net, method, opts = _parse(arg)
    smoke = opts["smoke"]
    data_name, eps, epochs, wd, augment, bs = DATASETS[ds]
    # ``epochs=E``: the protocol shortened (or lengthened) to E epochs for the single-step methods,
    # Free's and YOPO's epochs scaled by the same factor (same ratio of passes as the thesis)
    scale = 1.0 if opts["epochs"] is None else opts["epochs"] / epochs
    epochs = epochs * scale
    eps = eps if opts["eps"] is None else opts["eps"]
    model_name, kwargs, smoke_kwargs = NETS[net]
    if net == "rn18" and ds in ("cifar10", "cifar100") and not smoke:
        model_name, kwargs = "preact_resnet18", {}  # the fast-AT codes' CIFAR ResNet-18
    mnist_like = ds in ("fashion_mnist", "mnist5k")
    c = base_config()
    c.data.name, c.data.batch_size, c.data.augment = data_name, bs, augment
    c.model.name = model_name
    for k, v in kwargs.items():
        c.model.kwargs[k] = v
    c.threat.norm, c.threat.eps = "linf", eps
    if mnist_like:
        c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "adam", 1e-3, 0.0
    else:
        c.optimizer.name, c.optimizer.lr = "sgd", 0.1
        c.optimizer.momentum, c.optimizer.weight_decay = 0.9, wd
    c.schedule = schedule_config("cyclic", peak_fraction=0.4)
    c.train.num_epochs = epochs
    c.train.log_every = 100
    c.train.eval_every_epochs = 5.0 if not mnist_like else 2.0
    c.eval.attack.steps = 10
    c.eval.num_examples = 1000
    c.train.monitor.enabled = True
    c.train.monitor.num_examples = 512
    if ds == "imagenet":  # ImageNet's held-out split is 'validation'
        c.eval.splits, c.train.monitor.split = ("validation",), "validation"

    obj = METHODS[method]
    c.objective.name = obj
    f = c.objective.fast
    if method == "pgd10":
        c.objective.attack.steps = 10
        c.objective.attack.step_size = eps / 4
    elif method == "fgsm_ga":
        f.ga_lambda = GA_LAMBDA[ds]
    elif method in ("atta", "atas", "free") and ds == "imagenet":
        f.cache_resolution, f.cache_dtype = 32, "bfloat16"
    if method == "atas":
        f.atas_rule, f.atas_beta = "released", 0.5
        f.atas_c = 0.1 if ds == "imagenet" else 0.01
        if ds == "imagenet":  # the released ImageNet script: 16/255 numerator, steps in [4, 8]/255
            f.atas_alpha, f.atas_min_step, f.atas_max_step = 8.0, 2.0, 4.0
        if not mnist_like:  # the released CIFAR/ImageNet scripts: 5 warm-up epochs of a constant
            # step ε, the cache re-drawn every 10th epoch but the last
            f.atas_warmup_epochs, f.atas_warmup_step = 5, 1.0
            f.cache_reset_at = tuple(range(10, int(round(epochs)), 10))
    if method == "free":
        f.free_replays = FREE_REPLAYS[ds]
        # m optimizer updates per batch (the loop's replays): the same number of passes
        c.train.num_epochs = FREE_PASSES[ds] * scale / f.free_replays
    if method == "yopo":
        f.yopo_m, f.yopo_n = 5, 3
        c.train.num_epochs = float(YOPO_EPOCHS[ds]) * scale

    if smoke:
        if smoke_kwargs is None:
            raise ValueError(f"no smoke variant for net {net!r} (use rn18 or cnn).")
        c.model.kwargs = type(c.model.kwargs)(smoke_kwargs)
        c.data.batch_size = 8 if not mnist_like else 32
        c.data.eval_batch_size = 16
        if ds == "fashion_mnist":
            c.data.name = "mnist5k"  # same shapes, bundled
        c.train.num_steps = 4
        c.train.log_every = 2
        c.train.eval_every_epochs = 0.0
        c.train.tensorboard = False
        c.train.monitor.enabled = False
        c.objective.attack.steps = min(c.objective.attack.steps, 2)
        f.free_replays = min(f.free_replays, 2)
        f.yopo_m, f.yopo_n = 2, 2
        c.eval.attack.steps = 2
        c.eval.num_examples = 16
    return c


# ----------------------------------------------------------------------------- reproduction row sets
# The thesis's Table 5.11 (a), CIFAR-10 ResNet-18 at ε = 8/255 (Clean, PGD10, PGD50, AA in %, time
# in hours on one GPU, shown here in minutes): a reference only, the data and nets here differ.
THESIS_CIFAR10_RN18 = {
    "pgd10": (80.13, 50.59, 48.94, 45.97, 1.23 * 60), "free": (78.37, 40.90, 39.02, 36.00, 0.33 * 60),
    "yopo": (74.72, 37.51, 35.79, 33.21, 0.28 * 60), "fgsm_rs": (83.99, 48.99, 46.36, 42.95, 0.22 * 60),
    "fgsm_ga": (80.10, 49.14, 47.21, 43.44, 0.57 * 60), "atta": (82.16, 47.47, 45.32, 42.51, 0.30 * 60),
    "atas": (81.22, 50.03, 48.18, 45.38, 0.30 * 60), "nfgsm": (None,) * 5}
LABELS = {"pgd10": "PGD10 (reference)", "free": "FreeAT", "yopo": "YOPO-5-3", "fgsm_rs": "FGSM-RS",
          "fgsm_ga": "FGSM-GA", "atta": "ATTA-1", "atas": "ATAS", "nfgsm": "N-FGSM (beyond the thesis)"}
# row set -> (dataset, net, epochs option or None = the protocol's, eps values, methods,
#            (PGD-50 examples, AutoAttack examples), monitor (every_epochs, num_examples))
# Sized for the shared 2-core machine: AutoAttack on robust CNNs costs ~3 s per example there.
ROW_SETS = {
    "mnist5k_cnn": ("mnist5k", "cnn", None, (None,), tuple(METHODS), (1000, 500), (1.0, 512)),
    "fashion_mnist_cnn": ("fashion_mnist", "cnn", 1.0, (None,), tuple(METHODS), (500, 200),
                          (0.25, 256)),
    "mnist5k_cnn_co": ("mnist5k", "cnn", None, (0.1, 0.2, 0.3, 0.4), ("fgsm_rs", "atas"), (0, 0),
                       (2.0, 256)),
    "fashion_mnist_cnn_co": ("fashion_mnist", "cnn", 1.0, (0.1, 0.2, 0.3), ("fgsm_rs", "atas"),
                             (0, 0), (0.25, 256)),
}
EVAL = "configs/eval/pgd20.py"
AA = "configs/eval/autoattack_standard.py"


def row_set(arg: str):
    """The row sets of :data:`ROW_SETS` (``python -m experiments.reproduce
    --config=configs/table5_11.py:mnist5k_cnn --workdir=D``): every method trained by its Table 5.11
    config (the catastrophic-overfitting monitor on: one held-out check per epoch), evaluated by
    PGD-10 on 1,000 test images, PGD-50 (step ε/4) and AutoAttack (standard) on the first 1,000 /
    500 (mnist5k) or 500 / 200 (Fashion-MNIST; the held-out splits are in a seeded random order: a
    sample of every class); the ``_co``
    sets sweep ε for FGSM-RS and ATAS (PGD-10 only) to find where single-step training collapses."""
    from configs.common import reproduce_config, reproduce_row, reproduce_step
    name, _, variant = str(arg).partition(",")
    if variant not in ("", "smoke"):
        raise ValueError(f"Unknown row-set variant {variant!r}; expected '' or 'smoke'.")
    smoke = variant == "smoke"
    ds, net, epochs, eps_values, methods, (pgd50_examples, aa_examples), monitor = ROW_SETS[name]
    sweep = name.endswith("_co")
    cols = [("Clean", "eval_pgd10.json:clean_accuracy*100"),
            ("PGD10", "eval_pgd10.json:robust_accuracy.pgd*100")]
    if not sweep:
        cols += [("PGD50", "eval_pgd50.json:robust_accuracy.pgd*100"),
                 ("AA", "eval_aa.json:worst_case_robust_accuracy*100")]
    cols += [("Time (min)", f"summary.json:train_seconds*{1 / 60!r}"),
             ("monitor (min)", f"co_monitor.json:seconds*{1 / 60!r}"),
             ("held-out FGSM", "co_monitor.json:history.-1.fgsm_accuracy*100"),
             ("held-out PGD", "co_monitor.json:history.-1.pgd_accuracy*100"),
             ("CO checks", "co_monitor.json:num_collapses")]
    data_eps = DATASETS[ds][1]
    desc = (f"{ds} ({'4,000' if ds == 'mnist5k' else '60,000'} training images), {NETS[net][0]}, l_inf "
            + (f"ε ∈ {[e for e in eps_values]}" if sweep else f"ε = {data_eps}")
            + f", {epochs or DATASETS[ds][2]:g} epochs for the single-step methods")
    c = reproduce_config(
        f"table5_11_{name}", f"Table 5.11 on {desc}", columns=cols,
        claims="configs.table5_11:claims_co" if sweep else "configs.table5_11:claims",
        notes=("Thesis values (after '/') are CIFAR-10 ResNet-18 at ε = 8/255 on a GPU (Table 5.11a, "
               "time converted to minutes): a reference for the ordering only, not comparable numbers. "
               "'held-out FGSM/PGD' = the catastrophic-overfitting monitor's last check (512 test "
               "images, PGD-10); 'CO checks' = the number of its epoch checks flagged as a collapse. "
               "'Time' is the run's wall time on the shared 2-core machine (load varied), including "
               "'monitor' (the checks' own time); the claims use Time - monitor; "
               "bench/results/fast_at.json has the per-step ratios measured in one process."
               if not sweep else
               "'CO checks' = epoch checks flagged by the catastrophic-overfitting monitor (PGD accuracy "
               "collapsed while FGSM accuracy rose, or FGSM exceeds PGD accuracy by > 50 points)."
               " Time includes the monitor's checks (monitor column)."))
    opts = ([f"epochs={epochs:g}"] if epochs else []) + (["smoke"] if smoke else [])
    for method in methods:
        for e in eps_values:
            o = ",".join(opts + ([f"eps={e:g}"] if e is not None else []))
            row = method if e is None else f"{method}_eps{_eps_tag(e)}"
            label = LABELS[method] + ("" if e is None else f", ε = {e:g}")
            thesis = () if sweep else tuple(THESIS_CIFAR10_RN18[method]) + (None,) * 4
            # the loop's own end-of-run evaluation is counted in train_seconds: kept small (the
            # evaluate steps below are the table's numbers)
            over = ["train.eval_every_epochs=0.0", "train.tensorboard=False", "eval.num_examples=100",
                    f"train.monitor.every_epochs={monitor[0]!r}", f"train.monitor.num_examples={monitor[1]}"]
            if smoke:
                over += ["train.monitor.enabled=True", "train.monitor.every_epochs=0.02",
                         "train.monitor.num_examples=32", "train.monitor.pgd_steps=2"]
            reproduce_row(c, row, f"configs/table5_11.py:{ds}_{net}_{method}" + (f",{o}" if o else ""),
                          label=label, thesis=thesis, overrides=over)
    pgd = lambda k, n: ("output=eval_pgd%d.json" % k, f"pgd_steps={k}",  # noqa: E731
                        f"num_examples={64 if smoke else n}")
    reproduce_step(c, "pgd10", "evaluate", EVAL + (":smoke" if smoke else ""), "eval_pgd10.json",
                   overrides=pgd(10, 1000))
    if not sweep:  # PGD-50 with step ε/4 as PGD-10 (the default 2.5ε/50 would be a weaker attack)
        reproduce_step(c, "pgd50", "evaluate", EVAL + (":smoke" if smoke else ""), "eval_pgd50.json",
                       overrides=pgd(50 if not smoke else 5, pgd50_examples) +
                       (f"pgd_step_size={data_eps / 4!r}",))
        reproduce_step(c, "aa", "evaluate", AA + (":smoke" if smoke else ""), "eval_aa.json",
                       overrides=("output=eval_aa.json", f"num_examples={32 if smoke else aa_examples}"))
    return c


def _eps_tag(e: float) -> str:
    """0.1 -> '0p1' (row names cannot hold dots)."""
    return f"{e:g}".replace(".", "p")


def _get(means, row, col):
    v = means.get(row, {}).get(col)
    return None if v is None else float(v)


def claims(means):
    """The thesis's claims of §5.2.4 checked on our numbers (``{row: {column: mean}}``)."""
    out = []
    g = lambda r, k: _get(means, r, k)  # noqa: E731
    robust = "AA" if g("atas", "AA") is not None else "PGD50"
    a, f, t = g("atas", robust), g("fgsm_rs", robust), g("atta", robust)
    if None not in (a, f, t):
        out.append({"claim": f"ATAS has the best {robust} accuracy among FGSM-RS, ATTA and ATAS",
                    "holds": a >= max(f, t), "evidence": f"ATAS {a:.1f} vs FGSM-RS {f:.1f}, ATTA {t:.1f}"})
    def train_time(r):  # the run's wall time without the monitor's checks
        t, mon = g(r, "Time (min)"), g(r, "monitor (min)")
        return None if t is None else t - (mon or 0.0)

    ta, tf = train_time("atas"), train_time("fgsm_rs")
    if None not in (ta, tf):
        out.append({"claim": "ATAS costs about as much as FGSM-RS (training time <= 1.3x)",
                    "holds": ta <= 1.3 * tf, "evidence": f"{ta:.1f} vs {tf:.1f} min ({ta / tf:.2f}x; "
                                                         f"bench/results/fast_at.json has per-step ratios)"})
    cf, ca = g("fgsm_rs", "CO checks"), g("atas", "CO checks")
    if None not in (cf, ca):
        out.append({"claim": "ATAS avoids catastrophic overfitting where FGSM-RS collapses",
                    "holds": (ca == 0) if cf > 0 else None,
                    "evidence": f"collapsed checks: FGSM-RS {cf:g}, ATAS {ca:g}" +
                                ("" if cf > 0 else " (FGSM-RS did not collapse here: not tested)")})
    fr, yo = g("free", robust), g("yopo", robust)
    if None not in (a, fr, yo):
        out.append({"claim": f"FreeAT and YOPO are less robust than ATAS ({robust})",
                    "holds": a > max(fr, yo), "evidence": f"ATAS {a:.1f}, FreeAT {fr:.1f}, YOPO {yo:.1f}"})
    tg = train_time("fgsm_ga")
    if None not in (tg, tf):
        out.append({"claim": "FGSM-GA's regulariser costs about 2x FGSM-RS's training time",
                    "holds": tg >= 1.5 * tf, "evidence": f"{tg:.1f} vs {tf:.1f} min ({tg / tf:.2f}x)"})
    p, tp = g("pgd10", robust), train_time("pgd10")
    if None not in (a, p, ta, tp):
        out.append({"claim": "ATAS is close to PGD-10 AT (within 3 points) at a fraction of its time",
                    "holds": a >= p - 3 and ta <= 0.5 * tp,
                    "evidence": f"{robust} {a:.1f} vs {p:.1f}; time {ta:.1f} vs {tp:.1f} min"})
    return out


def claims_co(means):
    """ε sweep: at which ε FGSM-RS overfits catastrophically and whether ATAS does there."""
    eps = sorted({float(r.rsplit("_eps", 1)[1].replace("p", ".")) for r in means if "_eps" in r})
    co = lambda m, e: _get(means, f"{m}_eps{_eps_tag(e)}", "CO checks")  # noqa: E731
    pgd = lambda m, e: _get(means, f"{m}_eps{_eps_tag(e)}", "PGD10")  # noqa: E731
    rs = [e for e in eps if (co("fgsm_rs", e) or 0) > 0]
    both = [e for e in rs if (co("atas", e) or 0) > 0]
    ev = "; ".join(f"ε={e:g}: FGSM-RS PGD10 {pgd('fgsm_rs', e) or float('nan'):.1f} "
                   f"(CO {co('fgsm_rs', e) or 0:g}), ATAS {pgd('atas', e) or float('nan'):.1f} "
                   f"(CO {co('atas', e) or 0:g})" for e in eps)
    return [{"claim": "FGSM-RS overfits catastrophically at some ε of the sweep", "holds": bool(rs),
             "evidence": ev},
            {"claim": "ATAS does not overfit catastrophically where FGSM-RS does",
             "holds": (not both) if rs else None, "evidence": f"FGSM-RS collapsed at ε {rs}, ATAS at {both}"},
            {"claim": "ATAS's PGD-10 accuracy >= FGSM-RS's at every ε of the sweep",
             "holds": all((pgd("atas", e) or 0) >= (pgd("fgsm_rs", e) or 0) for e in eps), "evidence": ev}]
