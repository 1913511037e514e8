"""Score-masked sub-networks of any zoo model (thesis §5.1: edge-popup, adaptive pruning, binary
initialisation and the last batch normalisation).

:class:`SubNet` wraps an unchanged zoo model (``cifar_resnet18/34/50``, ``wrn*``, ``vgg``,
``cnn_small``, ``fc``...): its variables are

- ``params['weights']``: the zoo model's own parameter tree (the random, frozen weights θ of eq. 5.1;
  ``optimizer.param_groups.frozen`` with pattern ``^weights/`` never updates them);
- ``params['scores']``: one score tensor per prunable kernel (every conv/dense ``kernel``), in the
  same nested layout (``scores/Conv_0/kernel``);
- ``batch_stats['base_stats']`` (the zoo model's BatchNorm statistics, if any) and
  ``batch_stats['last_bn']`` (the LBN over the logits, §5.1.3).

The forward pass substitutes every prunable kernel by ``W ⊙ mask(|s|, k_i)`` (eq. 5.2,
:func:`jaxrobust.pruning.masks.masked_kernel`) and runs the zoo model's own ``apply`` on the result,
then the non-affine 1-D BatchNorm over the logits when ``last_bn``. The keep counts ``k_i`` are static:
eq. 5.11 (:func:`jaxrobust.pruning.allocation.allocate_keep_counts`) over the kernel sizes, in the
order the layers are created.

Initialisations (``weight_init``): ``'binary'`` (θ ∈ {-1, +1}: the sign of the zoo's random init, §5.1.3),
``'signed_kaiming_constant'`` (±√(2 / (fan_in·(1 - r))), Ramanujan et al. 2020, with the global keep
rate as the released code), ``'base'`` (the zoo's own random init) or ``'pretrained'`` (the final
weights of another run, ``weights_from``: HYDRA). Biases are set to 0 for the random inits (§5.1.4:
"the bias terms of all linear layers are initialized 0, and are thus disabled"). Scores
(``score_init``): ``'uniform'`` U[-a, a] (Table 5.3's a = ``score_scale``), ``'fan_uniform'``
U[-a/√fan_in, a/√fan_in] (edge-popup's Kaiming-uniform scores for a = 1), ``'magnitude'`` (HYDRA:
a·√(6/fan_in)·W / max|W|) or ``'pretrained'`` (another run's scores, ``scores_from``).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.pruning.allocation import ROUNDINGS, allocate_keep_counts
from jaxrobust.pruning.masks import hard_mask, masked_kernel

INITS = ("binary", "signed_kaiming_constant", "base", "pretrained")
SCORE_INITS = ("uniform", "fan_uniform", "magnitude", "pretrained")
LBN_MOMENTUM = 0.9  # as the zoo's BatchNorm (PyTorch momentum 0.1)
LBN_EPSILON = 1e-5

Path = Tuple[str, ...]


# ----------------------------------------------------------------------------- parameter trees
def _natural_key(path: Path):
    return [[int(t) if t.isdigit() else t for t in re.split(r"(\d+)", part)] for part in path]


def prunable_layers(params) -> List[Tuple[Path, Tuple[int, ...]]]:
    """``[(path, shape)]`` of every conv/dense kernel (a leaf named ``kernel`` with ndim >= 2), in the
    natural order of their paths (``Conv_2`` before ``Conv_10``; pytrees do not keep creation order):
    the layer order of eq. 5.11, which only breaks ties between equal-sized layers."""
    out = []

    def walk(tree, path):
        for k, v in tree.items():
            if isinstance(v, dict) or hasattr(v, "items"):
                walk(v, path + (str(k),))
            elif str(k) == "kernel" and len(getattr(v, "shape", ())) >= 2:
                out.append((path + (str(k),), tuple(int(d) for d in v.shape)))
    walk(params, ())
    return sorted(out, key=lambda item: _natural_key(item[0]))


def get_path(tree, path: Path):
    for k in path:
        tree = tree[k]
    return tree


def _set_path(tree: Dict, path: Path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _map_leaves(tree, fn, path: Path = ()):
    """``fn(path, leaf)`` over a nested dict, keeping its key order."""
    return {k: (_map_leaves(v, fn, path + (str(k),)) if hasattr(v, "items") else fn(path + (str(k),), v))
            for k, v in tree.items()}


def fan_in(shape: Sequence[int]) -> int:
    """Inputs per output unit of a kernel ``(..., c_in, c_out)``: kh·kw·c_in (conv) or d_in (dense)."""
    return int(np.prod(shape[:-1]))


def path_name(path: Path) -> str:
    return "/".join(path)


# ----------------------------------------------------------------------------- initialisation
def init_weights(params, init: str, keep_rate: float):
    """θ of eq. 5.1 from the zoo's random ``params`` (see the module docstring)."""
    if init not in INITS or init == "pretrained":
        raise ValueError(f"init_weights: unknown init {init!r}; expected one of {INITS[:-1]}.")
    prunable = {p for p, _ in prunable_layers(params)}

    def one(path, w):
        if path in prunable:
            sign = jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype)
            if init == "binary":
                return sign
            if init == "signed_kaiming_constant":
                return sign * math.sqrt(2.0 / (fan_in(w.shape) * keep_rate))
            return w
        if path[-1] == "bias" and init != "base":
            return jnp.zeros_like(w)
        return w
    return _map_leaves(params, one)


