"""Training on the easiest / a random / the hardest instances (thesis §4.3.2, Figs. 4.17-4.20, Table
4.5): ``<dataset>_<easy|random|hard|reference>[_<clean|fgsm|pgd>][,smoke]``.

    python -m experiments.train --config=configs/subsets.py:fashion_mnist_hard --workdir=runs/hard
    python -m experiments.train --config=configs/subsets.py:mnist5k_hard,smoke --workdir=/tmp/w/hard

``<dataset>_reference[_<method>]`` is the reference run: the whole training set, the method's
perturbation (``pgd``: PGD-AT, default; ``fgsm``: FGSM-AT; ``clean``: standard training), instance
difficulty tracked (``RUN/difficulty.npy``, eq. 4.30). The random-subset run also records, at every
periodic evaluation, the per-instance clean and PGD loss of 1000 of its training examples: the
groups G0..G9 over training (Fig. 4.21; ``train.instance_eval.groups_reference`` = the reference run
writes them live to ``groups.jsonl``, the ``groups`` analysis after training). A subset run
trains the same method on ``data.subset.size`` class-balanced examples chosen by that difficulty
(the thesis: 10000 of CIFAR-10's 50000 for 200 epochs, ResNet-18, PGD-10 at 8/255). Its reference is
``data.subset.reference`` (default: the sibling directory ``../<dataset>_reference_<method>`` of the
run's workdir), trained first by the command when its difficulty is missing
(``data.subset.reference_config``).

Scaled protocol on fashion_mnist (60k real images, a shared 2-core CPU): the small CNN of Wong &
Kolter, l_inf ε = 0.1, PGD-3 (step 2.5ε/3) for training, SGD (momentum 0.9, lr 0.05 divided by 10
at 1/2 and 3/4 of training, weight decay 5e-4), batch 128; the reference 2 epochs of the 60k, the
subsets 5,000 examples (500 per class) for 20 epochs (the thesis's long training on a subset, where
robust overfitting shows), test PGD-10 (step ε/4) on 1000 test images every 2 epochs. mnist5k: 1000
of its 4000 training images. cifar10: the thesis's protocol (ResNet-18, PGD-10 step 2/255, 10k
subsets, 200 epochs; tested on mock data only: CIFAR-10 is not prepared on this machine).
``smoke``: seconds, on the bundled mnist5k with a tiny fully connected net.
"""
from configs.common import base_config, schedule_config

# name -> (data.name, ε, model, model kwargs, subset size, reference epochs, subset epochs, batch,
#          lr, weight decay, augment, attack steps, attack step as a fraction of ε (<= 0: 2.5/steps),
#          periodic evaluation every ... epochs)
DATASETS = {
    "mnist5k": ("mnist5k", 0.3, "cnn_small", {}, 1000, 10.0, 60.0, 100, 0.05, 5e-4, "none", 5, -1.0,
                2.0),
    "fashion_mnist": ("fashion_mnist_local", 0.1, "cnn_small", {}, 5000, 2.0, 20.0, 128, 0.05, 5e-4,
                      "none", 3, -1.0, 2.0),
    "cifar10": ("cifar10", 8 / 255, "resnet18", {"w": 16}, 10000, 100.0, 200.0, 128, 0.1, 5e-4,
                "crop_flip", 10, 0.25, 1.0),
}
KINDS = ("easy", "random", "hard", "reference")
METHODS = ("pgd", "fgsm", "clean")
GROUP_SAMPLE = 1000  # training examples of a random-subset run whose clean/PGD loss is recorded


