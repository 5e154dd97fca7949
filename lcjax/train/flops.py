"""Model FLOPs per token and the peak FLOP/s behind the MFU estimate.

FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6·N for the
matmuls of the N non-embedding parameters (forward 2N, backward 4N), plus
6·L·H·D·T for causal attention scores and values (12·L·H·D·T halved by the mask).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.models.config import head_dim

__all__ = ["flops_per_token", "peak_flops", "measure_matmul_peak"]

# Dense bf16 peak per chip (vendor figures); CPUs are measured instead.
_PEAKS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100": 312e12,
}


def flops_per_token(model_config, n_params: int, seq_len: int) -> float:
  """Training FLOPs per token: 6·(non-embedding params) + 6·L·H·D·T (attention families)."""
  embed = model_config.vocab_size * model_config.d_model
  non_embedding = n_params - embed  # the output head is a matmul and stays counted
  if "num_heads" not in model_config:  # attention-free families (mamba2)
    return 6.0 * non_embedding
  attn = 6 * model_config.num_layers * model_config.num_heads * head_dim(model_config) * seq_len
  return 6.0 * non_embedding + attn


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a float32 n×n matmul on the default device (best of `repeats`)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n**3 / best


def peak_flops(configured: float | None = None) -> float:
  """The configured peak, else the chip's listed peak, else a measured CPU matmul peak."""
  if configured:
    return float(configured)
  kind = jax.devices()[0].device_kind
  for name, value in _PEAKS.items():
    if kind.startswith(name):
      return value
  return measure_matmul_peak()
