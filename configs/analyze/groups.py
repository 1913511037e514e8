"""Loss and accuracy of the difficulty groups G0..G9 over training (thesis eq. 4.32, Fig. 4.21) from the
run's train.instance_eval records; writes RUN/analysis/groups.json and RUN/plots/groups.png."""
from configs.analyze.common import apply_variant, base_analyze_config


def get_config(arg: str = ""):
    c = base_analyze_config()
    c.analysis = "groups"
    return apply_variant(c, arg)
