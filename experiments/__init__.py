"""absl entry points: python -m experiments.<name> --config=configs/<file>.py --workdir=DIR."""
from absl import flags
from ml_collections import config_flags


def define_entrypoint_flags(config_help: str, workdir_help: str) -> None:
    """Defines --config and --workdir once per process, so several entry-point modules can be
    imported together (tests, notebooks) without absl's DuplicateFlagError."""
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    if "workdir" not in flags.FLAGS:
        flags.DEFINE_string("workdir", None, workdir_help)
        flags.mark_flags_as_required(["config", "workdir"])
