"""Chunked cross-entropy: the [B, T, V] logits never exist in float32 all at once.

At T = 128K and V = 128K a float32 logits tensor is 64 GiB per sequence. The loss
is computed over chunks of `chunk` positions inside a `lax.scan` whose body is
rematerialised, so forward and backward hold one chunk's logits at a time
(the same idea as Liger Kernel's fused linear cross-entropy, in plain JAX).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["chunked_cross_entropy", "cross_entropy_reference"]


def cross_entropy_reference(logits_BTV, targets_BT, weights_BT):
  """Weighted NLL sum and weight sum from full logits (the oracle)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = lse_BT - target_logit_BT
  return jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)


def chunked_cross_entropy(
  logits_fn: Callable[[jax.Array], jax.Array],
  h_BTD: jax.Array,
  targets_BT: jax.Array,
  weights_BT: jax.Array,
  *,
  chunk: int = 1024,
) -> tuple[jax.Array, jax.Array]:
  """Returns (sum of weighted NLL, sum of weights), computing logits `chunk` positions at a time.

  Args:
    logits_fn: hidden states [B, C, D] -> logits [B, C, V] (e.g. `model.logits`).
    h_BTD: final hidden states.
    targets_BT: int next-token ids.
    weights_BT: float loss weights (0 on padding and document ends).
    chunk: positions per chunk; T is padded up to a multiple with zero weight.
  """
  B, T, D = h_BTD.shape
  chunk = min(chunk, T)
  n = -(-T // chunk)
  pad = n * chunk - T
  if pad:
    h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    weights_BT = jnp.pad(weights_BT, ((0, 0), (0, pad)))
  h_NBCD = h_BTD.reshape(B, n, chunk, D).swapaxes(0, 1)
  targets_NBC = targets_BT.reshape(B, n, chunk).swapaxes(0, 1)
  weights_NBC = weights_BT.reshape(B, n, chunk).swapaxes(0, 1).astype(jnp.float32)

  @jax.checkpoint
  def chunk_nll(h_BCD, targets_BC, weights_BC):
    return cross_entropy_reference(logits_fn(h_BCD), targets_BC, weights_BC)[0]

  def body(total, xs):
    return total + chunk_nll(*xs), None

  total, _ = jax.lax.scan(body, jnp.float32(0.0), (h_NBCD, targets_NBC, weights_NBC))
  return total, jnp.sum(weights_NBC)
