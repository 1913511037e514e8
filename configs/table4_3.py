"""Thesis Table 4.3 (§4.3.1): D-distances (eq. 4.31) between the difficulty functions of runs that
differ in duration, architecture and perturbation type.

    python -m experiments.reproduce --config=configs/table4_3.py:fashion_mnist --workdir=runs/overfitting

Every run trains on the same class-balanced random subset of the training set (configs/subsets.py,
``<dataset>_random``: 5,000 fashion_mnist examples), difficulty tracked: ``cnn6`` (PGD-AT, 6 epochs;
the thesis's RN18-100), ``random`` (PGD-AT, 20 epochs: RN18-200, the run shared with Tables 4.5-4.7),
``fc6`` (a 2x512 fully connected net, PGD-AT 6 epochs: the other architecture, WRN34), ``clean6``
(standard training) and ``fgsm6`` (FGSM-AT). Each row's ``ddistance`` analysis compares its run with
every setting's run of the same seed (training those that are missing); the diagonal is the distance
to a second run of the same setting (seed + 100, ``<row>/s<seed>_twin``), except for the 20-epoch
run. Run argument: ``<dataset>_<cnn6|fc6|clean6|fgsm6>[,smoke]``.
"""
from configs import subsets
from configs.common import reproduce_config, reproduce_row, reproduce_step

SETTINGS = {  # row -> (label, model, model kwargs, method, epochs); 'random' is configs/subsets.py's
    "cnn6": ("CNN-6", None, None, "pgd", 6.0),
    "random": ("CNN-20", None, None, "pgd", None),
    "fc6": ("FC-6", "fc", {"widths": (512, 512)}, "pgd", 6.0),
    "clean6": ("Clean", None, None, "clean", 6.0),
    "fgsm6": ("FGSM", None, None, "fgsm", 6.0),
}
# thesis Table 4.3 (CIFAR-10): RN18-100 ~ CNN-6, RN18-200 ~ CNN-20, WRN34 ~ FC-6; PGD = CNN-6's row
THESIS = {
    "cnn6": (0.0189, 0.0232, 0.0355, 0.1713, 0.1677),
    "random": (0.0232, 0.0159, 0.0299, None, None),
    "fc6": (0.0355, 0.0299, 0.0178, None, None),
    "clean6": (0.1713, None, None, 0.0189, 0.0607),
    "fgsm6": (0.1677, None, None, 0.0607, 0.0843),
}
TWINS = ("CNN-6", "FC-6", "Clean", "FGSM")


def run_config(ds: str, setting: str, smoke: bool = False):
    label, model, kwargs, method, epochs = SETTINGS[setting]
    c = subsets.get_config(f"{ds}_random" + (",smoke" if smoke else ""))
    if setting == "random":
        return c
    step_fraction = subsets.DATASETS[ds][12]
    subsets.method_config(c, method, c.threat.eps, c.objective.attack.steps if method == "pgd" else 1,
                          step_fraction)
    if model is not None and not smoke:
        c.model.name = model
        c.model.kwargs = type(c.model.kwargs)(kwargs)
    if not smoke:
        c.train.num_epochs = epochs
    c.train.eval_every_epochs = 0.0  # only the difficulty matters here
    return c


def claims(means):
    out = []
    same = [means.get(r, {}).get(SETTINGS[r][0]) for r in ("cnn6", "fc6")]
    arch = [means.get("cnn6", {}).get(k) for k in ("CNN-20", "FC-6")]
    pert = [means.get("cnn6", {}).get(k) for k in ("Clean", "FGSM")]
    small = [v for v in same + arch if v is not None]
    big = [v for v in pert if v is not None]
    out.append({"claim": "D-distances across durations / architectures are small (far below 1/3, the "
                         "distance of independent difficulty functions)",
                "holds": None if not small else bool(max(small) < 0.1),
                "evidence": f"max {max(small) if small else None}"})
    out.append({"claim": "the perturbation type changes the difficulty more than architecture or "
                         "duration (PGD vs clean / FGSM above CNN-6 vs CNN-20 / FC-6)",
                "holds": None if not small or not big else bool(min(big) > max(a for a in arch if a is not None)),
                "evidence": f"perturbation {big} vs architecture/duration {arch}"})
    return out


def rowset(ds: str):
    labels = [SETTINGS[r][0] for r in SETTINGS]
    c = reproduce_config(f"table4_3_{ds}", f"Table 4.3 on {ds}: D-distances (eq. 4.31)",
                         columns=tuple((l, f"analysis/ddistance.json:distances.{l}") for l in labels),
                         row_header="d1 \\ d2", decimals=4, claims="configs.table4_3:claims",
                         notes="Thesis (CIFAR-10): RN18-100 ~ CNN-6, RN18-200 ~ CNN-20, WRN34 ~ FC-6; "
                               "its PGD row is CNN-6's. Independent difficulty functions are 1/3 apart "
                               "on average (the thesis says 0.375).")
    entries = []
    for row, (label, *_rest) in SETTINGS.items():
        ref = f"configs/subsets.py:{ds}_random" if row == "random" else f"configs/table4_3.py:{ds}_{row}"
        entries.append(f"{label}={{root}}/{row}/s{{seed}}@{ref}#seed={{seed}}")
        reproduce_row(c, row, ref, label=label, thesis=THESIS[row], steps="ddist")
    reproduce_step(c, "ddist", "analyze", "configs/analyze/ddistance.py", "analysis/ddistance.json",
                   overrides=("ddistance.against=" + ";".join(entries),
                              "ddistance.twins=" + ",".join(TWINS)))
    return c


def get_config(arg: str = "fashion_mnist"):
    name, _, variant = arg.partition(",")
    if name in subsets.DATASETS:
        return rowset(name)
    for ds in sorted(subsets.DATASETS, key=len, reverse=True):
        if name.startswith(ds + "_") and name[len(ds) + 1:] in SETTINGS:
            if variant not in ("", "smoke"):
                raise ValueError(f"Unknown config variant {variant!r}; expected '' or 'smoke'.")
            return run_config(ds, name[len(ds) + 1:], variant == "smoke")
    raise ValueError(f"table4_3: expected <dataset> or <dataset>_<setting>[,smoke] with dataset in "
                     f"{sorted(subsets.DATASETS)} and setting in {sorted(SETTINGS)}, got {arg!r}.")
