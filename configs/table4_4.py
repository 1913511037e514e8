"""Thesis Table 4.4 (§4.3.1): D-distances between the test-set difficulty functions of vanilla / FGSM /
PGD training and the difficulty on CIFAR-10-C's corrupted test sets (TFDS
``cifar10_corrupted/<corruption>_<severity>``), ResNet-18, 100 epochs.

    python -m experiments.reproduce --config=configs/table4_4.py:cifar10 --workdir=runs/table4_4

Rows ``clean`` / ``fgsm`` / ``pgd``: a run trained on the clean CIFAR-10 training set by that method
that records, every epoch, the per-instance loss of the test set under its own perturbation
(``train.instance_eval.sources``: ``test:clean`` / ``test:fgsm`` / ``test:pgd``); the ``clean`` run
also records every corrupted test set (clean evaluation: CIFAR-10-C only has test images, so, as in
the thesis, the corruption difficulty comes from a model trained on clean data and evaluated on the
corrupted test set). Each row's ``ddistance`` compares its test difficulty with the clean run's
difficulty on each corruption (the instances are aligned: CIFAR-10-C's test images are CIFAR-10's in
order). Severity ``SEVERITY`` (the thesis does not say which). Run argument
``cifar10_<clean|fgsm|pgd>[,smoke]``; CIFAR-10(-C) is not prepared on this machine: the configs are
tested on tfds mock data.
"""
from configs import subsets
from configs.common import reproduce_config, reproduce_row, reproduce_step

SEVERITY = 3
CORRUPTIONS = ("brightness", "contrast", "defocus_blur", "elastic", "fog", "gaussian_blur",
               "frosted_glass_blur", "jpeg_compression", "motion_blur", "pixelate", "gaussian_noise",
               "impulse_noise", "saturate", "shot_noise", "snow", "spatter", "zoom_blur",
               "speckle_noise")
LABELS = ("brightness", "contrast", "defocus", "elastic", "fog", "gaussian_blur", "glass_blur", "jpeg",
          "motion_blur", "pixelate", "gaussian_noise", "impulse_noise", "saturate", "shot_noise",
          "snow", "spatter", "zoom_blur", "speckle_noise")
THESIS = {  # Table 4.4, in the order of LABELS
    "clean": (0.1279, 0.3219, 0.2646, 0.2115, 0.2324, 0.3069, 0.2809, 0.1838, 0.2520, 0.2365, 0.2999,
              0.2869, 0.1335, 0.2832, 0.2033, 0.1930, 0.2654, 0.2829),
    "fgsm": (0.1303, 0.3128, 0.2642, 0.2098, 0.2289, 0.3064, 0.2760, 0.1853, 0.2520, 0.2417, 0.2918,
             0.2807, 0.1329, 0.2754, 0.2003, 0.1946, 0.2657, 0.2759),
    "pgd": (0.1873, 0.3082, 0.2616, 0.2319, 0.2414, 0.2959, 0.2825, 0.2026, 0.2605, 0.2551, 0.2980,
            0.2866, 0.1932, 0.2841, 0.2148, 0.2297, 0.2711, 0.2901),
}


def corrupted_source(corruption: str, severity: int = SEVERITY) -> str:
    return f"cifar10_corrupted/{corruption}_{severity}@test:clean"


def run_config(method: str, smoke: bool = False):
    c = subsets.get_config(f"cifar10_reference_{method}" + (",smoke" if smoke else ""))
    c.train.num_epochs = 100.0 if not smoke else c.train.num_epochs
    c.train.difficulty.enabled = True
    kind = method
    sources = [f"test:{kind}"]
    if method == "clean":
        sources += [corrupted_source(k) for k in CORRUPTIONS]
    c.train.instance_eval.sources = tuple(sources)
    c.train.instance_eval.num_examples = -1 if not smoke else 16
    return c


def rowset(_: str = "cifar10"):
    c = reproduce_config("table4_4_cifar10", "Table 4.4: D-distances to CIFAR-10-C difficulty "
                         f"(severity {SEVERITY})",
                         columns=tuple((l, f"analysis/ddistance.json:distances.{l}")
                                       for l in LABELS), decimals=4, row_header="d1 \\ d2")
    against = ";".join(f"{l}={{root}}/clean/s{{seed}}!{corrupted_source(k)}@configs/table4_4.py:"
                       f"cifar10_clean#seed={{seed}}" for l, k in zip(LABELS, CORRUPTIONS))
    for m in ("clean", "fgsm", "pgd"):
        reproduce_row(c, m, f"configs/table4_4.py:cifar10_{m}", label=m.upper() if m != "clean" else "Clean",
                      thesis=THESIS[m], steps=f"ddist_{m}")
        reproduce_step(c, f"ddist_{m}", "analyze", "configs/analyze/ddistance.py",
                       "analysis/ddistance.json",
                       overrides=(f"ddistance.source=test:{m}", f"ddistance.against={against}"))
    return c


def get_config(arg: str = "cifar10"):
    name, _, variant = arg.partition(",")
    if name == "cifar10":
        return rowset()
    if name.startswith("cifar10_") and name[8:] in ("clean", "fgsm", "pgd"):
        if variant not in ("", "smoke"):
            raise ValueError(f"Unknown config variant {variant!r}; expected '' or 'smoke'.")
        return run_config(name[8:], variant == "smoke")
    raise ValueError(f"table4_4: expected 'cifar10' or 'cifar10_<clean|fgsm|pgd>[,smoke]', got {arg!r}.")
