"""Autoregressive decoding with a KV cache (greedy or temperature sampling).

Used by the passkey and needle evaluations. Greedy output equals the argmax of a
full forward pass token by token (tests/test_generate.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["generate"]


def generate(
  model: nnx.Module,
  prompt_BP: jax.Array,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  rng: jax.Array | None = None,
) -> jax.Array:
  """Continues every row of `prompt_BP` by `max_new_tokens` tokens.

  Args:
    model: a model with `init_cache(batch, max_len)` and `decode(tokens, caches, index)`.
    prompt_BP: int tokens, all rows the same length P (no padding).
    max_new_tokens: number of tokens to append.
    temperature: 0 for greedy decoding, else softmax sampling at this temperature.
    rng: PRNG key, required when temperature > 0.

  Returns:
    tokens_BN: int32 [B, P + max_new_tokens], the prompt followed by the new tokens.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
  if temperature > 0 and rng is None:
    raise ValueError("temperature > 0 samples tokens: pass rng=jax.random.key(SEED)")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  new_BN = _generate(graphdef, state, prompt_BP, rng, jnp.float32(temperature), max_new_tokens)
  return jnp.concatenate([prompt_BP, new_BN], axis=1)


def _pick(logits_BV, temperature, rng):
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  safe_t = jnp.where(temperature > 0, temperature, 1.0)
  sampled_B = jax.random.categorical(rng, logits_BV / safe_t, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled_B, greedy_B)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(graphdef, state, prompt_BP, rng, temperature, max_new_tokens):
  model = nnx.merge(graphdef, state)
  B, P = prompt_BP.shape
  caches = model.init_cache(B, P + max_new_tokens)
  logits_BPV, caches = model.decode(prompt_BP, caches, 0)
  rngs = jax.random.split(rng, max_new_tokens)
  first_B = _pick(logits_BPV[:, -1], temperature, rngs[0])
  out_BN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first_B)

  def step(i, carry):
    out_BN, caches = carry
    last_B1 = jax.lax.dynamic_slice_in_dim(out_BN, i - 1, 1, axis=1)
    logits_B1V, caches = model.decode(last_B1, caches, P + i - 1)
    next_B = _pick(logits_B1V[:, 0], temperature, rngs[i])
    return jax.lax.dynamic_update_slice_in_dim(out_BN, next_B[:, None], i, axis=1), caches

  out_BN, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out_BN, caches))
  return out_BN
