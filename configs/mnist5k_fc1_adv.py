"""Demo: the adversarial training objectives of thesis §4.1 (jaxrobust/train/adversarial.py) on the
bundled MNIST-5k with FC1, l_inf ε=0.1: ``<method>[,ema][,smoke]`` with method one of trades, mart,
awp_at, awp_trades (TRADES/MART β = 6, AWP γ = 5e-3 as the papers' defaults).

    python -m experiments.train --config=configs/mnist5k_fc1_adv.py:trades --workdir=runs/trades
    python -m experiments.train --config=configs/mnist5k_fc1_adv.py:awp_trades,ema,smoke --workdir=/tmp/s
"""
from configs.common import base_config

METHODS = ("trades", "mart", "awp_at", "awp_trades")


def get_config(arg: str = "trades"):
    parts = [p for p in arg.split(",") if p]
    method = parts[0] if parts else "trades"
    flags = set(parts[1:])
    if method not in METHODS or not flags <= {"ema", "smoke"}:
        raise ValueError(f"Unknown config variant {arg!r}; expected <method>[,ema][,smoke] with method "
                         f"one of {METHODS}.")
    c = base_config()
    c.data.name = "mnist5k"
    c.data.batch_size = 100
    c.data.eval_batch_size = 500
    c.model.name = "fc1"
    c.threat.norm, c.threat.eps = "linf", 0.1
    c.objective.name = method
    c.objective.attack.steps = 10
    c.objective.attack.step_size = 0.025  # 2.5 eps / steps
    c.objective.beta = 6.0
    c.objective.awp.gamma = 5e-3
    c.objective.ema_decay = 0.995 if "ema" in flags else 0.0
    c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "adam", 1e-3, 0.0
    c.schedule.name = "cosine"
    c.train.num_epochs = 30.0
    c.train.log_every = 40
    c.train.eval_every_epochs = 10.0
    c.eval.attack.steps = 20
    if "smoke" in flags:
        c.train.num_steps = 4
        c.train.log_every = 2
        c.train.eval_every_epochs = 0.0
        c.objective.attack.steps = 2
        c.eval.attack.steps = 2
        c.eval.num_examples = 100
        c.train.tensorboard = False
    return c
