"""§4.2.3: ResNet18 (Table 4.1, width w=8) on CIFAR-10, PGD-10 adversarial training with step ε/4,
l_inf ε=8/255, SGD momentum 0.9, lr 0.1 decayed at 50%/75%, weight decay 5e-4, crop+flip.
The smoke variant runs on tfds mock data (tests) for a few steps with w=1."""
from configs.common import base_config


def get_config(arg: str = ""):
    c = base_config()
    c.data.name = "cifar10"
    c.data.batch_size = 128
    c.data.eval_batch_size = 500
    c.data.augment = "crop_flip"
    c.model.name = "resnet18"
    c.model.kwargs.w = 8
    c.threat.norm, c.threat.eps = "linf", 8 / 255
    c.objective.attack.steps = 10
    c.objective.attack.step_size = 2 / 255  # eps / 4
    c.optimizer.name, c.optimizer.lr = "sgd", 0.1
    c.optimizer.momentum, c.optimizer.weight_decay = 0.9, 5e-4
    c.schedule.name = "multistep"
    c.schedule.milestones = (0.5, 0.75)
    c.train.num_epochs = 100.0
    c.train.log_every = 100
    c.train.eval_every_epochs = 5.0
    c.eval.num_examples = 1000
    if arg == "smoke":
        c.model.kwargs.w = 1
        c.data.batch_size = 8
        c.data.eval_batch_size = 8
        c.train.num_steps = 3
        c.train.log_every = 1
        c.train.eval_every_epochs = 0.0
        c.objective.attack.steps = 2
        c.eval.attack.steps = 2
        c.eval.num_examples = 16
        c.train.tensorboard = False
    elif arg:
        raise ValueError(f"Unknown config variant {arg!r}; expected '' or 'smoke'.")
    return c
