"""Score masks with a straight-through gradient (edge-popup, thesis §5.1.1, eqs. 5.1–5.2, Alg. 5.1).

A prunable kernel ``W`` (any shape, e.g. ``(kh, kw, c_in, c_out)`` or ``(d_in, d_out)``) has a score
tensor ``s`` of the same shape. The forward pass uses ``W ⊙ mask(|s|, k)`` where ``mask`` keeps the ``k``
entries of largest ``|s|`` (k static: the mask has a static shape and exactly k ones, ties broken
towards the lower flat index); the backward pass treats ``mask`` as the identity (straight-through
estimator), so

    ∂L/∂s = (∂L/∂W_eff ⊙ W) ⊙ sign(s),    W_eff = W ⊙ mask(|s|, k)

(the ``sign(s)`` is the derivative of ``|s|``, as in the edge-popup and released codes).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _topk_indicator(values: jax.Array, k: int) -> jax.Array:
    n = values.size
    if k >= n:
        return jnp.ones(values.shape, values.dtype)
    if k <= 0:
        return jnp.zeros(values.shape, values.dtype)
    _, idx = jax.lax.top_k(values.reshape(-1), k)
    return jnp.zeros((n,), values.dtype).at[idx].set(1.0).reshape(values.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def topk_mask(values: jax.Array, k: int) -> jax.Array:
    """{0, 1} mask of the ``k`` largest entries of ``values`` (same shape and dtype), with a
    straight-through (identity) gradient. ``k`` is a static Python int."""
    return _topk_indicator(values, k)


def _topk_fwd(values, k):
    return _topk_indicator(values, k), None


def _topk_bwd(k, _, g):
    return (g,)


topk_mask.defvjp(_topk_fwd, _topk_bwd)


def masked_kernel(weight: jax.Array, scores: jax.Array, k: int) -> jax.Array:
    """``W ⊙ mask(|s|, k)`` (eq. 5.2) with the straight-through gradient to ``s``."""
    if weight.shape != scores.shape:
        raise ValueError(f"scores of shape {scores.shape} do not match the kernel's {weight.shape}.")
    # The barrier keeps XLA from constant-folding the sort when the variables are baked into a
    # closure as constants (load_trained's logits_fn): that took minutes for a 157k-entry kernel.
    scores = jax.lax.optimization_barrier(scores)
    return weight * topk_mask(jnp.abs(scores), int(k)).astype(weight.dtype)


def hard_mask(scores: jax.Array, k: int) -> jax.Array:
    """The boolean mask of :func:`masked_kernel` (no gradient)."""
    return _topk_indicator(jnp.abs(scores), int(k)) > 0


__all__ = ["topk_mask", "masked_kernel", "hard_mask"]
