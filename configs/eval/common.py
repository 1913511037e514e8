"""Schema of evaluation configs (python -m experiments.evaluate --config=configs/eval/X.py --workdir=RUN)."""
import ml_collections


def base_eval_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.distributed = False  # multi-host: each process evaluates its slice of the examples (BUILD.md)
    c.imports = ()  # modules to import first (the training run's own config.imports are imported too)
    c.split = "test"
    c.num_examples = 1000  # <= 0: the whole split
    c.batch_size = 500
    c.attacks = ("apgd-ce", "apgd-t", "fab-t", "square")
    c.mode = "standard"  # standard: sequential worst case; individual: each attack alone
    c.threat = ml_collections.ConfigDict()
    c.threat.norm = ""  # "" = the training run's norm
    c.threat.eps = ml_collections.config_dict.placeholder(float)  # None = the training run's eps; >= 0
    c.n_iter = 100  # APGD iterations
    c.n_queries = 5000  # Square queries
    c.pgd_steps = 20
    c.pgd_restarts = 1
    c.pgd_step_size = 0.0  # input units; <= 0: 2.5 * eps / pgd_steps
    c.n_target_classes = 9
    c.save_adversarial = False  # RUN/eval_adversarial.npz
    c.output = "eval.json"  # file written in RUN (several evaluations of one run: distinct names)
    c.resume = True  # resume from RUN/eval_state.npz if an earlier evaluation was interrupted
    return c


def apply_variant(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
    """``:smoke`` shrinks every budget so an evaluation runs in seconds (tests)."""
    if arg == "smoke":
        c.num_examples, c.batch_size, c.n_iter, c.n_queries, c.pgd_steps = 64, 32, 10, 50, 5
    elif arg:
        raise ValueError(f"Unknown config variant {arg!r}; expected '' or 'smoke'.")
    return c
