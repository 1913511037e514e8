"""Best vs last robust test accuracy (the robust overfitting gap, thesis Tables 4.5-4.6) and the
learning curves (Figs. 4.17-4.20, 4.25); writes RUN/analysis/overfitting.json."""
from configs.analyze.common import apply_variant, base_analyze_config


def get_config(arg: str = ""):
    c = base_analyze_config()
    c.analysis = "overfitting"
    return apply_variant(c, arg)
