"""Flax model zoo used in the thesis.

All models take NHWC (or flat ``(B, D)``) inputs in the input box and normalise internally with
per-channel ``mean``/``std`` so that attacks and bounds operate in input space. BatchNorm uses the
'batch_stats' collection; ``train`` selects batch statistics (and updates them when the collection is
mutable) versus running averages.

Architectures:
- ``FCNet``: any widths, relu/sigmoid/tanh (§3.2.2, §3.3.4: FC1 = 784-1024-10).
- ``SmallCNN``: Wong & Kolter small CNN (conv16 4x4 s2 p1, conv32 4x4 s2 p1, fc100, fc10); the
  thesis's MNIST/CIFAR 'CNN' of §3.3.4 (registered as ``cnn_small``).
- ``CNN7``: the CNN7 with BatchNorm of Shi et al. 2021 / SABR / MTL-IBP (registered as ``cnn7``).
- ``LeNet``, ``VGG``, ``ResNet`` (Table 4.1, width factor w; ResNet18 w=16 is the standard width).
- ``PreActResNet18`` and ``WideResNet`` (28-10, 34-10), standard CIFAR adversarial-training nets.
- ``ResNet(..., affine_bn=False, fc_bias=False)`` (registered as ``cifar_resnet18/34/50``): the CIFAR
  ResNets of §5.1 (no biases, non-affine BatchNorm, optional final 1-D BatchNorm over the logits,
  ``last_bn=True``), the backbones of robust sub-network search.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

ACTIVATIONS = {"relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": jnp.tanh}


def get_activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


class Normalize(nn.Module):
    """(x - mean) / std per channel (last axis); the identity with the defaults."""
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)

    @nn.compact
    def __call__(self, x):
        if tuple(self.mean) == (0.0,) and tuple(self.std) == (1.0,):
            return x
        mean = jnp.asarray(self.mean, x.dtype)
        std = jnp.asarray(self.std, x.dtype)
        if x.ndim == 2 and mean.size > 1:
            raise ValueError("Per-channel mean/std need NHWC inputs, got flat inputs.")
        return (x - mean) / std


def _bn(train: bool, name=None, affine: bool = True, dtype=jnp.float32):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        use_scale=affine, use_bias=affine, name=name, dtype=dtype)


class FCNet(nn.Module):
    """Fully connected net: flatten, hidden Dense layers with ``activation``, Dense logits."""
    widths: Sequence[int] = (1024,)
    num_classes: int = 10
    activation: str = "relu"
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = get_activation(self.activation)
        x = Normalize(self.mean, self.std)(x)
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for w in self.widths:
            x = act(nn.Dense(w, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class SmallCNN(nn.Module):
    """Wong & Kolter (2018) small CNN: conv16 4x4/2 p1, conv32 4x4/2 p1, fc100, fc10."""
    num_classes: int = 10
    activation: str = "relu"
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = get_activation(self.activation)
        x = Normalize(self.mean, self.std)(x).astype(self.dtype)
        x = act(nn.Conv(16, (4, 4), strides=2, padding=((1, 1), (1, 1)), dtype=self.dtype)(x))
        x = act(nn.Conv(32, (4, 4), strides=2, padding=((1, 1), (1, 1)), dtype=self.dtype)(x))
        x = x.reshape((x.shape[0], -1))
        x = act(nn.Dense(100, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class CNN7(nn.Module):
    """CNN7 of Shi et al. (2021), used by SABR, MTL-IBP and CTBench: five 3x3 convs (pad 1) of
    ``width``, ``width``, 2·width (stride 2), 2·width, 2·width channels and a Dense(``linear``) layer,
    each followed by BatchNorm and ReLU, then Dense(num_classes). width 64 / linear 512 is the
    published net (~17M parameters on CIFAR-10)."""
    num_classes: int = 10
    width: int = 64
    linear: int = 512
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Normalize(self.mean, self.std)(x).astype(self.dtype)
        w = self.width
        for c, s in ((w, 1), (w, 1), (2 * w, 2), (2 * w, 1), (2 * w, 1)):
            x = nn.Conv(c, (3, 3), strides=s, padding=((1, 1), (1, 1)), dtype=self.dtype)(x)
            x = nn.relu(_bn(train, dtype=self.dtype)(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_bn(train, dtype=self.dtype)(nn.Dense(self.linear, dtype=self.dtype)(x)))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class LeNet(nn.Module):
    """Table 4.1 LeNet: Conv(2w), M, Conv(4w), M, FC(196w, 64w), FC(64w, 10) (5x5 convs, SAME)."""
    w: int = 16
    num_classes: int = 10
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Normalize(self.mean, self.std)(x).astype(self.dtype)
        for c in (2 * self.w, 4 * self.w):
            x = nn.relu(nn.Conv(c, (5, 5), padding="SAME", dtype=self.dtype)(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(64 * self.w, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class VGG(nn.Module):
    """Table 4.1 VGG (VGG16 layout, width factor w; w=16 gives 64..512 channels):
    Conv(4w)x2 M Conv(8w)x2 M Conv(16w)x3 M Conv(32w)x3 M Conv(32w)x3 M, A, FC(32w, 10)."""
    w: int = 8
    num_classes: int = 10
    batch_norm: bool = True
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Normalize(self.mean, self.std)(x).astype(self.dtype)
        for mult, reps in ((4, 2), (8, 2), (16, 3), (32, 3), (32, 3)):
            for _ in range(reps):
                x = nn.Conv(mult * self.w, (3, 3), padding="SAME", use_bias=not self.batch_norm,
                            dtype=self.dtype)(x)
                if self.batch_norm:
                    x = _bn(train, dtype=self.dtype)(x)
                x = nn.relu(x)
            if x.shape[1] >= 2:
                x = nn.max_pool(x, (2, 2), (2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class BasicBlock(nn.Module):
    channels: int
    stride: int = 1
    affine_bn: bool = True
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.Conv(self.channels, (3, 3), self.stride, padding=((1, 1), (1, 1)),
                    use_bias=self.use_bias, dtype=self.dtype)(x)
        y = nn.relu(_bn(train, affine=self.affine_bn, dtype=self.dtype)(y))
        y = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=self.use_bias,
                    dtype=self.dtype)(y)
        y = _bn(train, affine=self.affine_bn, dtype=self.dtype)(y)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1), self.stride, use_bias=self.use_bias, dtype=self.dtype)(x)
            x = _bn(train, affine=self.affine_bn, dtype=self.dtype)(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    channels: int
    stride: int = 1
    affine_bn: bool = True
    use_bias: bool = False
    dtype: Any = jnp.float32
    expansion: int = 4

    @nn.compact
    def __call__(self, x, train: bool):
        out = self.channels * self.expansion
        y = nn.Conv(self.channels, (1, 1), use_bias=self.use_bias, dtype=self.dtype)(x)
        y = nn.relu(_bn(train, affine=self.affine_bn, dtype=self.dtype)(y))
        y = nn.Conv(self.channels, (3, 3), self.stride, padding=((1, 1), (1, 1)),
                    use_bias=self.use_bias, dtype=self.dtype)(y)
        y = nn.relu(_bn(train, affine=self.affine_bn, dtype=self.dtype)(y))
        y = nn.Conv(out, (1, 1), use_bias=self.use_bias, dtype=self.dtype)(y)
        y = _bn(train, affine=self.affine_bn, dtype=self.dtype)(y)
        if self.stride != 1 or x.shape[-1] != out:
            x = nn.Conv(out, (1, 1), self.stride, use_bias=self.use_bias, dtype=self.dtype)(x)
            x = _bn(train, affine=self.affine_bn, dtype=self.dtype)(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, 3x3 stem). ``w`` is Table 4.1's width factor: stage widths
    (4w, 8w, 16w, 32w); w=16 is the standard 64-128-256-512 ResNet18.

    ``affine_bn=False, use_bias=False, last_bn=True`` gives the §5.1 pruning backbone. ``stem``:
    ``'cifar'`` (3x3 conv, stride 1) or ``'imagenet'`` (7x7 conv stride 2 + 3x3 max-pool stride 2, for
    224x224 inputs: the ImageNet-100 RN34 of Table 5.10).
    """
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    w: int = 16
    num_classes: int = 10
    affine_bn: bool = True
    last_bn: bool = False
    fc_bias: bool = True
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    dtype: Any = jnp.float32
    stem: str = "cifar"

    @nn.compact
    def __call__(self, x, train: bool = False):
        block = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
        if self.stem not in ("cifar", "imagenet"):
            raise ValueError(f"ResNet stem must be 'cifar' or 'imagenet', got {self.stem!r}.")
        x = Normalize(self.mean, self.std)(x).astype(self.dtype)
        if self.stem == "imagenet":
            x = nn.Conv(4 * self.w, (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False,
                        dtype=self.dtype)(x)
        else:
            x = nn.Conv(4 * self.w, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(_bn(train, affine=self.affine_bn, dtype=self.dtype)(x))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                x = block(4 * self.w * 2 ** i, stride, self.affine_bn, dtype=self.dtype)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, use_bias=self.fc_bias, dtype=self.dtype)(x)
        if self.last_bn:
            # §5.1.4: a 1-D BatchNorm over the logits (non-affine) rescales the output of a
            # randomly-initialised, pruned net.
            x = _bn(train, affine=False, dtype=self.dtype, name="last_bn")(x)
        return x.astype(jnp.float32)


class PreActBlock(nn.Module):
    """Pre-activation basic block (BN-ReLU-conv twice), shared by PreActResNet and WideResNet."""
    channels: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        out = nn.relu(_bn(train, dtype=self.dtype)(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.channels:
            shortcut = nn.Conv(self.channels, (1, 1), self.stride, use_bias=False, dtype=self.dtype)(out)
        y = nn.Conv(self.channels, (3, 3), self.stride, padding=((1, 1), (1, 1)), use_bias=False,
                    dtype=self.dtype)(out)
        y = nn.relu(_bn(train, dtype=self.dtype)(y))
        y = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype)(y)
        return y + shortcut


class PreActResNet18(nn.Module):
    num_classes: int = 10
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Normalize(self.mean, self.std)(x).astype(self.dtype)
        x = nn.Conv(64, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype)(x)
        for i, c in enumerate((64, 128, 256, 512)):
            for j in range(2):
                x = PreActBlock(c, 2 if (i > 0 and j == 0) else 1, dtype=self.dtype)(x, train)
        x = nn.relu(_bn(train, dtype=self.dtype)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis 2016): (depth - 4) / 6 blocks per stage."""
    depth: int = 28
    widen: int = 10
    num_classes: int = 10
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}.")
        n = (self.depth - 4) // 6
        x = Normalize(self.mean, self.std)(x).astype(self.dtype)
        x = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype)(x)
        for i, c in enumerate((16 * self.widen, 32 * self.widen, 64 * self.widen)):
            for j in range(n):
                x = PreActBlock(c, 2 if (i > 0 and j == 0) else 1, dtype=self.dtype)(x, train)
        x = nn.relu(_bn(train, dtype=self.dtype)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
