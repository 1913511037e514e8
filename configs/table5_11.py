"""Thesis Table 5.11 (§5.2.4): fast adversarial training methods, ``<dataset>_<net>_<method>[,smoke]``.

    python -m experiments.train --config=configs/table5_11.py:cifar10_rn18_atas --workdir=runs/atas
    python -m experiments.train --config=configs/table5_11.py:mnist5k_cnn_fgsm_rs,smoke --workdir=/tmp/s

dataset ∈ {cifar10, cifar100, imagenet, fashion_mnist, mnist5k}; net ∈ {rn18, wrn28, rn50, cnn};
method ∈ {pgd10, free, yopo, fgsm_rs, fgsm_ga, atta, atas, nfgsm} (objectives of
jaxrobust/train/fast_at.py; ``pgd10`` is the objective ``at`` with PGD-10, step ε/4).

The thesis's settings (§5.2.4): CIFAR-10/100 l_inf ε = 8/255, 30 epochs, ImageNet ε = 2/255, 90 epochs;
SGD momentum 0.9, initial lr 0.1, weight decay 5e-4 (ImageNet 1e-4), crop+flip; the cyclic (one-cycle)
learning rate of the fast-AT papers (the thesis reports the better of cyclic and piece-wise). FGSM-RS
α = 1.25ε; FGSM-GA λ = 0.2 / 0.5 / 0.005 (CIFAR-10 / CIFAR-100 / ImageNet); ATTA-1 α = 4/255 (ε/2);
ATAS: β = 0.5, c = 0.01 (ImageNet 0.1) with the released code's clamped step rule
(CIFAR/ImageNet: 5 warm-up epochs of a constant step ε, the cache re-drawn every 10th epoch but
the last;
``objective.fast.atas_rule='released'``: α_i = clip(2ε·c/(c + √v_i), ε/2, 1.75ε), at ImageNet's
ε = 2/255 the released script's clip(16/255·c/(c + √v_i), 4/255, 8/255); switch to eq. 5.16 with
``--config.objective.fast.atas_rule=thesis``); FreeAT m = 8 (ImageNet 4) for 10 (45) epochs;
YOPO-5-3 for 12 (36) epochs. ImageNet caches (ATTA/ATAS/Free) are stored at 32x32 in bfloat16.
fashion_mnist (ε = 0.1) and mnist5k (ε = 0.3: where single-step methods overfit catastrophically)
use Adam 1e-3 (cyclic), no augmentation, 20 epochs. The catastrophic-overfitting monitor
(``train.monitor``) is on. Evaluation (PGD-10, PGD-50, AutoAttack): ``experiments.evaluate`` with
configs/eval/ (``pgd20.py --config.pgd_steps=10 / 50``, ``autoattack_standard.py``).

``rn18`` is PreActResNet-18 on CIFAR (as the released fast-AT codes) and the 3x3-stem ResNet-18
(w = 16: 64-512 channels) elsewhere. ``rn50`` is the library's CIFAR-stem ResNet-50 (``cifar_resnet50``: 3x3 stem, non-affine BN); the
thesis's ImageNet ResNet-50 has the 7x7/stride-2 stem, which the model zoo does not provide yet.
``smoke``: a few steps of a tiny net on tfds mock data (CIFAR/ImageNet) or the bundled mnist5k.
"""
from configs.common import base_config, schedule_config

DATASETS = {  # name -> (data.name, eps, epochs, weight decay, augment, batch size)
    "cifar10": ("cifar10", 8 / 255, 30.0, 5e-4, "crop_flip", 128),
    "cifar100": ("cifar100", 8 / 255, 30.0, 5e-4, "crop_flip", 128),
    "imagenet": ("imagenet2012", 2 / 255, 90.0, 1e-4, "crop_flip", 128),
    "fashion_mnist": ("fashion_mnist_local", 0.1, 20.0, 0.0, "none", 100),
    "mnist5k": ("mnist5k", 0.3, 20.0, 0.0, "none", 100),
}
NETS = {  # name -> (model.name, kwargs, smoke kwargs)
    "rn18": ("resnet18", {"w": 16}, {"w": 1}),  # CIFAR: preact_resnet18 (see below)
    "wrn28": ("wrn28_10", {}, None),
    "rn50": ("cifar_resnet50", {"w": 16}, {"w": 1}),
    "cnn": ("cnn_small", {}, {}),
}
METHODS = {"pgd10": "at", "free": "free", "yopo": "yopo", "fgsm_rs": "fgsm_rs", "fgsm_ga": "fgsm_ga",
           "atta": "atta", "atas": "atas", "nfgsm": "nfgsm"}
FREE_REPLAYS = {"cifar10": 8, "cifar100": 8, "imagenet": 4, "fashion_mnist": 8, "mnist5k": 8}
FREE_PASSES = {"cifar10": 80, "cifar100": 80, "imagenet": 180, "fashion_mnist": 40, "mnist5k": 40}
YOPO_EPOCHS = {"cifar10": 12, "cifar100": 12, "imagenet": 36, "fashion_mnist": 8, "mnist5k": 8}
GA_LAMBDA = {"cifar10": 0.2, "cifar100": 0.5, "imagenet": 0.005, "fashion_mnist": 0.2, "mnist5k": 0.2}


