"""Train a model with any objective of jaxrobust's single training loop.

    python -m experiments.train --config=configs/mnist5k_fc1_pgd.py --workdir=runs/demo \
        [--config.optimizer.lr=3e-4 ...] [--config.imports=my_pkg.my_objectives]

Re-running the same command on an existing workdir resumes from its latest checkpoint (Ctrl-C stops a
run cleanly: the last checkpoint stays). A different config on an existing run is refused, listing the
changed keys, unless ``--config.allow_config_changes=True`` (jaxrobust/train/workdir.py).
"""
from experiments import define_entrypoint_flags, make_main, run
from jaxrobust.train import train

define_entrypoint_flags("Path to a config file (file.py or file.py:variant).",
                        "Directory for checkpoints, metrics and summaries.")
main = make_main(train, lambda summary: {k: summary[k] for k in ("steps", "eval") if k in summary},
                 resume_note="the last checkpoint is kept; resume with the same command")


if __name__ == "__main__":
    run(main)
