"""Schema of certification configs (python -m experiments.certify --config=configs/certify/X.py --workdir=RUN)."""
import ml_collections


def base_certify_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.distributed = False  # multi-host: each process evaluates its slice of the examples (BUILD.md)
    c.imports = ()  # modules to import first (the training run's own config.imports are imported too)
    c.split = "test"
    c.num_examples = 1000  # <= 0: the whole split
    c.batch_size = 100
    c.threat = ml_collections.ConfigDict()
    c.threat.norm = ""  # "" = the training run's norm
    c.threat.eps = ml_collections.config_dict.placeholder(float)  # None = the training run's eps; >= 0
    c.output = ""  # file written in RUN; "" = certify.json (table3_6) / certify_nonuniform.json
    c.mode = "table3_6"  # table3_6: CTE/PGD/CRE/ACB (+search, +MIP); nonuniform: Alg 3.3 vs uniform
    c.lin_method = "crown"  # the linear certifier behind CRE Lin / ACB Lin / ACB PEC
    c.extra_methods = ("crown_ibp", "ibp_linear")  # also report their CRE/ACB (one-shot)
    c.pgd = ml_collections.ConfigDict()
    c.pgd.steps = 100
    c.pgd.restarts = 1
    c.pgd.loss = "ce"
    c.search = ml_collections.ConfigDict()  # Algorithm 3.5 vs binary search (Table 3.9)
    c.search.enabled = True
    c.search.num_examples = 200
    c.search.eps_high = -1.0  # < 0: 4 x the budget
    c.search.tol = -1.0  # < 0: budget / 100
    c.milp = ml_collections.ConfigDict()  # complete verification (CRE MIP), l_inf only
    c.milp.enabled = False
    c.milp.num_examples = 100
    c.milp.time_limit = 60.0  # seconds per example; timeouts count as not certified
    c.nonuniform = ml_collections.ConfigDict()  # mode = nonuniform (Tables 3.2, 3.3)
    c.nonuniform.num_examples = 100
    c.nonuniform.iterations = 300
    c.nonuniform.lr = -1.0  # <= 0: 0.02 for the uniform run, 0.005 for the non-uniform one
    c.nonuniform.eps0 = -1.0  # < 0: the budget
    c.nonuniform.delta = 1e-4
    c.nonuniform.method = "crown"
    # The thesis's regions (Table 3.2) are not clipped to the pixel box: with the box, a feature at
    # the box edge could grow without bound in one direction and the volume would be meaningless.
    c.nonuniform.use_box = False
    c.plots = ml_collections.ConfigDict()
    c.plots.enabled = True
    c.plots.example = 0  # index (within the evaluated points) of Fig 3.6's input
    c.plots.num_eps = 40  # Fig 3.6 grid: budgets in (0, eps_high]
    c.plots.num_maps = 4  # bounding maps to draw (Fig 3.5)
    return c


def apply_variant(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
    """``:smoke`` shrinks every budget so a certification runs in seconds (tests)."""
    if arg == "smoke":
        c.num_examples, c.batch_size = 32, 16
        c.pgd.steps = 5
        c.search.num_examples = 8
        c.milp.num_examples, c.milp.time_limit = 4, 10.0
        c.nonuniform.num_examples, c.nonuniform.iterations = 4, 20
        c.plots.num_eps = 5
        c.extra_methods = ("crown_ibp",)
    elif arg:
        raise ValueError(f"Unknown config variant {arg!r}; expected '' or 'smoke'.")
    return c
