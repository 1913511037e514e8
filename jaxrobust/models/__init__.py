"""Model registry, initialisation and the closures attacks/bounds consume.

``create_model(name, num_classes, **kwargs)`` returns a Flax module; ``make_logits_fn`` turns
(model, variables) into ``x -> logits`` with an explicit BatchNorm mode:

- ``bn_mode='eval'`` (default; what attacks, bounds and certification should use): running averages,
  the model is a fixed deterministic function of x.
- ``bn_mode='train'``: batch statistics of the (adversarial) batch, as the original Madry et al. code
  does while generating attacks during training; the running averages are NOT updated (the mutated
  collection is discarded), so an attack never leaks into the stored statistics.

Mixed precision (``config.model.dtype``, :func:`compute_dtype_kwargs`): with ``'bfloat16'`` every zoo
model computes its convolutions, dense layers and activations in bf16 on inputs cast from float32 and
returns float32 logits, while its parameters stay float32 (so do the optimizer state, the loss and the
softmax, computed on the float32 logits). BatchNorm statistics are reduced in float32 (flax's
``force_float32_reductions``) and the running averages stored in float32. Attacks on such a model run
its forward/backward passes in bf16 but their perturbation lives in the float32 input (the gradient
with respect to x comes back through the input cast as float32), so small steps accumulate exactly.
Bound propagation and certification always use :func:`as_float32` (the same parameters, float32
compute): a certificate is a statement about exact arithmetic, which bf16 rounding would not respect.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.models.zoo import (CNN7, FCNet, LeNet, PreActResNet18, ResNet, SmallCNN, VGG,
                                  WideResNet)

_REGISTRY: Dict[str, Callable[..., Any]] = {
    "fc": lambda num_classes, **kw: FCNet(num_classes=num_classes, **kw),
    "fc1": lambda num_classes, **kw: FCNet(widths=(1024,), num_classes=num_classes, **kw),
    "fc3x1024": lambda num_classes, **kw: FCNet(widths=(1024,) * 3, num_classes=num_classes, **kw),
    "cnn_small": lambda num_classes, **kw: SmallCNN(num_classes=num_classes, **kw),
    "cnn7": lambda num_classes, **kw: CNN7(num_classes=num_classes, **kw),
    "lenet": lambda num_classes, **kw: LeNet(num_classes=num_classes, **kw),
    "vgg": lambda num_classes, **kw: VGG(num_classes=num_classes, **kw),
    "resnet18": lambda num_classes, **kw: ResNet((2, 2, 2, 2), "basic", num_classes=num_classes, **kw),
    "preact_resnet18": lambda num_classes, **kw: PreActResNet18(num_classes=num_classes, **kw),
    "wide_resnet": lambda num_classes, **kw: WideResNet(num_classes=num_classes, **kw),
    "wrn28_10": lambda num_classes, **kw: WideResNet(28, 10, num_classes=num_classes, **kw),
    "wrn34_10": lambda num_classes, **kw: WideResNet(34, 10, num_classes=num_classes, **kw),
    # §5.1 pruning backbones: no biases anywhere, non-affine BN, optional last 1-D BN (last_bn=True).
    "cifar_resnet18": lambda num_classes, **kw: ResNet((2, 2, 2, 2), "basic", num_classes=num_classes,
                                                       affine_bn=False, fc_bias=False, **kw),
    "cifar_resnet34": lambda num_classes, **kw: ResNet((3, 4, 6, 3), "basic", num_classes=num_classes,
                                                       affine_bn=False, fc_bias=False, **kw),
    "cifar_resnet50": lambda num_classes, **kw: ResNet((3, 4, 6, 3), "bottleneck",
                                                       num_classes=num_classes, affine_bn=False,
                                                       fc_bias=False, **kw),
    # §5.1 robust sub-networks: any model above with score-masked kernels (jaxrobust/pruning).
    "subnet": lambda num_classes, **kw: _create_subnet(num_classes, **kw),
}


def _create_subnet(num_classes, **kw):
    from jaxrobust.pruning.subnet import create_subnet  # imports this package: import on use
    return create_subnet(num_classes, **kw)


def list_models():
    return sorted(_REGISTRY)


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype_kwargs(kwargs: Dict[str, Any], dtype: str) -> Dict[str, Any]:
    """``kwargs`` of :func:`create_model` for the compute dtype ``dtype`` ('float32' | 'bfloat16').

    float32 leaves ``kwargs`` as they are (the models' default: no ``dtype`` keyword, so models without
    one keep working); bfloat16 adds ``dtype=bfloat16``. A ``dtype`` already in ``kwargs`` (the older
    ``model.kwargs.dtype`` spelling) must agree. Unknown names raise a ValueError listing the valid ones.
    """
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype must be one of {list(COMPUTE_DTYPES)}, got {dtype!r}.")
    kwargs = dict(kwargs)
    if "dtype" in kwargs:
        given = jnp.dtype(kwargs["dtype"]).name
        if given not in COMPUTE_DTYPES:
            raise ValueError(f"model.kwargs.dtype must be one of {list(COMPUTE_DTYPES)}, got {given!r}.")
        if dtype != "float32" and given != dtype:
            raise ValueError(f"model.dtype={dtype!r} contradicts model.kwargs.dtype={given!r}: set "
                             f"model.dtype only.")
        return kwargs
    if dtype != "float32":
        kwargs["dtype"] = dtype
    return kwargs


def as_float32(model):
    """The same module computing in float32 (bounds, certification): a bf16 model cloned with
    ``dtype=float32``; float32 models and models without a ``dtype`` field are returned unchanged.
    The parameters (float32 in every case) fit both."""
    dtype = getattr(model, "dtype", None)
    if dtype is not None and jnp.dtype(dtype) != jnp.float32:
        return model.clone(dtype=jnp.float32)
    return model


def create_model(name: str, num_classes: int = 10, **kwargs):
    """Builds a registered model. Unknown names or keyword arguments raise a ValueError."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}. Available models: {', '.join(list_models())}.")
    if "dtype" in kwargs and isinstance(kwargs["dtype"], str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    for k in ("mean", "std", "widths"):
        if k in kwargs and kwargs[k] is not None and not isinstance(kwargs[k], tuple):
            kwargs[k] = tuple(kwargs[k])
    try:
        return _REGISTRY[name](num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"Bad arguments for model {name!r}: {e}") from None


def init_variables(model, key, input_shape, batch_size: int = 1):
    """Initialises ``model`` on a zero batch of ``(batch_size, *input_shape)``."""
    x = jnp.zeros((batch_size,) + tuple(input_shape), jnp.float32)
    return jax.jit(functools.partial(model.init, train=False))(key, x)


def count_params(tree, kernels_only: bool = False) -> int:
    """Number of scalars in a pytree; ``kernels_only`` counts conv/dense kernels ("weights")."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    total = 0
    for path, leaf in leaves:
        if kernels_only and getattr(path[-1], "key", None) != "kernel":
            continue
        total += int(np.prod(leaf.shape))
    return total


def make_logits_fn(model, variables, bn_mode: str = "eval", *, stop_gradient: bool = False) -> Callable:
    """``x -> logits`` closure over ``variables`` with the BatchNorm mode described above.

    The one model closure of the library: attacks and bounds take it as their ``logits_fn``.
    ``stop_gradient=False`` (bound-based objectives: CROWN-IBP, PER, ...) lets gradients flow from the
    logits to ``variables['params']``; ``stop_gradient=True`` (attacks inside a training step) cuts
    them, since the inner maximisation only needs input gradients.
    """
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"Unknown bn_mode {bn_mode!r}; expected 'eval' or 'train'.")
    if stop_gradient:
        variables = jax.lax.stop_gradient(variables)
    if bn_mode == "eval":
        return lambda x: model.apply(variables, x, train=False)
    collections = [k for k in variables if k != "params"]
    if not collections:
        return lambda x: model.apply(variables, x, train=True)

    def fn(x):
        logits, _ = model.apply(variables, x, train=True, mutable=collections)
        return logits
    return fn


def forward_train(model, params, model_state, x):
    """Train-mode forward pass ``(logits, new_model_state)``: BatchNorm uses and updates the batch
    statistics (``model_state`` holds every non-param collection)."""
    variables = {"params": params, **model_state}
    if model_state:
        logits, new_state = model.apply(variables, x, train=True, mutable=list(model_state))
        return logits, dict(new_state)
    return model.apply(variables, x, train=True), model_state


__all__ = ["create_model", "list_models", "COMPUTE_DTYPES", "compute_dtype_kwargs", "as_float32",
           "init_variables", "count_params", "make_logits_fn",
           "forward_train", "CNN7", "FCNet", "SmallCNN", "LeNet", "VGG", "ResNet", "PreActResNet18",
           "WideResNet"]
