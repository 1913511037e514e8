"""§3.2.2: FC net with three hidden layers of 1024 on Fashion-MNIST, PGD l_inf ε=0.1 adversarial
training (full 60k/10k from the Debian package, or --config.data.name=fashion_mnist for TFDS)."""
from configs.common import base_config


def get_config(arg: str = ""):
    c = base_config()
    c.data.name = "fashion_mnist_local"
    c.data.batch_size = 100
    c.data.val_fraction = 0.02
    c.model.name = "fc3x1024"
    c.threat.norm, c.threat.eps = "linf", 0.1
    c.objective.attack.steps = 10
    c.objective.attack.step_size = 0.025
    c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "adam", 1e-3, 0.0
    c.schedule.name = "multistep"
    c.train.num_epochs = 40.0
    c.train.log_every = 100
    c.eval.splits = ("val", "test")
    if arg == "smoke":
        c.data.name = "mnist5k"  # same shapes, bundled, so the smoke test needs no Debian package
        c.data.val_fraction = 0.05
        c.train.num_steps = 4
        c.train.log_every = 2
        c.train.eval_every_epochs = 0.0
        c.objective.attack.steps = 2
        c.eval.attack.steps = 2
        c.eval.num_examples = 100
        c.train.tensorboard = False
    elif arg:
        raise ValueError(f"Unknown config variant {arg!r}; expected '' or 'smoke'.")
    return c
