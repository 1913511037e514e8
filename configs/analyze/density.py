"""Spectral density of the Hessian by stochastic Lanczos quadrature (10 probes x 80 Lanczos steps);
writes RUN/analysis/density.json (nodes, weights, moments, the smoothed density on a grid)."""
from configs.analyze.common import apply_variant, base_analyze_config


def get_config(arg: str = ""):
    c = base_analyze_config()
    c.analysis = "density"
    return apply_variant(c, arg)
