"""Chunked cross-entropy: the [B, T, V] logits never exist in float32 all at once.

At T = 128K and V = 128K a float32 logits tensor is 64 GiB per sequence. The loss
is computed over chunks of `chunk` positions inside a `lax.scan` whose body is
rematerialised, so forward and backward hold one chunk's logits at a time
(the same idea as Liger Kernel's fused linear cross-entropy, in plain JAX).

Under context parallelism the sequence is split into W contiguous shards over the
mesh's 'context' axis. The chunks are then taken *within* each shard: the scan's step
n covers positions [n·c, (n+1)·c) of every shard at once, so each device computes the
logits of its own tokens only, and no device gathers the hidden states of the whole
sequence (a scan over global chunks would run every chunk on every chip, W times the
output-head work, and all-gather [B, T, D]).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["chunked_cross_entropy", "context_shards", "cross_entropy_reference"]


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
  W = context_shards(T)
  L = T // W  # positions per context shard
  chunk = min(chunk, L)
  n = -(-L // chunk)
  pad = n * chunk - L

  def chunks(x_BT, trailing):
    """[B, T, ...] -> [n, B, W·chunk, ...]: step i holds chunk i of every context shard."""
    x_BWL = x_BT.reshape(B, W, L, *trailing)
    if pad:
      x_BWL = jnp.pad(x_BWL, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * len(trailing))
    x_BWNC = x_BWL.reshape(B, W, n, chunk, *trailing)
    return jnp.moveaxis(x_BWNC, 2, 0).reshape(n, B, W * chunk, *trailing)

  h_NBCD = chunks(h_BTD, (D,))
  targets_NBC = chunks(targets_BT, ())
  weights_NBC = chunks(weights_BT, ()).astype(jnp.float32)

  @jax.checkpoint
  def chunk_nll(h_BCD, targets_BC, weights_BC):
    return cross_entropy_reference(logits_fn(h_BCD), targets_BC, weights_BC)[0]

  def body(total, xs):
    return total + chunk_nll(*xs), None

  total, _ = jax.lax.scan(body, jnp.float32(0.0), (h_NBCD, targets_NBC, weights_NBC))
  return total, jnp.sum(weights_NBC)


def context_shards(seq_len: int) -> int:
  """The size of the 'context' axis of the mesh set with `jax.set_mesh`, if it splits T.

  1 without a mesh (or when the axis does not divide `seq_len`, so nothing is split).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  W = dict(mesh.shape).get("context", 1)
  return W if seq_len % W == 0 else 1
