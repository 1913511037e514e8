"""Schema of analysis configs (python -m experiments.analyze --config=configs/analyze/X.py --workdir=RUN).

The one place where the defaults of every analysis live: ``analysis`` names a registered analysis
(``jaxrobust.analysis.list_analyses()``), ``name`` the outputs ``RUN/analysis/<name>.json`` and
``RUN/plots/<name>.png`` ("" = the analysis's name). Shared sections: ``checkpoint`` (which weights),
``data`` (the fixed subset), ``loss`` (clean, or adversarial with PGD); then one section per analysis.
Analyses added by other modules add their section here in one block of their own.
"""
import ml_collections


def base_analyze_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.analysis = "hessian"
    c.name = ""  # RUN/analysis/<name>.json, RUN/plots/<name>.png; "" = the analysis's name
    c.seed = 0
    c.imports = ()  # modules to import first (e.g. ones registering analyses)
    c.plot = True

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.step = -1  # < 0: the latest checkpoint
    c.checkpoint.weights = "final"  # or "ema" (runs with objective.ema_decay > 0)

    # The fixed data subset every loss, gradient and Hessian-vector product is computed on, in masked
    # batches of batch_size (summed exactly).
    c.data = ml_collections.ConfigDict()
    c.data.split = "train"
    c.data.num_examples = 1000  # <= 0: the whole split
    c.data.batch_size = 250
    c.data.subset_seed = -1  # < 0: the first num_examples; >= 0: a random subset drawn with this seed

    # The loss analysed: "clean" (L_0) or "adversarial" (L_ε of eq. 4.1: PGD points at the analysed
    # parameters; at ε = 0 it is the clean loss). eps None / norm "" = the run's training values.
    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "adversarial"
    c.loss.eps = ml_collections.config_dict.placeholder(float)
    c.loss.norm = ""
    c.loss.steps = 10
    c.loss.step_size = -1.0  # <= 0: 2.5 ε / steps
    c.loss.restarts = 1
    c.loss.random_start = True
    # Hessian analyses: "regenerate" the PGD points inside every Hessian-vector product (memory of one
    # batch) or generate them once and hold them "fixed" (memory of the subset; same operator).
    c.loss.points = "fixed"

    # hessian: top-k eigenvalues (Fig 4.5: k = 20) by Lanczos and by power iteration with deflation.
    c.hessian = ml_collections.ConfigDict()
    c.hessian.top_k = 20
    c.hessian.methods = "lanczos,power"
    c.hessian.lanczos_steps = 0  # <= 0: min(n, max(4k, 40))
    c.hessian.power_iters = 100  # per eigenvalue (PyHessian's maxIter)
    c.hessian.power_tol = 1e-3  # relative change of the Rayleigh quotient (PyHessian's tol)
    c.hessian.normalize_samples = 5  # random parameter draws whose mean loss normalises Fig 4.5

    # density: spectral density by stochastic Lanczos quadrature.
    c.density = ml_collections.ConfigDict()
    c.density.probes = 10
    c.density.steps = 80  # Lanczos steps per probe
    c.density.block = 5  # probes per block Hessian product
    c.density.grid_points = 1000
    c.density.sigma_fraction = 0.01  # Gaussian smoothing, fraction of the spectrum's range

    # landscape: L(θ + a d1 [+ b d2]) along filter-normalised random directions (Li et al. 2018),
    # the gradient or the top Hessian eigenvectors (Fig 4.6).
    c.landscape = ml_collections.ConfigDict()
    c.landscape.dims = 1  # 1 or 2
    c.landscape.directions = "random"  # random | gradient | eigen
    c.landscape.span = 1.0  # a, b in [-span, span] (random: relative to each filter's norm)
    c.landscape.points = 21  # per axis
    c.landscape.bias_bn = "zero"  # random directions of 1-d parameters (biases, BN): zero | keep
    c.landscape.eigen_steps = 40  # Lanczos steps for the eigen directions
    c.landscape.robust = True  # also the adversarial loss (PGD regenerated at every point)

    # similarity: cosine similarity of PGD perturbations across checkpoints (and at θ ± a v, Fig 4.7)
    # and of per-example gradients within a batch (gradient scattering, Figs 4.3-4.4).
    c.similarity = ml_collections.ConfigDict()
    c.similarity.checkpoints = ""  # comma-separated steps; "" = every checkpoint kept
    c.similarity.num_examples = 256  # examples whose perturbations are compared
    c.similarity.gradient_examples = 64  # per-example gradients compared
    c.similarity.offsets = "0.0,0.01,0.02,0.05,0.1"  # a of θ ± a v (v a unit vector)
    c.similarity.directions = "random,eigen"

    # connectivity: the trained Bézier curve of the run (objective 'bezier_curve') and the straight
    # line between its endpoints, evaluated at `points` values of t (Fig 4.8).
    c.connectivity = ml_collections.ConfigDict()
    c.connectivity.points = 21
    c.connectivity.test_split = "test"
    c.connectivity.test_examples = 1000
    c.connectivity.robust = True  # also the adversarial loss / error along the paths
    return c


def apply_variant(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
    """``:smoke`` shrinks every budget so an analysis runs in seconds (tests)."""
    if arg == "smoke":
        c.data.num_examples, c.data.batch_size = 64, 32
        c.loss.steps = 2
        c.hessian.top_k, c.hessian.lanczos_steps, c.hessian.power_iters = 3, 12, 20
        c.hessian.normalize_samples = 2
        c.density.probes, c.density.steps, c.density.block, c.density.grid_points = 2, 10, 2, 200
        c.landscape.points, c.landscape.eigen_steps = 5, 8
        c.similarity.num_examples, c.similarity.gradient_examples = 32, 8
        c.similarity.offsets = "0.0,0.05"
        c.connectivity.points, c.connectivity.test_examples = 5, 64
    elif arg:
        raise ValueError(f"Unknown config variant {arg!r}; expected '' or 'smoke'.")
    return c
