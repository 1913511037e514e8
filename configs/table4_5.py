"""Thesis Table 4.5 and Figs. 4.17-4.22 (§4.3.2-4.3.3): adversarial training on the easiest / a random /
the hardest subset of the training set; the robust overfitting gap (best vs last robust test accuracy)
and the Lipschitz upper bound of the trained models.

    python -m experiments.reproduce --config=configs/table4_5.py:fashion_mnist --workdir=runs/overfitting
    python -m experiments.train --config=configs/table4_5.py:fashion_mnist_hard --workdir=runs/hard

A run argument ``<dataset>_<easy|random|hard|reference>[,smoke]`` is the run of configs/subsets.py; the
row-set argument ``<dataset>`` (fashion_mnist, mnist5k, cifar10) trains the reference run (PGD-AT on
the whole set, difficulty tracked), then the three subsets ranked by its difficulty, and analyses
each: ``analysis/overfitting.json`` (best / last PGD accuracy of the periodic test evaluations) and
``analysis/lipschitz.json`` (AutoLip averaged over 20 runs as the thesis, SeqLip over 5 runs of 2
pattern searches per layer pair; the gradient-norm lower estimate); ``analysis/difficulty.json`` on
the reference run and ``analysis/groups.json`` (G0..G9 of the reference's difficulty over the
random-subset run, Fig. 4.21) on ``random``. Use the same --workdir for tables 4.3, 4.5, 4.6 and 4.7: their rows share runs
(``random`` is the PGD-AT baseline of 4.6 and the pre-trained model of 4.7).
"""
from configs import subsets
from configs.common import reproduce_config, reproduce_row, reproduce_step

# Thesis Table 4.5 (CIFAR-10, ResNet-18, x 10^4): l_inf eps = 2/255, 4/255, 8/255; l2 eps = 0.5, 0.75, 1.0
THESIS_LIPSCHITZ = {"easy": (5.91, 6.06, 14.54, 3.34, 3.67, 3.91),
                    "random": (28.98, 79.96, 93.63, 30.01, 31.28, 39.34),
                    "hard": (72.42, 117.60, 567.24, 60.62, 80.06, 77.55)}


def claims(means):
    out = []
    e, r, h = means.get("easy", {}), means.get("random", {}), means.get("hard", {})

    def cmp(col, what):
        a, b = h.get(col), e.get(col)
        ok = None if a is None or b is None else bool(a > b)
        out.append({"claim": f"training on the hard subset gives a larger {what} than on the easy one",
                    "holds": ok, "evidence": f"hard {a} vs easy {b}"})

    cmp("gap (pp)", "best-vs-last robust accuracy gap")
    cmp("SeqLip", "Lipschitz upper bound (SeqLip)")
    cmp("AutoLip", "Lipschitz upper bound (AutoLip)")
    a, b = h.get("last PGD (%)"), e.get("last PGD (%)")
    out.append({"claim": "the model trained on the hard subset is less robust on the test set at the end",
                "holds": None if a is None or b is None else bool(a < b),
                "evidence": f"hard {a} vs easy {b}"})
    ref = means.get("reference", {}).get("loss vs 0-1 corr.")
    out.append({"claim": "loss-based and 0-1-error-based difficulty are strongly correlated (Fig. 4.15: 0.95)",
                "holds": None if ref is None else bool(ref > 0.8), "evidence": f"correlation {ref}"})
    return out


def rowset(ds: str):
    size = subsets.DATASETS[ds][4]
    c = reproduce_config(
        f"table4_5_{ds}", f"Table 4.5 / Figs. 4.17-4.22 on {ds}: easy / random / hard {size} "
        "training instances", columns=(
            ("best PGD (%)", "analysis/overfitting.json:best*100"),
            ("last PGD (%)", "analysis/overfitting.json:last*100"),
            ("gap (pp)", "analysis/overfitting.json:gap*100"),
            ("AutoLip", "analysis/lipschitz.json:autolip.mean"),
            ("SeqLip", "analysis/lipschitz.json:seqlip.mean"),
            ("max grad norm", "analysis/lipschitz.json:gradient_norm.max"),
            ("loss vs 0-1 corr.", "analysis/difficulty.json:loss_vs_01_correlation")),
        row_header="Training set", claims="configs.table4_5:claims",
        notes=("Thesis Table 4.5 (CIFAR-10, ResNet-18, Lipschitz upper bound x 10^4 at l_inf eps = "
               "2/255, 4/255, 8/255 and l2 eps = 0.5, 0.75, 1.0): " + "; ".join(
                   f"{k} {v}" for k, v in THESIS_LIPSCHITZ.items()) +
               ". The thesis gives the robust overfitting of the subsets as curves (Fig. 4.17): no "
               "overfitting on the easy subset, more on the hard one."))
    reproduce_row(c, "reference", f"configs/subsets.py:{ds}_reference", label="reference (all)",
                  steps="difficulty")
    for kind in ("easy", "random", "hard"):
        over = ("data.subset.reference={root}/reference/s{seed}",)
        if kind == "random":
            over += ("train.instance_eval.groups_reference={root}/reference/s{seed}",)
        reproduce_row(c, kind, f"configs/subsets.py:{ds}_{kind}", label=f"{kind.capitalize()}{size}",
                      overrides=over, steps="gap,lip,groups" if kind == "random" else "gap,lip")
    reproduce_step(c, "gap", "analyze", "configs/analyze/overfitting.py", "analysis/overfitting.json",
                   overrides=("overfitting.others=easy={root}/easy/s{seed};random={root}/random/s{seed};"
                              "hard={root}/hard/s{seed}",))
    reproduce_step(c, "lip", "analyze", "configs/analyze/lipschitz.py", "analysis/lipschitz.json",
                   overrides=("lipschitz.runs=20", "lipschitz.seqlip_runs=5", "lipschitz.restarts=2"))
    reproduce_step(c, "difficulty", "analyze", "configs/analyze/difficulty.py",
                   "analysis/difficulty.json")
    reproduce_step(c, "groups", "analyze", "configs/analyze/groups.py", "analysis/groups.json",
                   overrides=("groups.reference={root}/reference/s{seed}",))
    return c


def get_config(arg: str = "fashion_mnist"):
    name = arg.partition(",")[0]
    if name in subsets.DATASETS:
        return rowset(name)
    return subsets.get_config(arg)
