"""Fig 4.5: top-20 Hessian eigenvalues of the run's loss (adversarial at its training ε by default;
``--config.loss.kind=clean`` for L_0) on 1,000 training examples, by Lanczos and by power iteration;
writes RUN/analysis/hessian.json (keys ``lanczos``, ``power``, ``normalized``, ``relative``)."""
from configs.analyze.common import apply_variant, base_analyze_config


def get_config(arg: str = ""):
    c = base_analyze_config()
    c.analysis = "hessian"
    return apply_variant(c, arg)