def _parse(arg: str):
    name, _, variant = arg.partition(",")
    if variant not in ("", "smoke"):
        raise ValueError(f"Unknown config variant {variant!r}; expected '' or 'smoke'.")
    parts = name.split("_")
    if len(parts) < 3:
        raise ValueError(f"table5_11: expected <dataset>_<net>_<method>[,smoke], got {arg!r}.")
    # datasets and methods may contain '_' (fashion_mnist, fgsm_rs): match the net in the middle
    for i in range(1, len(parts) - 1):
        if parts[i] in NETS and "_".join(parts[:i]) in DATASETS:
            ds, net, method = "_".join(parts[:i]), parts[i], "_".join(parts[i + 1:])
            break
    else:
        raise ValueError(f"table5_11: expected <dataset>_<net>_<method>[,smoke] with dataset in "
                         f"{sorted(DATASETS)} and net in {sorted(NETS)}, got {arg!r}.")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {sorted(METHODS)}.")
    return ds, net, method, variant == "smoke"


def get_config(arg: str = "cifar10_rn18_atas"):
    ds, net, method, smoke = _parse(arg)
    data_name, eps, epochs, wd, augment, bs = DATASETS[ds]
    model_name, kwargs, smoke_kwargs = NETS[net]
    if net == "rn18" and ds in ("cifar10", "cifar100") and not smoke:
        model_name, kwargs = "preact_resnet18", {}  # the fast-AT codes' CIFAR ResNet-18
    mnist_like = ds in ("fashion_mnist", "mnist5k")
    c = base_config()
    c.data.name, c.data.batch_size, c.data.augment = data_name, bs, augment
    c.model.name = model_name
    for k, v in kwargs.items():
        c.model.kwargs[k] = v
    c.threat.norm, c.threat.eps = "linf", eps
    if mnist_like:
        c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "adam", 1e-3, 0.0
    else:
        c.optimizer.name, c.optimizer.lr = "sgd", 0.1
        c.optimizer.momentum, c.optimizer.weight_decay = 0.9, wd
    c.schedule = schedule_config("cyclic", peak_fraction=0.4)
    c.train.num_epochs = epochs
    c.train.log_every = 100
    c.train.eval_every_epochs = 5.0 if not mnist_like else 2.0
    c.eval.attack.steps = 10
    c.eval.num_examples = 1000
    c.train.monitor.enabled = True
    c.train.monitor.num_examples = 512

    obj = METHODS[method]
    c.objective.name = obj
    f = c.objective.fast
    if method == "pgd10":
        c.objective.attack.steps = 10
        c.objective.attack.step_size = eps / 4
    elif method == "fgsm_ga":
        f.ga_lambda = GA_LAMBDA[ds]
    elif method in ("atta", "atas", "free") and ds == "imagenet":
        f.cache_resolution, f.cache_dtype = 32, "bfloat16"
    if method == "atas":
        f.atas_rule, f.atas_beta = "released", 0.5
        f.atas_c = 0.1 if ds == "imagenet" else 0.01
        if ds == "imagenet":  # the released ImageNet script: 16/255 numerator, steps in [4, 8]/255
            f.atas_alpha, f.atas_min_step, f.atas_max_step = 8.0, 2.0, 4.0
        if not mnist_like:  # the released CIFAR/ImageNet scripts: 5 warm-up epochs of a constant
            # step ε, the cache re-drawn every 10th epoch but the last
            f.atas_warmup_epochs, f.atas_warmup_step = 5, 1.0
            f.cache_reset_at = tuple(range(10, int(epochs), 10))
    if method == "free":
        f.free_replays = FREE_REPLAYS[ds]
        # m optimizer updates per batch (the loop's replays): the same number of passes
        c.train.num_epochs = FREE_PASSES[ds] / f.free_replays
    if method == "yopo":
        f.yopo_m, f.yopo_n = 5, 3
        c.train.num_epochs = float(YOPO_EPOCHS[ds])

    if smoke:
        if smoke_kwargs is None:
            raise ValueError(f"no smoke variant for net {net!r} (use rn18 or cnn).")
        c.model.kwargs = type(c.model.kwargs)(smoke_kwargs)
        c.data.batch_size = 8 if not mnist_like else 32
        c.data.eval_batch_size = 16
        if ds == "fashion_mnist":
            c.data.name = "mnist5k"  # same shapes, bundled
        c.train.num_steps = 4
        c.train.log_every = 2
        c.train.eval_every_epochs = 0.0
        c.train.tensorboard = False
        c.train.monitor.enabled = False
        c.objective.attack.steps = min(c.objective.attack.steps, 2)
        f.free_replays = min(f.free_replays, 2)
        f.yopo_m, f.yopo_n = 2, 2
        c.eval.attack.steps = 2
        c.eval.num_examples = 16
    return c