def init_scores(key, weights, layers, score_init: str, scale: float):
    """One score tensor per prunable kernel (nested like ``weights``, only the kernels)."""
    scores: Dict[str, Any] = {}
    for i, (path, shape) in enumerate(layers):
        k = jax.random.fold_in(key, i)
        if score_init == "uniform":
            s = jax.random.uniform(k, shape, jnp.float32, -scale, scale)
        elif score_init == "fan_uniform":
            b = scale / math.sqrt(fan_in(shape))
            s = jax.random.uniform(k, shape, jnp.float32, -b, b)
        elif score_init == "magnitude":
            w = get_path(weights, path).astype(jnp.float32)
            s = scale * math.sqrt(6.0 / fan_in(shape)) * w / jnp.maximum(jnp.max(jnp.abs(w)), 1e-12)
        else:
            raise ValueError(f"init_scores: unknown score_init {score_init!r}; expected one of "
                             f"{SCORE_INITS[:-1]}.")
        _set_path(scores, path, s)
    return scores


# ----------------------------------------------------------------------------- pretrained parts
_PRETRAINED: Dict[Tuple[str, str], Any] = {}
_SHAPES: Dict[Tuple[str, Tuple[int, ...]], Any] = {}  # (base_spec, input shape) -> variable shapes


def load_run_params(workdir: str, part: str = "weights"):
    """The final parameters of the run in ``workdir`` as numpy arrays: ``part='weights'`` gives a
    dense run's parameters (or a SubNet run's ``weights``), ``'scores'`` a SubNet run's scores.
    Cached per (workdir, part); loaded when the model is created (outside any trace)."""
    key = (os.path.abspath(workdir), part)
    if key not in _PRETRAINED:
        if not os.path.exists(os.path.join(workdir, "config.json")):
            raise FileNotFoundError(f"{workdir!r} is not a training run's workdir (no config.json): "
                                    f"train it first (HYDRA's pre-training / pruning stage).")
        from jaxrobust.train import load_trained  # the training package imports the model zoo
        params = jax.device_get(load_trained(workdir).variables["params"])
        is_subnet = set(params) == {"weights", "scores"}
        if part == "scores" and not is_subnet:
            raise ValueError(f"scores_from={workdir!r}: that run has no scores (not a 'subnet' model).")
        tree = params[part] if is_subnet else params
        _PRETRAINED[key] = jax.tree.map(np.asarray, tree)
    return _PRETRAINED[key]


def _check_like(loaded, reference, what: str):
    ref = {path_name(p): tuple(np.shape(v)) for p, v in _flat(reference)}
    got = {path_name(p): tuple(np.shape(v)) for p, v in _flat(loaded)}
    if ref != got:
        diff = sorted(set(ref.items()) ^ set(got.items()))[:6]
        raise ValueError(f"{what}: the loaded parameters do not match this model's (first "
                         f"differences: {diff}); was the run trained with the same base model?")


def _flat(tree, path: Path = ()):
    for k, v in tree.items():
        if hasattr(v, "items"):
            yield from _flat(v, path + (str(k),))
        else:
            yield path + (str(k),), v


# ----------------------------------------------------------------------------- the module
def last_bn_normalize(y, mean, var):
    """The non-affine last BatchNorm (§5.1.3): ``(y - mean) / √(var + 1e-5)``, (B, K)."""
    return (y - mean) * jax.lax.rsqrt(var + LBN_EPSILON)


def effective_params(weights, scores, layers, counts):
    """The zoo model's parameters with every prunable kernel replaced by ``W ⊙ mask(|s|, k)``."""
    eff = jax.tree.map(lambda v: v, weights)  # a fresh nested-dict copy
    for (path, _), k in zip(layers, counts):
        _set_path(eff, path, masked_kernel(get_path(weights, path), get_path(scores, path), k))
    return eff


