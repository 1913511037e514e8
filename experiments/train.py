"""Train a model with any objective of jaxrobust's single training loop.

    python -m experiments.train --config=configs/mnist5k_fc1_pgd.py --workdir=runs/demo \
        [--config.optimizer.lr=3e-4 ...]

Re-running the same command on an existing workdir resumes from its latest checkpoint.
"""
from absl import app

from experiments import define_entrypoint_flags, make_main
from jaxrobust.train import train

define_entrypoint_flags("Path to a config file (file.py or file.py:variant).",
                        "Directory for checkpoints, metrics and summaries.")
main = make_main(train, lambda summary: {k: summary[k] for k in ("steps", "eval") if k in summary})


if __name__ == "__main__":
    app.run(main)
