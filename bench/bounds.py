"""Cross-check and benchmark of our bound propagation (IBP, CROWN, CROWN-IBP, Fast-Lin) against
auto_LiRPA on the SAME weights and the SAME input set, in one run.

auto_LiRPA is used from a source checkout beside the project, not installed (its setup.py pins
torch<2.9 and torchvision; neither pin matters here and torchvision is never imported):

    mkdir -p third_party/auto_LiRPA            # third_party/ is git-ignored
    git clone https://github.com/Verified-Intelligence/auto_LiRPA /tmp/al   # or any snapshot
    git --git-dir=/tmp/al/.git --work-tree=third_party/auto_LiRPA checkout HEAD -- .
    pip install appdirs graphviz              # its only pure-python imports missing here
                                              # (packaging, pyyaml, sortedcontainers, tqdm present)
    python -m bench.bounds [--batch=50] [--eps=0.01,0.03] [--steps=300] [--quick] [--nets=fc1,...]

(The PyPI package ``auto-lirpa`` 0.3 is too old for torch 2.x; do not use it.) This file puts
``third_party/auto_LiRPA`` on ``sys.path`` itself; ``AUTO_LIRPA_PATH`` overrides the location.

Nets (briefly trained by the library's update step, Adam, clean cross-entropy on MNIST-5k train, so
the bounds are meaningful):
``fc1`` (784-1024-10), ``cnn_small`` (Wong-Kolter) on 28x28x1 MNIST test images, and a ResNet
(``ResNet((1, 1), 'basic', w=1)``: stem conv+BN, a basic block, a strided block with a 1x1 conv
shortcut, global average pooling, eval-mode BN = affine) on MNIST test images average-pooled to
14x14 and repeated over 3 channels (per-channel mean/std). Models normalise inside (mean/std);
the torch ports take normalised inputs (see below), kernels are transposed HWIO -> OIHW and the first
dense layer after a conv has its rows permuted from NHWC to NCHW flattening order.

Input set: the l_inf ball of radius eps intersected with the box [0, 1]. The torch ports start
after the normalisation (auto_LiRPA's patches mode cannot bound a (x - mean) / std layer before a
padded conv), so auto_LiRPA gets the normalised point and the normalised corners of that box,
``PerturbationLpNorm(norm=inf, eps=eps, x_L=norm(clip(x - eps)), x_U=norm(clip(x + eps)))``: the
image of the same set under the same affine map.

Compared (bounds on all logits, lower and upper):
  * ours ``ibp_bounds``                    vs auto_LiRPA ``IBP``
  * ours ``crown_bounds(method='crown')``  vs auto_LiRPA ``CROWN`` with
    ``compare_crown_with_ibp=True``: the same relaxation and the same intersections on both sides
    (CROWN intermediate bounds ∩ IBP ones computed from the already-tightened bounds, and the output
    intervals ∩ their IBP intervals); and, for information, vs auto_LiRPA's default ``CROWN``
    (sparse intermediate bounds: neurons IBP proves stable keep IBP bounds, no intersection).
  * ours ``crown_bounds(method='crown', intersect_ibp=False)`` (pure CROWN) vs auto_LiRPA
    ``CROWN`` with ``sparse_intermediate_bounds=False`` (dense 'matrix' conv mode).
  * ours ``crown_ibp`` vs auto_LiRPA ``CROWN-IBP`` and ours ``fastlin`` vs auto_LiRPA ``CROWN`` with
    ``activation_bound_option='same-slope'``, both with ``compare_crown_with_ibp=True``.
  * ours ``crown`` with ``patches=False`` (dense rows for the conv layers): the speed-up of our
    patch-form intermediate bounds (``patch_speedup``), same bounds.
Agreement: max |ours - theirs| over all bounds, and that divided by the mean width of auto_LiRPA's
bounds ("relative"). A neuron on the tie of CROWN's adaptive lower slope (u = -l, e.g. the ResNet at
eps=0.01: l = -0.375110, u = 0.375110) gets slope 0 or 1 depending on float rounding (jit vs eager,
patches vs dense rows, either library); both bounds are sound but can differ by ~1e-2 downstream,
in both directions. Timing: ours jitted (compile = lower+compile, reported separately), auto_LiRPA
``compute_bounds`` under ``torch.no_grad()`` with 2 torch threads on the same batch
(BoundedModule construction reported separately); median of warm calls, a single warm call for
calls over 2 s, one call for the diagnostic variants (see ``timed_calls``).
``speed_ratio`` = auto_LiRPA seconds / ours seconds (> 1: ours faster).

MILP seconds per point on fc1 (``--milp_points`` first test points, ``--milp_eps``, CROWN
intermediate bounds, HiGHS).
Writes bench/results/bounds.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import time_fn, write_results
from configs.common import base_config
from jaxrobust.bounds.ibp import ibp_bounds
from jaxrobust.bounds.linear import crown_bounds
from jaxrobust.certify.milp import milp_verify
from jaxrobust.data import load_dataset
from jaxrobust.models import create_model
from jaxrobust.models.zoo import ResNet
from jaxrobust.threat import ThreatModel
from jaxrobust.train import objectives as jobj
from jaxrobust.train.loop import create_train_state, make_update_fn
from jaxrobust.train.optim import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTO_LIRPA = os.environ.get("AUTO_LIRPA_PATH", os.path.join(ROOT, "third_party", "auto_LiRPA"))
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
NETS = ("fc1", "cnn_small", "resnet")


def import_auto_lirpa():
    if not os.path.isdir(os.path.join(AUTO_LIRPA, "auto_LiRPA")):
        raise SystemExit(f"auto_LiRPA source not found at {AUTO_LIRPA}; see this module's docstring.")
    sys.path.insert(0, AUTO_LIRPA)
    warnings.filterwarnings("ignore")
    import auto_LiRPA
    return auto_LiRPA


# ----------------------------------------------------------------------------- data and training
def mnist(split, n, pool=False, seed=0):
    ds = load_dataset("mnist5k").split(split)
    idx = np.random.default_rng(seed).permutation(len(ds))[:n] if split == "train" else np.arange(n)
    b = ds.get(idx)
    x, y = np.asarray(b["image"], np.float32), np.asarray(b["label"], np.int32)
    if pool:  # 28x28x1 -> 14x14x3 (2x2 average pooling, channel repeated): a small RGB-shaped input
        x = x.reshape(x.shape[0], 14, 2, 14, 2, 1).mean((2, 4))
        x = np.clip(np.repeat(x, 3, axis=-1), 0.0, 1.0)
    return x, y


def train(model, x, y, steps, seed=0, lr=1e-3, batch=100):
    """Variables of ``model`` after ``steps`` Adam steps of clean cross-entropy on (x, y), through
    the library's training step (objective 'standard', BN in train mode, running stats updated)."""
    c = base_config()
    c.seed, c.objective.name = seed, "standard"
    c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "adam", lr, 0.0
    c.schedule.name = "constant"
    tx, lr_at = make_optimizer(c.optimizer, c.schedule, steps, max(1, len(x) // batch))
    objective = jobj.get_objective("standard")
    ctx = jobj.ObjectiveContext(model, ThreatModel("linf", 0.0), {"eps": lambda step: 0.0},
                                c.objective, 10, len(x))
    state = create_train_state(model, x.shape[1:], tx, objective, ctx, seed=c.seed, n_train=len(x))
    update = jax.jit(make_update_fn(ctx, objective, lr_at, "none"),
                     donate_argnums=(0,))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        i = rng.integers(0, len(x), batch)
        state, _ = update(state, {"image": jnp.asarray(x[i]), "label": jnp.asarray(y[i]),
                                  "index": jnp.asarray(i, jnp.int32), "mask": jnp.ones(batch, bool)})
    return {"params": state.params, **state.model_state}


# ----------------------------------------------------------------------------- torch ports
def torch_port(name, variables, image_shape):
    """Our Flax model after its ``Normalize`` layer, as a torch.nn.Module on normalised NCHW inputs
    (eval mode). The normalisation is kept outside the torch model: auto_LiRPA's default 'patches'
    conv mode fails on a (x - mean) / std layer in front of a padded conv (assertions / shape
    errors in BoundSub/BoundDiv backward for buffers, plain tensors and scalars alike), and its
    documented usage is to normalise the data and the perturbation box outside the model."""
    import torch
    import torch.nn as tnn
    p = jax.tree.map(np.asarray, variables["params"])
    s = jax.tree.map(np.asarray, variables.get("batch_stats", {}))
    t = lambda a: torch.tensor(np.ascontiguousarray(a, np.float32))
    H, W, C = image_shape

    def conv(k, b=None, stride=1, padding=0):
        c = tnn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], stride, padding, bias=b is not None)
        c.weight.data = t(k.transpose(3, 2, 0, 1))
        if b is not None:
            c.bias.data = t(b)
        return c

    def dense(k, b, nhwc=None):
        if nhwc is not None:  # rows in (h, w, c) order -> torch's (c, h, w) flattening
            h, w, c = nhwc
            k = k.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
        d = tnn.Linear(k.shape[0], k.shape[1], bias=b is not None)
        d.weight.data = t(k.T)
        if b is not None:
            d.bias.data = t(b)
        return d

    def bn(pp, ss):
        m = tnn.BatchNorm2d(pp["scale"].shape[0], eps=1e-5)
        m.weight.data, m.bias.data = t(pp["scale"]), t(pp["bias"])
        m.running_mean.data, m.running_var.data = t(ss["mean"]), t(ss["var"])
        return m

    if name == "fc1":
        net = tnn.Sequential(tnn.Flatten(), dense(p["Dense_0"]["kernel"], p["Dense_0"]["bias"],
                                                          nhwc=(H, W, C)),
                             tnn.ReLU(), dense(p["Dense_1"]["kernel"], p["Dense_1"]["bias"]))
    elif name == "cnn_small":
        h2, w2 = H // 4, W // 4
        net = tnn.Sequential(
            conv(p["Conv_0"]["kernel"], p["Conv_0"]["bias"], 2, 1), tnn.ReLU(),
            conv(p["Conv_1"]["kernel"], p["Conv_1"]["bias"], 2, 1), tnn.ReLU(), tnn.Flatten(),
            dense(p["Dense_0"]["kernel"], p["Dense_0"]["bias"], nhwc=(h2, w2, 32)), tnn.ReLU(),
            dense(p["Dense_1"]["kernel"], p["Dense_1"]["bias"]))
    elif name == "resnet":
        class Block(tnn.Module):
            def __init__(self, pp, ss, stride):
                super().__init__()
                self.c1 = conv(pp["Conv_0"]["kernel"], None, stride, 1)
                self.b1 = bn(pp["BatchNorm_0"], ss["BatchNorm_0"])
                self.c2 = conv(pp["Conv_1"]["kernel"], None, 1, 1)
                self.b2 = bn(pp["BatchNorm_1"], ss["BatchNorm_1"])
                self.sc = None
                if "Conv_2" in pp:  # 1x1 shortcut, Flax 'SAME' padding = 0 for even inputs
                    self.sc = tnn.Sequential(conv(pp["Conv_2"]["kernel"], None, stride, 0),
                                             bn(pp["BatchNorm_2"], ss["BatchNorm_2"]))
                self.relu1, self.relu2 = tnn.ReLU(), tnn.ReLU()

            def forward(self, x):
                y = self.relu1(self.b1(self.c1(x)))
                y = self.b2(self.c2(y))
                return self.relu2((x if self.sc is None else self.sc(x)) + y)

        class Net(tnn.Module):
            def __init__(self):
                super().__init__()
                self.stem = tnn.Sequential(conv(p["Conv_0"]["kernel"], None, 1, 1),
                                           bn(p["BatchNorm_0"], s["BatchNorm_0"]), tnn.ReLU())
                nb = len([k for k in p if k.startswith("BasicBlock")])
                self.blocks = tnn.Sequential(*[
                    Block(p[f"BasicBlock_{i}"], s[f"BasicBlock_{i}"],
                          1 if p[f"BasicBlock_{i}"]["Conv_0"]["kernel"].shape[2]
                          == p[f"BasicBlock_{i}"]["Conv_0"]["kernel"].shape[3] else 2)
                    for i in range(nb)])
                self.fc = dense(p["Dense_0"]["kernel"], p["Dense_0"]["bias"])

            def forward(self, x):
                return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

        net = Net()
    else:
        raise ValueError(name)
    return net.eval()


