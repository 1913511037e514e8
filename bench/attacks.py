"""Cross-check and benchmark of our attacks against torchattacks and pyautoattack (the AutoAttack
code on PyPI) on the SAME weights, in one run.

    pip install -e ".[bench]"   # torch 2.13 CPU, torchattacks, pyautoattack (use --no-deps if pip
                                # tries to pull torchvision; only torch is needed)
    python -m bench.attacks [--n=500] [--queries=5000]

Models: FC1 and the Wong-Kolter small CNN, PGD-trained for a few epochs on MNIST-5k with our loop,
ported to PyTorch (kernels transposed, NHWC flattening kept). Attacks at l_inf ε=0.1 on test points:
APGD-CE (100 it.), APGD-T (100 it., 9 targets), Square (margin loss, p_init 0.8, resc_schedule=False).
Reports robust accuracy of each implementation, the difference (percentage points) and time ratios.
torchattacks is called with steps=100 set explicitly (its AutoAttack wrapper silently uses 10).
Writes bench/results/attacks.json.
"""
from __future__ import annotations

import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import write_results
from configs import mnist5k_fc1_pgd
from jaxrobust.attacks.apgd import apgd, apgd_targeted
from jaxrobust.attacks.square import square
from jaxrobust.threat import ThreatModel
from jaxrobust.train import load_trained, train


def torch_port(run):
    """Our FC1 / small CNN with their weights, as a torch.nn.Module on NCHW inputs."""
    import torch
    import torch.nn as tnn
    p = jax.tree.map(np.asarray, run.variables["params"])
    mean = float(run.model.mean[0]) if hasattr(run.model, "mean") else 0.0
    std = float(run.model.std[0]) if hasattr(run.model, "std") else 1.0
    t = lambda a: torch.tensor(np.ascontiguousarray(a))

    class Port(tnn.Module):
        def __init__(self):
            super().__init__()
            self.dense = [(t(p[k]["kernel"].T), t(p[k]["bias"])) for k in sorted(
                [k for k in p if k.startswith("Dense")], key=lambda s: int(s.split("_")[1]))]
            self.conv = [(t(p[k]["kernel"].transpose(3, 2, 0, 1)), t(p[k]["bias"])) for k in sorted(
                [k for k in p if k.startswith("Conv")], key=lambda s: int(s.split("_")[1]))]

        def forward(self, x):
            x = (x - mean) / std
            for w, b in self.conv:
                x = torch.relu(torch.nn.functional.conv2d(x, w, b, stride=2, padding=1))
            x = x.permute(0, 2, 3, 1).flatten(1)  # NHWC flattening, as in Flax
            for i, (w, b) in enumerate(self.dense):
                x = x @ w.T + b
                if i < len(self.dense) - 1:
                    x = torch.relu(x)
            return x

    return Port().eval()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv):
    opts = dict(a.lstrip("-").split("=") for a in argv[1:] if "=" in a)
    n, queries = int(opts.get("n", 500)), int(opts.get("queries", 5000))
    import torch
    import torchattacks
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from pyautoattack.square import SquareAttack
    torch.manual_seed(0)
    eps = 0.1
    results = {}
    for model in ("fc1", "cnn_small"):
        wd = tempfile.mkdtemp()
        c = mnist5k_fc1_pgd.get_config()
        c.model.name = model
        c.train.num_epochs, c.train.eval_every_epochs, c.train.tensorboard = 5.0, 0.0, False
        c.eval.num_examples = 200
        train(c, wd)
        run = load_trained(wd)
        b = run.dataset.split("test").get(np.arange(n))
        x, y = jnp.asarray(b["image"]), jnp.asarray(b["label"])
        xt, yt = torch.tensor(b["image"]).permute(0, 3, 1, 2).contiguous(), torch.tensor(b["label"]).long()
        net = torch_port(run)
        with torch.no_grad():
            agree = float((net(xt).argmax(1).numpy() == np.asarray(jnp.argmax(run.logits_fn(x), -1))).mean())
        tm = ThreatModel("linf", eps)
        f = run.logits_fn
        ours_fns = {
            "apgd-ce": jax.jit(lambda x, y, k: apgd(f, x, y, k, tm, n_iter=100, loss="ce")),
            "apgd-t": jax.jit(lambda x, y, k: apgd_targeted(f, x, y, k, tm, n_iter=100)),
            "square": jax.jit(lambda x, y, k: square(f, x, y, k, tm, n_queries=queries)),
        }
        refs = {
            "apgd-ce": {"torchattacks": lambda: torchattacks.APGD(net, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=0)(xt, yt),
                        "pyautoattack": lambda: APGDAttack(net, n_iter=100, norm="Linf", eps=eps, loss="ce", seed=0, device="cpu").perturb(xt, yt)},
            "apgd-t": {"torchattacks": lambda: torchattacks.APGDT(net, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=10, seed=0)(xt, yt),
                       "pyautoattack": lambda: APGDAttack_targeted(net, n_iter=100, norm="Linf", eps=eps, seed=0, device="cpu").perturb(xt, yt)},
            "square": {"torchattacks": lambda: torchattacks.Square(net, norm="Linf", eps=eps, n_queries=queries, p_init=0.8, resc_schedule=False, seed=0)(xt, yt),
                       "pyautoattack": lambda: SquareAttack(net, norm="Linf", eps=eps, n_queries=queries, p_init=0.8, resc_schedule=False, seed=0, device="cpu").perturb(xt, yt)},
        }
        res = {"torch_jax_prediction_agreement": agree, "n": n,
               "clean_accuracy": float(jnp.mean(jnp.argmax(f(x), -1) == y))}
        for name, fn in ours_fns.items():
            fn(x, y, jax.random.PRNGKey(0)).block_until_ready()  # compile outside the timing
            xa, t_ours = timed(lambda: fn(x, y, jax.random.PRNGKey(1)).block_until_ready())
            acc_ours = float(jnp.mean(jnp.argmax(f(xa), -1) == y))
            entry = {"jaxrobust": {"robust_accuracy": acc_ours, "seconds": t_ours}}
            for ref_name, ref in refs[name].items():
                xr, t_ref = timed(ref)
                with torch.no_grad():
                    acc_ref = float((net(xr).argmax(1) == yt).float().mean())
                entry[ref_name] = {"robust_accuracy": acc_ref, "seconds": t_ref,
                                   "difference_pp": 100 * (acc_ours - acc_ref),
                                   "speedup_jaxrobust": t_ref / t_ours}
            res[name] = entry
            print(model, name, entry, flush=True)
        results[model] = res
        write_results("attacks", {"benchmark": "attack cross-check, l_inf eps=0.1, MNIST-5k test",
                                  "queries": queries, "results": results, "partial": True})
    write_results("attacks", {"benchmark": "attack cross-check, l_inf eps=0.1, MNIST-5k test",
                              "queries": queries, "results": results})


if __name__ == "__main__":
    main(sys.argv)
