"""absl entry points: python -m experiments.<name> --config=configs/<file>.py --workdir=DIR."""
import json
import os
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags


def define_entrypoint_flags(config_help: str, workdir_help: str) -> None:
    """Defines --config and --workdir once per process, so several entry-point modules can be
    imported together (tests, notebooks) without absl's DuplicateFlagError."""
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    if "workdir" not in flags.FLAGS:
        flags.DEFINE_string("workdir", None, workdir_help)
        flags.mark_flags_as_required(["config", "workdir"])


def make_main(job: Callable[[Any, str], dict], summarise: Callable[[dict], Any]):
    """The absl ``main`` of an entry point: rejects positional arguments, keeps logs at WARNING unless
    --verbosity is given (orbax logs every checkpoint at INFO), runs ``job(config, workdir)`` and
    prints ``summarise(result)`` as JSON."""
    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        out = job(flags.FLAGS.config, flags.FLAGS.workdir)
        print(json.dumps(summarise(out), indent=2, default=str))
    return main


def write_json_atomic(obj, path: str) -> None:
    """Write JSON through a temporary file and a rename: readers never see a partial file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