def parse(arg: str):
    """``<dataset>_<kind>[_<method>][,smoke]`` -> (dataset, kind, method, smoke)."""
    name, _, variant = arg.partition(",")
    if variant not in ("", "smoke"):
        raise ValueError(f"Unknown config variant {variant!r}; expected '' or 'smoke'.")
    for ds in sorted(DATASETS, key=len, reverse=True):
        if name.startswith(ds + "_"):
            rest = name[len(ds) + 1:].split("_")
            break
    else:
        raise ValueError(f"subsets: expected <dataset>_<kind>[_<method>][,smoke] with dataset in "
                         f"{sorted(DATASETS)}, got {arg!r}.")
    kind, method = rest[0], (rest[1] if len(rest) > 1 else "pgd")
    if kind not in KINDS or method not in METHODS or len(rest) > 2:
        raise ValueError(f"subsets: kind must be one of {KINDS} and method one of {METHODS}, got "
                         f"{arg!r}.")
    return ds, kind, method, variant == "smoke"


def method_config(c, method: str, eps: float, steps: int, step_fraction: float = -1.0):
    """The training method: PGD-AT (``steps`` steps of ``step_fraction``·ε, <= 0: 2.5ε/steps), FGSM-AT
    (one step of ε from x) or clean."""
    if method == "pgd":
        c.objective.name = "pgd_at"
        c.objective.attack.steps = steps
        c.objective.attack.step_size = step_fraction * eps if step_fraction > 0 else -1.0
    elif method == "fgsm":
        c.objective.name = "pgd_at"  # PGD-1 from x with step ε = FGSM
        c.objective.attack.steps = 1
        c.objective.attack.step_size = eps
        c.objective.attack.random_start = False
    else:
        c.objective.name = "standard"
    return c


def get_config(arg: str = "fashion_mnist_hard"):
    ds, kind, method, smoke = parse(arg)
    (data_name, eps, model, kwargs, size, ref_epochs, sub_epochs, bs, lr, wd, augment,
     steps, step_fraction, eval_every) = DATASETS[ds]
    c = base_config()
    c.data.name, c.data.batch_size, c.data.augment = data_name, bs, augment
    c.data.eval_batch_size = 500
    c.model.name = model
    for k, v in kwargs.items():
        c.model.kwargs[k] = v
    c.threat.norm, c.threat.eps = "linf", eps
    method_config(c, method, eps, steps, step_fraction)
    c.optimizer.name, c.optimizer.lr, c.optimizer.momentum = "sgd", lr, 0.9
    c.optimizer.weight_decay = wd
    c.schedule = schedule_config("multistep", milestones=(0.5, 0.75), gamma=0.1)
    c.train.log_every = 100
    c.train.eval_every_epochs = eval_every
    c.train.keep_checkpoints = 2
    c.eval.attack.steps = 10
    c.eval.attack.step_size = eps / 4
    c.eval.num_examples = 1000
    c.train.difficulty.enabled = True
    suffix = f"_{method}" + ("_smoke" if smoke else "")
    if kind == "reference":
        c.train.num_epochs = ref_epochs
    else:
        c.train.num_epochs = sub_epochs
        c.data.subset.kind = kind
        c.data.subset.size = size
        c.data.subset.reference = f"../{ds}_reference{suffix}"
        c.data.subset.reference_config = f"configs/subsets.py:{ds}_reference_{method}" + \
            (",smoke" if smoke else "")
    if kind == "random":  # the groups G0..G9 over training (Fig. 4.21) in the overfitting regime
        c.train.instance_eval.sources = ("train:clean", "train:pgd")
        c.train.instance_eval.num_examples = GROUP_SAMPLE
        c.train.instance_eval.every_epochs = eval_every
    if smoke:
        if ds != "mnist5k":
            c.data.name = "mnist5k" if ds == "fashion_mnist" else data_name
        c.model.name = "fc"
        c.model.kwargs = type(c.model.kwargs)({"widths": (32,)})
        c.data.batch_size = 200
        c.data.eval_batch_size = 100
        c.objective.attack.steps = min(c.objective.attack.steps, 1)
        c.train.num_epochs = 1.0
        c.train.num_steps = -1
        c.train.log_every = 10
        c.train.eval_every_epochs = 0.0
        c.train.tensorboard = False
        c.eval.attack.steps = 1
        c.eval.num_examples = 100
        c.train.instance_eval.num_examples = 100
        c.train.instance_eval.every_epochs = 0.5
        c.data.subset.size = 200
    return c
