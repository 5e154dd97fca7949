"""Building blocks of the Llama family: RMSNorm, SwiGLU MLP, dense projections.

Parameters are float32; `dtype` is the compute dtype. Each block matches the
Hugging Face module named in its docstring in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.models.projections import project, swiglu

__all__ = [
  "Dense",
  "RMSNorm",
  "SwiGLU",
  "dense",
  "resolve_dtype",
  "token_embedding",
  "output_head",
  "vocab_logits",
]


def resolve_dtype(name: str) -> jnp.dtype:
  """`auto` → bfloat16 on TPU/GPU, float32 on CPU (decided when a model is built)."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(name)


class Dense(nnx.Module):
  """y = x W (+ b) with float32 params `kernel` [in, out] (HF stores [out, in]) and `bias`.

  `nnx.Linear`'s parameters and dtype rules (inputs and params cast to `dtype`), with
  the matmul's backward written out as row-major matmuls (`projections.project`).
  """

  def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, init_std, rngs):
    shape = (in_features, out_features)
    self.kernel = nnx.Param(nnx.initializers.normal(init_std)(rngs.params(), shape, jnp.float32))
    bias_param = None
    if bias:  # draws a key, as nnx.Linear does, so initial values match it
      rngs.params()
      bias_param = nnx.Param(jnp.zeros((out_features,), jnp.float32))
    self.bias = bias_param
    self.dtype = dtype

  def __call__(self, x_BTI: jax.Array) -> jax.Array:
    y_BTO = project(x_BTI.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y_BTO = y_BTO + self.bias[...].astype(self.dtype)
    return y_BTO


def dense(in_features: int, out_features: int, *, bias: bool, dtype, init_std: float, rngs):
  """A `Dense` layer: float32 params, kernel [in, out], computing in `dtype`."""
  return Dense(in_features, out_features, bias=bias, dtype=dtype, init_std=init_std, rngs=rngs)


class RMSNorm(nnx.Module):
  """Root-mean-square norm (Zhang & Sennrich 2019, eq. 4); HF `LlamaRMSNorm`.

  The statistic is computed in float32 and the result cast back before the
  scale, exactly as HF does, so bfloat16 runs round the same way.
  """

  def __init__(self, dim: int, *, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x32_BTD = x_BTD.astype(jnp.float32)
    variance_BT1 = jnp.mean(jnp.square(x32_BTD), axis=-1, keepdims=True)
    normed_BTD = (x32_BTD * jax.lax.rsqrt(variance_BT1 + self.eps)).astype(x_BTD.dtype)
    return self.scale[...].astype(x_BTD.dtype) * normed_BTD


class SwiGLU(nnx.Module):
  """Gated MLP down(silu(gate(x)) * up(x)) (Shazeer 2020, eq. 6); HF `LlamaMLP`."""

  def __init__(self, d_model: int, mlp_dim: int, *, bias: bool, dtype, init_std: float, rngs):
    self.gate_proj = dense(d_model, mlp_dim, bias=bias, dtype=dtype, init_std=init_std, rngs=rngs)
    self.up_proj = dense(d_model, mlp_dim, bias=bias, dtype=dtype, init_std=init_std, rngs=rngs)
    self.down_proj = dense(mlp_dim, d_model, bias=bias, dtype=dtype, init_std=init_std, rngs=rngs)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    projections = (self.gate_proj, self.up_proj, self.down_proj)
    if any(p.bias is not None for p in projections):
      return self.down_proj(jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))
    dtype = self.gate_proj.dtype
    kernels = (p.kernel[...].astype(dtype) for p in projections)
    return swiglu(x_BTD.astype(dtype), *kernels)


def token_embedding(cfg, *, dtype, rngs) -> nnx.Embed:
  """The [vocab, d_model] float32 embedding every lcjax LM family uses."""
  return nnx.Embed(
    cfg.vocab_size,
    cfg.d_model,
    dtype=dtype,
    param_dtype=jnp.float32,
    embedding_init=nnx.initializers.normal(cfg.initializer_range),
    rngs=rngs,
  )


def output_head(cfg, *, dtype, rngs):
  """The [d_model, vocab] output layer, or None when `cfg.tie_embeddings` reuses the embedding."""
  if cfg.tie_embeddings:
    return None
  return dense(
    cfg.d_model, cfg.vocab_size, bias=False, dtype=dtype, init_std=cfg.initializer_range, rngs=rngs
  )


def vocab_logits(embed: nnx.Embed, lm_head, h_BTD: jax.Array) -> jax.Array:
  """Float32 logits from hidden states through the output head (or the tied embedding)."""
  if lm_head is None:
    return embed.attend(h_BTD).astype(jnp.float32)
  return lm_head(h_BTD).astype(jnp.float32)
