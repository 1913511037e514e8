"""Thesis Table 4.2's evaluation (§4.2.4): the PGD of training, PGD-100, APGD100-CE, APGD100-DLR and
Square-5K, each attack run alone on the clean-correct test points (``mode='individual'``).

    python -m experiments.evaluate --config=configs/table4_2_eval.py:mnist_apgd_square --workdir=RUN
    python -m experiments.evaluate --config=configs/table4_2_eval.py:cifar10_pgd --workdir=RUN \
        --config.weights=pas_ensemble     # a PAS run: its ensemble of period-end models

The argument is ``<task>_<part>[,smoke]``: task in :data:`TASKS` (``mnist`` for MNIST/mnist5k
LeNet, ``cifar10`` for VGG/ResNet18), part in :data:`PARTS`:

- ``pgd``: the PGD of training, written to ``eval_pgd.json`` (MNIST 50 steps, CIFAR-10 10 steps);
- ``pgd100``: PGD with 100 steps (``eval_pgd100.json``);
- ``apgd_square``: APGD100-CE, APGD100-DLR and Square with 5,000 queries (``eval_aa.json``),
  AutoAttack's hyper-parameters as the thesis (Croce & Hein 2020).

Every part reports the clean accuracy too. PGD uses the thesis code's fixed steps (0.01 on MNIST;
ε/4 = 2/255 for PGD-10 and 1/255 for PGD-100 on CIFAR-10) from a random start. 1,000 test examples
(the thesis: the whole test set).
``,smoke`` shrinks every budget (tests). Shares ``configs/eval/common.py``'s schema with
``configs/eval/table4_2.py`` (the four attacks in one file).
"""
from configs.eval.common import apply_variant, base_eval_config

TASKS = ("mnist", "cifar10")
PARTS = ("pgd", "pgd100", "apgd_square")
TRAINING_PGD_STEPS = {"mnist": 50, "cifar10": 10}  # ε/0.01 + 10 at ε = 0.4; PGD-10
# PGD step sizes of the thesis's code (its README's attack settings): MNIST 0.01; CIFAR-10 ε/4 = 2/255
# for PGD-10 and 1/255 for PGD-100
PGD_STEP_SIZE = {("mnist", "pgd"): 0.01, ("mnist", "pgd100"): 0.01, ("cifar10", "pgd"): 2 / 255,
                 ("cifar10", "pgd100"): 1 / 255}
OUTPUTS = {"pgd": "eval_pgd.json", "pgd100": "eval_pgd100.json", "apgd_square": "eval_aa.json"}


def parse(arg: str):
    head, *opts = [s.strip() for s in str(arg).split(",")]
    task = next((t for t in TASKS if head.startswith(t + "_")), None)
    part = head[len(task) + 1:] if task else ""
    if task is None or part not in PARTS or any(o != "smoke" for o in opts):
        raise ValueError(f"table4_2_eval: bad config argument {arg!r}; expected '<task>_<part>[,smoke]' "
                         f"with task in {list(TASKS)} and part in {list(PARTS)}.")
    return task, part, "smoke" in opts


def get_config(arg: str = "mnist_apgd_square"):
    task, part, smoke = parse(arg)
    c = base_eval_config()
    c.mode = "individual"
    c.num_examples = 1000
    c.n_iter = 100
    c.n_queries = 5000
    if part == "apgd_square":
        c.attacks = ("apgd-ce", "apgd-dlr", "square")
    else:
        c.attacks = ("pgd",)
        c.pgd_steps = TRAINING_PGD_STEPS[task] if part == "pgd" else 100
        c.pgd_step_size = PGD_STEP_SIZE[(task, part)]
    c.output = OUTPUTS[part]
    if smoke:
        c = apply_variant(c, "smoke")
        c.pgd_steps = 3 if part == "pgd" else 5
    return c
