"""Instance difficulty of a run (thesis eq. 4.30, Figs. 4.15-4.16): RUN/analysis/difficulty.json and
RUN/plots/difficulty.png from RUN/difficulty.npy (train with --config.train.difficulty.enabled=True)."""
from configs.analyze.common import apply_variant, base_analyze_config


def get_config(arg: str = ""):
    c = base_analyze_config()
    c.analysis = "difficulty"
    return apply_variant(c, arg)
