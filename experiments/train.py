"""Train a model with any objective of jaxrobust's single training loop.

    python -m experiments.train --config=configs/mnist5k_fc1_pgd.py --workdir=runs/demo \
        [--config.optimizer.lr=3e-4 ...]

Re-running the same command on an existing workdir resumes from its latest checkpoint.
"""
from absl import app, flags, logging

from experiments import define_entrypoint_flags
from jaxrobust.train import train

FLAGS = flags.FLAGS
define_entrypoint_flags("Path to a config file (file.py or file.py:variant).",
                        "Directory for checkpoints, metrics and summaries.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    summary = train(FLAGS.config, FLAGS.workdir)
    print({k: summary[k] for k in ("steps", "eval") if k in summary})


if __name__ == "__main__":
    app.run(main)
