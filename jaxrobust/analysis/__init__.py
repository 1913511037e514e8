"""Loss-landscape analyses (thesis §4.2) and the registry behind ``python -m experiments.analyze``.

Pure functions over (``apply_fn(params, x)`` or a loss, params, data):

- :mod:`~jaxrobust.analysis.subset`: the clean / adversarial loss over a fixed subset in masked batches;
- :mod:`~jaxrobust.analysis.hessian`: Hessian-vector products, top-k eigenvalues (Lanczos with full
  re-orthogonalisation, power iteration with deflation), SLQ spectral density (Fig 4.5);
- :mod:`~jaxrobust.analysis.landscape`: 1-D / 2-D landscapes along filter-normalised random, gradient
  or eigenvector directions (Fig 4.6);
- :mod:`~jaxrobust.analysis.similarity`: cosine similarity of perturbations across checkpoints and at
  θ ± a v (Fig 4.7), of per-example gradients (gradient scattering), gradient norm over training
  (Figs 4.3-4.4);
- :mod:`~jaxrobust.analysis.connectivity`: quadratic (order-n) Bézier curves between two trained
  minima, trained as the objective ``bezier_curve`` of the one training loop, and the loss along them
  and along the straight line (Fig 4.8).

Each module registers its analyses (:func:`register_analysis`); other packages register theirs the
same way and are imported through ``config.imports``.
"""
from jaxrobust.analysis.registry import (Analysis, AnalysisContext, apply_fn_of, get_analysis,
                                         list_analyses, register_analysis, to_jsonable)

LOSS_KINDS = ("clean", "adversarial")
POINT_MODES = ("fixed", "regenerate")
SHARED_SECTIONS = ("checkpoint", "data", "loss")


def validate_common(cfg) -> None:
    """One ValueError for bad shared settings of an analyze config (before anything runs)."""
    if cfg.loss.kind not in LOSS_KINDS:
        raise ValueError(f"loss.kind={cfg.loss.kind!r}; expected one of {list(LOSS_KINDS)}.")
    if cfg.loss.points not in POINT_MODES:
        raise ValueError(f"loss.points={cfg.loss.points!r}; expected one of {list(POINT_MODES)}.")
    if cfg.loss.eps is not None and not float(cfg.loss.eps) >= 0:
        raise ValueError(f"loss.eps must be >= 0 (None = the run's training ε), got {cfg.loss.eps}.")
    if cfg.loss.steps < 0 or cfg.loss.restarts < 1:
        raise ValueError(f"loss.steps must be >= 0 and loss.restarts >= 1, got {cfg.loss.steps}, "
                         f"{cfg.loss.restarts}.")
    if cfg.data.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}.")
    if cfg.checkpoint.weights not in ("final", "ema"):
        raise ValueError(f"checkpoint.weights={cfg.checkpoint.weights!r}; expected 'final' or 'ema'.")


def settings_of(cfg) -> dict:
    """The config sections an analysis's result depends on (recorded in its JSON)."""
    out = {"seed": cfg.seed}
    for k in SHARED_SECTIONS + (cfg.analysis,):
        if k in cfg and hasattr(cfg[k], "to_dict"):
            out[k] = cfg[k].to_dict()
    return out


# Built-in analyses register themselves on import.
from jaxrobust.analysis import hessian  # noqa: E402,F401  (hessian, density)

__all__ = ["Analysis", "AnalysisContext", "register_analysis", "get_analysis", "list_analyses",
           "apply_fn_of", "to_jsonable", "validate_common", "settings_of"]
