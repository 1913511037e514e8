"""D-distance (thesis eq. 4.31, Tables 4.3-4.4) between this run's difficulty and the runs of
--config.ddistance.against='label=DIR[@CONFIG];...'; writes RUN/analysis/ddistance.json."""
from configs.analyze.common import apply_variant, base_analyze_config


def get_config(arg: str = ""):
    c = base_analyze_config()
    c.analysis = "ddistance"
    return apply_variant(c, arg)