class SubNet(nn.Module):
    """A zoo model with score-masked kernels (see the module docstring). Build it with
    :func:`create_subnet` (or ``create_model('subnet', base=..., ...)``), which validates the
    settings and loads ``weights_from`` / ``scores_from``.

    Input ``x``: the base model's ``(B, *input_shape)``; output: logits ``(B, K)`` float32.
    """
    base: nn.Module
    keep_rate: float
    gamma: float
    rounding: str
    min_keep: int
    weight_init: str
    score_init: str
    score_scale: float
    last_bn: bool
    weights_from: str = ""
    scores_from: str = ""
    # JSON {"name": zoo name, "num_classes": K, "kwargs": {...}} of ``base`` (create_subnet records it;
    # the exported artifact rebuilds the base model from it)
    base_spec: str = ""

    def base_shapes(self, input_shape):
        """Shapes of the zoo model's variables for one example of ``input_shape`` (cached per base
        model and input shape: every trace of the forward pass needs them)."""
        key = (self.base_spec, tuple(input_shape))
        if self.base_spec and key in _SHAPES:
            return _SHAPES[key]
        x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
        shapes = jax.eval_shape(lambda: self.base.init(jax.random.PRNGKey(0), x, train=False))
        if self.base_spec:
            _SHAPES[key] = shapes
        return shapes

    def layer_plan(self, input_shape):
        """``(layers, counts)``: ``[(path, shape)]`` of the prunable kernels and their keep counts."""
        layers = prunable_layers(self.base_shapes(input_shape)["params"])
        counts = allocate_keep_counts([int(np.prod(s)) for _, s in layers], self.keep_rate,
                                      self.gamma, rounding=self.rounding, min_keep=self.min_keep)
        return layers, counts

    @nn.compact
    def __call__(self, x, train: bool = False):
        input_shape = x.shape[1:]
        shapes = self.base_shapes(input_shape)
        layers, counts = self.layer_plan(input_shape)
        dummy = jnp.zeros((1,) + tuple(input_shape), jnp.float32)

        def make_weights(key):
            if self.weights_from:
                loaded = load_run_params(self.weights_from, "weights")
                _check_like(loaded, shapes["params"], f"weights_from={self.weights_from!r}")
                return jax.tree.map(jnp.asarray, loaded)
            params = self.base.init(key, dummy, train=False)["params"]
            return init_weights(params, self.weight_init, self.keep_rate)

        weights = self.param("weights", make_weights)

        def make_scores(key):
            if self.scores_from:
                loaded = load_run_params(self.scores_from, "scores")
                ref = {}
                for p, s in layers:
                    _set_path(ref, p, np.zeros(s, np.float32))
                _check_like(loaded, ref, f"scores_from={self.scores_from!r}")
                return jax.tree.map(jnp.asarray, loaded)
            return init_scores(key, weights, layers, self.score_init, self.score_scale)

        scores = self.param("scores", make_scores)
        variables = {"params": effective_params(weights, scores, layers, counts)}
        has_stats = "batch_stats" in shapes
        if has_stats:
            stats = self.variable("batch_stats", "base_stats", lambda: self.base.init(
                jax.random.PRNGKey(0), dummy, train=False)["batch_stats"])
            variables["batch_stats"] = stats.value
        if train and has_stats:
            y, updated = self.base.apply(variables, x, train=True, mutable=["batch_stats"])
            if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                stats.value = updated["batch_stats"]
        else:
            y = self.base.apply(variables, x, train=train)
        y = y.astype(jnp.float32)
        if self.last_bn:
            y = self._last_bn(y, train)
        return y

    def _last_bn(self, y, train: bool):
        k = y.shape[-1]
        st = self.variable("batch_stats", "last_bn", lambda: {"mean": jnp.zeros((k,), jnp.float32),
                                                               "var": jnp.ones((k,), jnp.float32)})
        if not train:
            return last_bn_normalize(y, st.value["mean"], st.value["var"])
        mean, var = jnp.mean(y, axis=0), jnp.var(y, axis=0)
        if self.is_mutable_collection("batch_stats") and not self.is_initializing():
            st.value = {"mean": LBN_MOMENTUM * st.value["mean"] + (1 - LBN_MOMENTUM) * mean,
                        "var": LBN_MOMENTUM * st.value["var"] + (1 - LBN_MOMENTUM) * var}
        return last_bn_normalize(y, mean, var)