# ----------------------------------------------------------------------------- ours
# Our variants: (method, crown_bounds options).
OURS = {
    "ibp": ("ibp", {}),
    "crown": ("crown", {}),  # CROWN ∩ IBP at every layer and at the output, patch-form conv layers
    "crown_pure": ("crown", {"intersect_ibp": False}),  # pure CROWN
    "crown_dense": ("crown", {"patches": False}),  # dense rows for conv layers (timing only)
    "crown_ibp": ("crown_ibp", {}),
    "fastlin": ("fastlin", {}),
}


def compile_ours(variant, fn, x, threat):
    """jit + AOT compile of one bound variant; returns (compiled, compile seconds)."""
    method, kw = OURS[variant]
    if method == "ibp":
        f = lambda xb: ibp_bounds(fn, xb, threat)
    else:
        f = lambda xb: crown_bounds(fn, xb, threat, method=method, **kw)
    t = time.perf_counter()
    compiled = jax.jit(f).lower(x).compile()
    return compiled, time.perf_counter() - t


# ----------------------------------------------------------------------------- comparison
def timed_calls(fn, iters, sync=lambda o: o, first_is_warm=False):
    """(output of a first call; seconds per call). Fast calls: median of ``iters`` further calls.
    Calls slower than 2 s (CROWN on the conv nets) are timed once, to keep the whole bench within
    minutes on 2 cores: the first call itself when it is already warm (our AOT-compiled functions),
    else one further call. ``iters=0``: the first call's time (diagnostic variants)."""
    t = time.perf_counter()
    out = sync(fn())
    first = time.perf_counter() - t
    if iters == 0 or (first > 2.0 and first_is_warm):
        return out, first
    return out, time_fn(fn, warmup=0, iters=1 if first > 2.0 else iters, sync=sync)


