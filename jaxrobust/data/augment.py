"""On-device augmentation with an exact inverse.

``random_crop_flip`` returns the crop offsets and flip flags it used, so a tensor living in augmented
coordinates (e.g. a per-instance cached perturbation, ATTA §4.3.5/§5.2) can be mapped back to the
original frame with ``invert_crop_flip`` and re-augmented next epoch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _crop_one(img, offset, h, w):
    return jax.lax.dynamic_slice(img, (offset[0], offset[1], 0), (h, w, img.shape[-1]))


@functools.partial(jax.jit, static_argnames=("pad",))
def apply_crop_flip(images, offsets, flips, pad: int = 4):
    """Zero-pads by ``pad``, crops at ``offsets`` (N,2) and flips horizontally where ``flips``."""
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = jax.vmap(_crop_one, in_axes=(0, 0, None, None))(padded, offsets, h, w)
    return jnp.where(flips[:, None, None, None], out[:, :, ::-1, :], out)


def random_crop_flip(key, images, pad: int = 4, flip: bool = True):
    """Standard CIFAR augmentation: pad-``pad`` random crop + random horizontal flip.

    Args: images (N,H,W,C). Returns (augmented (N,H,W,C), offsets (N,2) int32 in [0, 2·pad],
    flips (N,) bool).
    """
    k1, k2 = jax.random.split(key)
    offsets = jax.random.randint(k1, (images.shape[0], 2), 0, 2 * pad + 1, dtype=jnp.int32)
    flips = (jax.random.bernoulli(k2, 0.5, (images.shape[0],)) if flip
             else jnp.zeros((images.shape[0],), bool))
    return apply_crop_flip(images, offsets, flips, pad), offsets, flips


@functools.partial(jax.jit, static_argnames=("pad",))
def invert_crop_flip(aug, offsets, flips, pad: int = 4):
    """Maps a tensor from augmented coordinates back to the original frame.

    Pixels of the original image that the crop did not cover are zero. ``apply_crop_flip`` of the
    result reproduces ``aug`` on the crop's pixels that came from the image (not the padding).
    """
    n, h, w, c = aug.shape
    unflipped = jnp.where(flips[:, None, None, None], aug[:, :, ::-1, :], aug)
    canvas = jnp.zeros((n, h + 2 * pad, w + 2 * pad, c), aug.dtype)
    placed = jax.vmap(lambda cv, t, o: jax.lax.dynamic_update_slice(cv, t, (o[0], o[1], 0)))(
        canvas, unflipped, offsets)
    return placed[:, pad:pad + h, pad:pad + w, :]