# ----------------------------------------------------------------------------- building
def _as_plain(v):
    if hasattr(v, "to_dict"):
        v = v.to_dict()
    if isinstance(v, dict):
        return {k: _as_plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return tuple(v)
    return v


def validate_subnet_settings(kw: Dict[str, Any]) -> None:
    """One ValueError for a bad SubNet setting (names the field and the valid values)."""
    if kw["weight_init"] not in INITS:
        raise ValueError(f"subnet weight_init {kw['weight_init']!r} unknown; expected one of {INITS}.")
    if kw["score_init"] not in SCORE_INITS:
        raise ValueError(f"subnet score_init {kw['score_init']!r} unknown; expected one of {SCORE_INITS}.")
    if kw["rounding"] not in ROUNDINGS:
        raise ValueError(f"subnet rounding {kw['rounding']!r} unknown; expected one of {ROUNDINGS}.")
    if (kw["weight_init"] == "pretrained") != bool(kw["weights_from"]):
        raise ValueError("subnet: weight_init='pretrained' goes with weights_from=<a run's workdir> (and "
                         f"only with it); got weight_init={kw['weight_init']!r}, "
                         f"weights_from={kw['weights_from']!r}.")
    if (kw["score_init"] == "pretrained") != bool(kw["scores_from"]):
        raise ValueError("subnet: score_init='pretrained' goes with scores_from=<a subnet run's workdir>"
                         f" (and only with it); got score_init={kw['score_init']!r}, "
                         f"scores_from={kw['scores_from']!r}.")
    s = kw["score_scale"]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
        raise ValueError(f"subnet score_scale (a of Table 5.3) must be > 0, got {s!r}.")
    if int(kw["min_keep"]) < 0:
        raise ValueError(f"subnet min_keep must be >= 0, got {kw['min_keep']}.")
    # keep_rate / gamma: the allocation's own checks, on a dummy layer
    allocate_keep_counts([1000], kw["keep_rate"], kw["gamma"], rounding=kw["rounding"], min_keep=0)


def create_subnet(num_classes: int = 10, **kwargs) -> SubNet:
    """A :class:`SubNet` around ``create_model(base, num_classes, **base_kwargs, mean=, std=)``.

    Missing settings come from ``configs.common.subnet_kwargs()`` (the one place of the defaults);
    ``mean``/``std``/``dtype`` go to the base model. ``weights_from`` / ``scores_from`` runs are
    loaded here (outside any trace) and their shapes checked on the first ``init``."""
    from configs.common import subnet_kwargs
    from jaxrobust.models import create_model

    defaults = _as_plain(subnet_kwargs())
    unknown = sorted(set(kwargs) - set(defaults) - {"mean", "std", "dtype"})
    if unknown:
        raise ValueError(f"Unknown subnet settings {unknown}; valid: {sorted(defaults)} (+ mean, std, dtype).")
    kw = {**defaults, **{k: _as_plain(v) for k, v in kwargs.items()}}
    validate_subnet_settings(kw)
    base_kwargs = dict(kw.pop("base_kwargs") or {})
    for k in ("mean", "std", "dtype"):
        if kw.get(k) is not None:
            base_kwargs[k] = kw[k]
        kw.pop(k, None)
    base_name = kw.pop("base")
    if base_name == "subnet":
        raise ValueError("subnet base must be a zoo model, not 'subnet'.")
    base = create_model(base_name, num_classes, **base_kwargs)
    for part, src in (("weights", kw["weights_from"]), ("scores", kw["scores_from"])):
        if src:
            load_run_params(src, part)
    spec = json.dumps({"name": base_name, "num_classes": int(num_classes),
                       "kwargs": {k: (str(v) if k == "dtype" else v) for k, v in base_kwargs.items()}},
                      sort_keys=True, default=lambda v: list(v) if isinstance(v, tuple) else str(v))
    return SubNet(base=base, base_spec=spec, keep_rate=float(kw["keep_rate"]), gamma=float(kw["gamma"]),
                  rounding=kw["rounding"], min_keep=int(kw["min_keep"]), weight_init=kw["weight_init"],
                  score_init=kw["score_init"], score_scale=float(kw["score_scale"]),
                  last_bn=bool(kw["last_bn"]), weights_from=kw["weights_from"],
                  scores_from=kw["scores_from"])


# ----------------------------------------------------------------------------- inspection
def masks_of(model: SubNet, variables, input_shape) -> List[Tuple[str, np.ndarray]]:
    """``[(layer path, boolean mask)]`` of a trained SubNet (numpy)."""
    layers, counts = model.layer_plan(input_shape)
    scores = variables["params"]["scores"]
    return [(path_name(p), np.asarray(hard_mask(get_path(scores, p), k))) for (p, _), k in
            zip(layers, counts)]


def layer_table(model: SubNet, input_shape) -> List[Dict[str, Any]]:
    """Per prunable layer: path, shape, size n_i, keep count m_i and m_i / n_i."""
    layers, counts = model.layer_plan(input_shape)
    return [{"layer": path_name(p), "shape": list(s), "size": int(np.prod(s)), "kept": int(k),
             "kept_fraction": int(k) / int(np.prod(s))} for (p, s), k in zip(layers, counts)]


__all__ = ["SubNet", "create_subnet", "prunable_layers", "init_weights", "init_scores",
           "effective_params", "last_bn_normalize", "load_run_params", "masks_of", "layer_table",
           "fan_in", "INITS", "SCORE_INITS"]