def agreement(ours, ref):
    (lo, hi), (rlo, rhi) = [tuple(np.asarray(a, np.float64) for a in b) for b in (ours, ref)]
    width = float(np.mean(rhi - rlo))
    d = max(np.max(np.abs(lo - rlo)), np.max(np.abs(hi - rhi)))
    dl, du = rlo - lo, hi - rhi  # > 0: ours looser
    return {"max_abs_diff": float(d), "relative": float(d / width) if width > 0 else float(d),
            "max_abs_diff_lower": float(np.max(np.abs(lo - rlo))),
            "max_abs_diff_upper": float(np.max(np.abs(hi - rhi))),
            "mean_width_ours": float(np.mean(hi - lo)), "mean_width_auto_lirpa": width,
            "frac_ours_tighter_1e-4": float(np.mean(np.concatenate([dl.ravel(), du.ravel()]) < -1e-4)),
            "frac_ours_looser_1e-4": float(np.mean(np.concatenate([dl.ravel(), du.ravel()]) > 1e-4))}


def certified(lo, hi, y):
    """Points certified from the logit bounds alone (lower of y above every other upper)."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    ly = lo[np.arange(len(y)), y]
    other = np.where(np.eye(lo.shape[1], dtype=bool)[y], -np.inf, hi)
    return int(np.sum(ly > other.max(1)))


# Our method -> (auto_LiRPA method, bound_opts label)
PAIRS = [
    ("ibp", "IBP", "default"),
    ("crown", "CROWN", "ibp_intersection"),  # same relaxation and intersections on both sides
    ("crown", "CROWN", "default"),  # auto_LiRPA's default (sparse, IBP-stable neurons): informative
    ("crown_pure", "CROWN", "dense_no_intersection"),  # pure CROWN on both sides
    ("crown_ibp", "CROWN-IBP", "ibp_intersection"),
    ("fastlin", "CROWN", "same_slope_ibp_intersection"),
]
# Variants timed properly; the others (pure CROWN, Fast-Lin, dense rows) are timed by one call.
TIMED = ("ibp", "crown", "crown_ibp")
AL_OPTS = {
    "default": {},
    "ibp_intersection": {"compare_crown_with_ibp": True},
    # dense conv matrices ('matrix' mode): pure CROWN on every neuron, the way ours computes it
    "dense_no_intersection": {"sparse_intermediate_bounds": False, "conv_mode": "matrix"},
    "same_slope_ibp_intersection": {"compare_crown_with_ibp": True,
                                    "activation_bound_option": "same-slope"},
}


def bench_net(name, args, al, seed):
    import torch
    pool = name == "resnet"
    shape = (14, 14, 3) if pool else (28, 28, 1)
    C = shape[2]
    mean, std = (MNIST_MEAN,) * C, (MNIST_STD,) * C
    if name == "resnet":
        model = ResNet((1, 1), "basic", w=1, num_classes=10, mean=mean, std=std)
    else:
        model = create_model(name, 10, mean=mean, std=std)
    xtr, ytr = mnist("train", 5000, pool)
    t = time.perf_counter()
    variables = train(model, xtr, ytr, args.steps, seed=seed)
    train_s = time.perf_counter() - t
    x_np, y_np = mnist("test", args.batch, pool)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    fn = lambda xb: model.apply(variables, xb)
    net = torch_port(name, variables, shape)
    m_t = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    s_t = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    normalise = lambda a: (a - m_t) / s_t  # same op order as Flax's Normalize
    xt = torch.tensor(x_np).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        logits_t = net(normalise(xt)).numpy()
    logits_j = np.asarray(jax.jit(fn)(x))
    fwd_diff = float(np.max(np.abs(logits_t - logits_j)))
    if fwd_diff > 1e-5 * max(1.0, float(np.max(np.abs(logits_j)))):
        raise SystemExit(f"{name}: torch port disagrees with Flax by {fwd_diff}")
    res = {"input_shape": list(shape), "batch": args.batch, "train_steps": args.steps,
           "train_seconds": train_s, "forward_max_abs_diff": fwd_diff,
           "clean_accuracy": float(np.mean(logits_j.argmax(1) == y_np)), "eps": {}}

    bounded, build_s = {}, {}
    for label, opts in AL_OPTS.items():
        t = time.perf_counter()
        bounded[label] = al.BoundedModule(net, normalise(xt), bound_opts=dict(opts),
                                          device="cpu")
        build_s[label] = time.perf_counter() - t
    res["auto_lirpa_build_seconds"] = build_s

    for eps in args.eps:
        threat = ThreatModel("linf", eps, box=(0.0, 1.0))
        # the l_inf ball ∩ [0, 1] is a box; its image under the (per-channel, positive-scale)
        # normalisation is the box between the normalised corners: the same set
        ptb = al.PerturbationLpNorm(norm=np.inf, eps=eps, x_L=normalise((xt - eps).clamp(0, 1)),
                                    x_U=normalise((xt + eps).clamp(0, 1)))
        bx = al.BoundedTensor(normalise(xt), ptb)
        ours, ent = {}, {}
        for method in OURS:
            if method == "crown_dense" and name == "fc1":
                continue  # no conv layer: the same program as "crown"
            compiled, comp_s = compile_ours(method, fn, x, threat)
            out, secs = timed_calls(lambda: compiled(x), args.iters if method in TIMED else 0,
                                    jax.block_until_ready, first_is_warm=True)
            ours[method] = {"bounds": out, "seconds": secs, "compile_seconds": comp_s}
        for method, al_method, label in PAIRS:
            m = bounded[label]
            with torch.no_grad():
                call = lambda: m.compute_bounds(x=(bx,), method=al_method)
                (lo_t, hi_t), secs = timed_calls(call, args.al_iters if method in TIMED else 0)
            ref = (lo_t.numpy(), hi_t.numpy())
            o = ours[method]
            key_name = f"{method}__vs__{al_method}[{label}]"
            ent[key_name] = {
                "agreement": agreement(o["bounds"], ref),
                "ours_seconds": o["seconds"], "ours_compile_seconds": o["compile_seconds"],
                "auto_lirpa_seconds": secs, "speed_ratio": secs / o["seconds"],
                "timing": "median of warm calls" if method in TIMED else
                          "one call each (diagnostic variant; auto_LiRPA's is its first call)",
                "certified_ours": certified(*o["bounds"], y_np),
                "certified_auto_lirpa": certified(*ref, y_np)}
            print(name, eps, key_name, {k: (v if not isinstance(v, dict) else
                                            {kk: round(vv, 8) for kk, vv in v.items()})
                                        for k, v in ent[key_name].items()}, flush=True)
        if "crown_dense" in ours:
            d = ours["crown_dense"]["bounds"]
            ent["patch_speedup"] = {
                "crown_dense_seconds": ours["crown_dense"]["seconds"],
                "crown_seconds": ours["crown"]["seconds"],
                "ratio": ours["crown_dense"]["seconds"] / ours["crown"]["seconds"],
                "max_abs_diff": float(max(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                                          for a, b in zip(d, ours["crown"]["bounds"])))}
            print(name, eps, "patch_speedup", ent["patch_speedup"], flush=True)
        res["eps"][str(eps)] = ent
    return res, (model, variables, x, y)


def milp_section(fc1, points, time_limit, eps):
    """Complete verification (``jaxrobust.certify.milp``, HiGHS) of the first points on fc1."""
    model, variables, x, y = fc1
    fn = lambda xb: model.apply(variables, xb)
    threat = ThreatModel("linf", eps, box=(0.0, 1.0))
    n = min(points, x.shape[0])
    t = time.perf_counter()
    r = milp_verify(fn, x[:n], y[:n], threat, method="crown", time_limit=time_limit)
    wall = time.perf_counter() - t
    status = [str(v) for v in np.asarray(r.status).ravel()]
    seconds = [float(v) for v in np.asarray(r.seconds).ravel()]
    out = {"eps": eps, "time_limit": time_limit, "n": n, "wall_seconds_total": wall,
           "mean_seconds_per_point": float(np.mean(seconds)),
           "max_seconds_per_point": float(np.max(seconds)), "status": status, "seconds": seconds,
           "counts": {k: status.count(k) for k in sorted(set(status))}}
    for field in ("n_binary", "n_solves"):
        if hasattr(r, field):
            out[field] = [int(v) for v in np.asarray(getattr(r, field)).ravel()]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eps", type=lambda s: [float(v) for v in s.split(",")], default=[0.01, 0.03])
    ap.add_argument("--steps", type=int, default=300, help="Adam training steps per net")
    ap.add_argument("--nets", type=lambda s: s.split(","), default=list(NETS))
    ap.add_argument("--iters", type=int, default=5, help="timed calls of ours")
    ap.add_argument("--al_iters", type=int, default=3, help="timed calls of auto_LiRPA")
    ap.add_argument("--milp_points", type=int, default=10)
    ap.add_argument("--milp_time_limit", type=float, default=10.0)
    ap.add_argument("--milp_eps", type=float, default=0.02)
    ap.add_argument("--quick", action="store_true", help="batch 8, one eps, 50 steps, 1 timed call")
    ap.add_argument("--out", default="bounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.eps, args.steps, args.iters, args.al_iters = 8, [0.01], 50, 1, 1
        args.milp_points = min(args.milp_points, 2)
    import torch
    torch.set_num_threads(2)
    torch.manual_seed(0)
    al = import_auto_lirpa()
    results, fc1 = {}, None
    for name in args.nets:  # a net's seed does not depend on which others run: same weights
        results[name], handles = bench_net(name, args, al, seed=NETS.index(name))
        if name == "fc1":
            fc1 = handles
    summary = {f"{net}@eps={eps}/{pair}": {
        "max_abs_diff": e["agreement"]["max_abs_diff"], "relative": e["agreement"]["relative"],
        "ours_mean_width_minus_auto_lirpa": (e["agreement"]["mean_width_ours"]
                                             - e["agreement"]["mean_width_auto_lirpa"]),
        "speed_ratio": e["speed_ratio"], "ours_s": e["ours_seconds"],
        "auto_lirpa_s": e["auto_lirpa_seconds"]}
        for net, r in results.items() for eps, ent in r["eps"].items() for pair, e in ent.items()
        if pair != "patch_speedup"}
    payload = {"benchmark": "bound propagation vs auto_LiRPA (same weights, same l_inf-ball-and-box "
                            "set), MNIST(-5k) test images",
               "auto_lirpa": {"version": al.__version__, "path": AUTO_LIRPA},
               "args": {k: v for k, v in vars(args).items()}, "summary": summary,
               "results": results}
    payload["milp_fc1"] = (milp_section(fc1, args.milp_points, args.milp_time_limit, args.milp_eps) if fc1
                           else {"skipped": "fc1 not run"})
    write_results(args.out, payload)


if __name__ == "__main__":
    main()
