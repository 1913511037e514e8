"""AutoLip / SeqLip upper bounds of the run's l2 Lipschitz constant averaged over 20 runs (thesis
Table 4.5) and the gradient-norm lower estimate; writes RUN/analysis/lipschitz.json."""
from configs.analyze.common import apply_variant, base_analyze_config


def get_config(arg: str = ""):
    c = base_analyze_config()
    c.analysis = "lipschitz"
    c.data.split = "test"  # the gradient-norm estimate on test points
    return apply_variant(c, arg)
