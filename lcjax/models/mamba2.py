"""Mamba-2 language model in Flax NNX (Dao & Gu 2024, "Transformers are SSMs", §7).

The block follows transformers' `Mamba2ForCausalLM` (torch path) exactly, so
checkpoints convert both ways (lcjax.interop.hf_mamba2, tests/test_mamba2.py):

  x ─ RMSNorm ─ in_proj ─┬─ z ───────────────────────────────────────────┐
                         ├─ xBC ─ causal depthwise conv1d ─ SiLU ─ x, B, C ┤
                         └─ dt ─ softplus(dt + dt_bias), clamped ──────────┤
        SSD(x, Δ, A = −exp(A_log), B, C) + D·x ─ RMSNorm_groups(y·silu(z)) ─ out_proj ─ + x

in_proj's output order is [z, x, B, C, dt] (§7.1: all SSM inputs are produced in
parallel from the block input); B and C have `n_groups` groups shared by the heads
(§7.2, the grouped "multi-value" pattern); the gated RMSNorm normalizes each group of
`expand·d_model / n_groups` channels separately (§7.1's extra normalization). The
SSD math itself is `lcjax.ssm.ssd`.

Packed documents (`segment_ids`) are exact: at a document's first token the SSM
state is reset (a −inf log-decay) and the convolution does not read tokens of the
previous document, so each document's outputs equal running it alone. `positions`
are ignored (there is no positional encoding). Generation caches per layer the last
d_conv − 1 conv inputs and the SSM state; `cache_index` is not needed and ignored.

State-collapse mitigations (Chen et al. 2024, "Stuffed Mamba: State Collapse and State
Capacity of RNN-Based Long-Context Modeling", §5; `lcjax.ssm.mitigations`), all off by
default and then exactly the plain model, all training-free:
  decay_scale, input_scale  M1 "forget more, remember less" (§5.1): Δ·A and (Δ·x)Bᵀ
                            scaled separately (the D·x skip keeps the unscaled x).
  state_norm_max            M2 state normalization (§5.2): each head's ‖h‖ is capped after
                            every update; the mixer then runs the sequential scan everywhere
                            (training forward, prefill and decode agree).
  state_window              M3 sliding window by state difference (§5.3): outputs read
                            h_t − (∏α)·h_{t−r}; full-sequence forward only (no cache).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lcjax.config import ConfigError, require
from lcjax.models.layers import (
  RMSNorm,
  dense,
  output_head,
  resolve_dtype,
  token_embedding,
  vocab_logits,
)
from lcjax.models.remat import checkpoint_policy, tag_layer_input, validate_remat
from lcjax.ssm.mitigations import forget_more_remember_less, ssd_windowed
from lcjax.ssm.ssd import ssd_chunked, ssd_sequential, ssd_step

__all__ = [
  "mamba2_config",
  "validate_mamba2_config",
  "num_heads",
  "Mamba2Cache",
  "CausalConv1d",
  "GatedRMSNorm",
  "Mamba2Mixer",
  "Mamba2Block",
  "Mamba2LM",
]

SSD_IMPLS = ("chunked", "sequential")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def mamba2_config(**overrides: Any) -> ml_collections.ConfigDict:
  """A tiny Mamba-2 config; every field can be overridden by keyword.

  Names follow lcjax (d_model, num_layers, d_state, ...); `lcjax.interop.hf_mamba2`
  maps them to transformers' `Mamba2Config` keys. The head count is derived:
  num_heads = expand · d_model / head_dim.
  """
  cfg = ml_collections.ConfigDict(
    dict(
      family="mamba2",
      hf_model_type="mamba2",  # what save_pretrained writes (transformers' Mamba2ForCausalLM)
      vocab_size=384,
      d_model=128,
      num_layers=2,
      d_state=16,  # N (HF state_size)
      d_conv=4,  # depthwise causal conv width (HF conv_kernel)
      expand=2,  # inner width = expand · d_model
      head_dim=32,  # P
      n_groups=1,  # B/C groups; heads per group = num_heads / n_groups
      chunk_size=64,  # SSD chunk length (the model uses min(chunk_size, T))
      rms_norm_eps=1e-5,  # HF layer_norm_epsilon, used by every norm
      tie_embeddings=False,
      dt_min=1e-3,  # Δ initialization: log-uniform in [dt_min, dt_max], floored
      dt_max=0.1,
      dt_init_floor=1e-4,
      A_init_range=(1.0, 16.0),  # A = −U(lo, hi) at initialization (mamba_ssm default)
      time_step_limit=(0.0, math.inf),  # Δ is clamped to [lo, hi] after the softplus
      use_conv_bias=True,
      use_bias=False,  # in_proj and out_proj biases
      residual_in_fp32=True,  # keep the residual stream in float32 (HF residual_in_fp32)
      dtype="auto",  # compute dtype: auto = bfloat16 on TPU/GPU, float32 on CPU
      remat="none",  # activation checkpointing per layer; lcjax.models.remat.REMAT_POLICIES
      ssd_impl="chunked",  # chunked | sequential (the reference recurrence)
      initializer_range=0.02,
      # State-collapse mitigations (Chen et al. 2024, "Stuffed Mamba", §5); all off by default.
      decay_scale=1.0,  # M1 (§5.1): log-decay Δ·A multiplied by this (>= 1 forgets more)
      input_scale=1.0,  # M1 (§5.1): inserted term (Δ·x) Bᵀ multiplied by this (<= 1)
      state_norm_max=0.0,  # M2 (§5.2): > 0 caps each head's ‖h‖ (recurrent scan); 0 = off
      state_window=0,  # M3 (§5.3): > 0 keeps only the last r inputs (state difference)
    )
  )
  for key, value in overrides.items():
    if key not in cfg:
      raise ConfigError(
        f"model config has no field {key!r}; known fields: {', '.join(sorted(cfg))}"
      )
    cfg[key] = value
  return cfg


def num_heads(cfg) -> int:
  """H = expand · d_model / head_dim."""
  return cfg.expand * cfg.d_model // cfg.head_dim


def validate_mamba2_config(cfg) -> None:
  """Raises ConfigError with one sentence naming the field and the fix."""
  require(cfg.family == "mamba2", f"model.family={cfg.family!r} is not 'mamba2'")
  require(
    cfg.hf_model_type == "mamba2",
    f"model.hf_model_type={cfg.hf_model_type!r} is unsupported for family mamba2; use 'mamba2'",
  )
  for name in (
    "vocab_size",
    "d_model",
    "num_layers",
    "d_state",
    "d_conv",
    "expand",
    "head_dim",
    "n_groups",
    "chunk_size",
  ):
    value = cfg[name]
    require(
      isinstance(value, int) and value >= 1, f"model.{name}={value!r} must be a positive integer"
    )
  inner = cfg.expand * cfg.d_model
  require(
    inner % cfg.head_dim == 0,
    f"model.expand*model.d_model={inner} is not divisible by model.head_dim={cfg.head_dim}; "
    "change head_dim",
  )
  require(
    num_heads(cfg) % cfg.n_groups == 0,
    f"model.n_groups={cfg.n_groups} must divide the number of heads {num_heads(cfg)} "
    "(expand*d_model/head_dim)",
  )
  limit = tuple(cfg.time_step_limit)
  require(
    len(limit) == 2 and 0.0 <= limit[0] <= limit[1],
    f"model.time_step_limit={limit} must be (lo, hi) with 0 <= lo <= hi",
  )
  require(
    0.0 < cfg.dt_min <= cfg.dt_max,
    f"model.dt_min={cfg.dt_min} and model.dt_max={cfg.dt_max} need 0 < dt_min <= dt_max",
  )
  lo, hi = tuple(cfg.A_init_range)
  require(0.0 < lo <= hi, f"model.A_init_range={(lo, hi)} needs 0 < lo <= hi")
  require(cfg.rms_norm_eps > 0, f"model.rms_norm_eps={cfg.rms_norm_eps} must be positive")
  require(cfg.dtype in DTYPES, f"model.dtype={cfg.dtype!r} is unknown; use one of {DTYPES}")
  validate_remat(cfg.remat)
  require(
    cfg.ssd_impl in SSD_IMPLS, f"model.ssd_impl={cfg.ssd_impl!r} is unknown; use one of {SSD_IMPLS}"
  )
  require(
    cfg.decay_scale >= 1.0,
    f"model.decay_scale={cfg.decay_scale} must be >= 1 (M1 forgets more; 1 is off)",
  )
  require(
    0.0 < cfg.input_scale <= 1.0,
    f"model.input_scale={cfg.input_scale} must be in (0, 1] (M1 remembers less; 1 is off)",
  )
  require(
    cfg.state_norm_max >= 0.0,
    f"model.state_norm_max={cfg.state_norm_max} must be >= 0 (0 turns M2 off)",
  )
  require(
    isinstance(cfg.state_window, int) and cfg.state_window >= 0,
    f"model.state_window={cfg.state_window!r} must be a non-negative integer (0 turns M3 off)",
  )
  require(
    not (cfg.state_window and cfg.state_norm_max),
    "model.state_window and model.state_norm_max cannot both be set; pick one mitigation",
  )


class Mamba2Cache(NamedTuple):
  """Decoding state of one layer: the conv's input history and the SSM state."""

  conv_BKC: jax.Array  # the last d_conv − 1 conv inputs (x, B, C before the conv)
  ssm_BHPN: jax.Array  # float32 SSM state h


class CausalConv1d(nnx.Module):
  """Depthwise causal conv: out_t = bias + Σ_k kernel[k] · in_{t−(K−1)+k} (HF `conv1d`).

  kernel is [K, C] (HF stores [C, 1, K]). `history_BKC` holds the K − 1 inputs
  before this call (zeros at the start); `doc_BT` (document index per token) hides
  taps that reach into an earlier document.
  """

  def __init__(self, channels: int, width: int, *, bias: bool, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(width)  # PyTorch's default for a depthwise conv (fan_in = K)
    self.kernel = nnx.Param(
      jax.random.uniform(rngs.params(), (width, channels), jnp.float32, -bound, bound)
    )
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32)) if bias else None

  def __call__(self, in_BTC, *, history_BKC=None, doc_BT=None) -> jax.Array:
    K = self.kernel.shape[0]
    B, T, C = in_BTC.shape
    if history_BKC is None:
      history_BKC = jnp.zeros((B, K - 1, C), in_BTC.dtype)
    full_BSC = jnp.concatenate([history_BKC.astype(in_BTC.dtype), in_BTC], axis=1)
    kernel_KC = self.kernel[...]
    if doc_BT is not None:
      doc_BS = jnp.concatenate([jnp.repeat(doc_BT[:, :1], K - 1, axis=1), doc_BT], axis=1)
    out_BTC = jnp.zeros((B, T, C), jnp.float32)
    for k in range(K):
      tap_BTC = full_BSC[:, k : k + T].astype(jnp.float32) * kernel_KC[k]
      if doc_BT is not None and k < K - 1:  # tap k reads token t − (K − 1 − k)
        tap_BTC = jnp.where((doc_BS[:, k : k + T] == doc_BT)[..., None], tap_BTC, 0.0)
      out_BTC = out_BTC + tap_BTC
    if self.bias is not None:
      out_BTC = out_BTC + self.bias[...]
    return out_BTC.astype(in_BTC.dtype)


class GatedRMSNorm(nnx.Module):
  """scale · RMSNorm_groups(y · silu(z)), statistics per group of `group_size` channels.

  HF `MambaRMSNormGated` (gate before the norm, i.e. mamba_ssm's norm_before_gate=False);
  the extra normalization of the Mamba-2 block (Dao & Gu 2024, §7.1). Computed in
  float32; returns float32.
  """

  def __init__(self, dim: int, *, group_size: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.group_size = group_size
    self.eps = eps

  def __call__(self, y_BTE: jax.Array, z_BTE: jax.Array) -> jax.Array:
    h_BTE = y_BTE.astype(jnp.float32) * jax.nn.silu(z_BTE.astype(jnp.float32))
    *lead, E = h_BTE.shape
    h_BTGS = h_BTE.reshape(*lead, E // self.group_size, self.group_size)
    variance_BTG1 = jnp.mean(jnp.square(h_BTGS), axis=-1, keepdims=True)
    h_BTE = (h_BTGS * jax.lax.rsqrt(variance_BTG1 + self.eps)).reshape(*lead, E)
    return self.scale[...] * h_BTE


def _init_dt_bias(key, H: int, cfg) -> jax.Array:
  """inverse-softplus of Δ ~ log-uniform[dt_min, dt_max], floored (mamba_ssm / HF init)."""
  u_H = jax.random.uniform(key, (H,), jnp.float32)
  log_lo, log_hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
  dt_H = jnp.maximum(jnp.exp(u_H * (log_hi - log_lo) + log_lo), cfg.dt_init_floor)
  return dt_H + jnp.log(-jnp.expm1(-dt_H))


class Mamba2Mixer(nnx.Module):
  """The Mamba-2 SSM mixer (HF `Mamba2Mixer`): in_proj → conv → SSD → gated norm → out_proj.

  `mixer(x_BTD, segment_ids_BT=None, cache=None) -> (out_BTD, cache)`; with a cache it
  continues from the cached conv history and state and returns the updated cache.
  """

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.num_heads, self.head_dim = num_heads(cfg), cfg.head_dim
    self.n_groups, self.d_state, self.d_conv = cfg.n_groups, cfg.d_state, cfg.d_conv
    self.inner = cfg.expand * cfg.d_model
    self.conv_dim = self.inner + 2 * cfg.n_groups * cfg.d_state
    self.chunk_size = cfg.chunk_size
    self.ssd_impl = cfg.ssd_impl
    self.time_step_limit = tuple(float(v) for v in cfg.time_step_limit)
    self.decay_scale, self.input_scale = float(cfg.decay_scale), float(cfg.input_scale)
    self.state_norm_max = float(cfg.state_norm_max) or None
    self.state_window = int(cfg.state_window)
    H, std = self.num_heads, cfg.initializer_range
    self.in_proj = dense(
      cfg.d_model,
      self.inner + self.conv_dim + H,
      bias=cfg.use_bias,
      dtype=dtype,
      init_std=std,
      rngs=rngs,
    )
    self.conv1d = CausalConv1d(self.conv_dim, cfg.d_conv, bias=cfg.use_conv_bias, rngs=rngs)
    self.dt_bias = nnx.Param(_init_dt_bias(rngs.params(), H, cfg))
    lo, hi = tuple(cfg.A_init_range)
    self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (H,), jnp.float32, lo, hi)))
    self.D = nnx.Param(jnp.ones((H,), jnp.float32))
    self.norm = GatedRMSNorm(
      self.inner, group_size=self.inner // cfg.n_groups, eps=cfg.rms_norm_eps
    )
    self.out_proj = dense(
      self.inner, cfg.d_model, bias=cfg.use_bias, dtype=dtype, init_std=std, rngs=rngs
    )

  def init_cache(self, batch: int) -> Mamba2Cache:
    return Mamba2Cache(
      jnp.zeros((batch, self.d_conv - 1, self.conv_dim), self.dtype),
      jnp.zeros((batch, self.num_heads, self.head_dim, self.d_state), jnp.float32),
    )

  def ssd_inputs(
    self,
    x_BTD: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    cache: Mamba2Cache | None = None,
  ) -> dict:
    """The SSD scan's inputs for a block input (in_proj, conv, Δ, A), before M1.

    Returns dict(z_BTE, xbc_BTC, x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, reset_BT);
    used by `__call__` and by state statistics (`lcjax.eval.state_capacity`).
    """
    Bsz, T, _ = x_BTD.shape
    H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.d_state
    zxbcdt_BTF = self.in_proj(x_BTD)
    z_BTE = zxbcdt_BTF[..., : self.inner]
    xbc_BTC = zxbcdt_BTF[..., self.inner : self.inner + self.conv_dim]
    dt_BTH = zxbcdt_BTF[..., self.inner + self.conv_dim :]

    reset_BT = doc_BT = None
    if segment_ids_BT is not None:
      if cache is not None:
        raise ValueError(
          "decoding with a Mamba-2 cache takes one document per row; drop segment_ids"
        )
      boundary_BT = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
      reset_BT = jnp.concatenate([jnp.zeros((Bsz, 1), bool), boundary_BT], axis=1)
      doc_BT = jnp.cumsum(reset_BT, axis=1)

    history_BKC = None if cache is None else cache.conv_BKC
    conv_BTC = jax.nn.silu(self.conv1d(xbc_BTC, history_BKC=history_BKC, doc_BT=doc_BT))
    x_BTHP = conv_BTC[..., : self.inner].reshape(Bsz, T, H, P)
    B_BTGN = conv_BTC[..., self.inner : self.inner + G * N].reshape(Bsz, T, G, N)
    C_BTGN = conv_BTC[..., self.inner + G * N :].reshape(Bsz, T, G, N)

    lo, hi = self.time_step_limit
    dt_BTH = jnp.clip(jax.nn.softplus(dt_BTH.astype(jnp.float32) + self.dt_bias[...]), lo, hi)
    A_H = -jnp.exp(self.A_log[...])
    return dict(
      z_BTE=z_BTE,
      xbc_BTC=xbc_BTC,
      x_BTHP=x_BTHP,
      dt_BTH=dt_BTH,
      A_H=A_H,
      B_BTGN=B_BTGN,
      C_BTGN=C_BTGN,
      reset_BT=reset_BT,
    )

  def scan_inputs(self, x_BTHP: jax.Array, A_H: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(A_H, x_BTHP) for the scan after M1 (Chen et al. 2024 §5.1); unchanged when off."""
    return forget_more_remember_less(
      A_H, x_BTHP, decay_scale=self.decay_scale, input_scale=self.input_scale
    )

  def __call__(
    self,
    x_BTD: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    cache: Mamba2Cache | None = None,
  ) -> tuple[jax.Array, Mamba2Cache | None]:
    Bsz, T, _ = x_BTD.shape
    inputs = self.ssd_inputs(x_BTD, segment_ids_BT=segment_ids_BT, cache=cache)
    z_BTE, xbc_BTC, x_BTHP = inputs["z_BTE"], inputs["xbc_BTC"], inputs["x_BTHP"]
    dt_BTH, B_BTGN, C_BTGN = inputs["dt_BTH"], inputs["B_BTGN"], inputs["C_BTGN"]
    reset_BT = inputs["reset_BT"]
    A_H, xs_BTHP = self.scan_inputs(x_BTHP, inputs["A_H"])

    if self.state_window:
      if cache is not None:
        raise ValueError(
          "model.state_window (M3) runs on full sequences only; generate without it or "
          "re-run the forward pass on the whole prefix"
        )
      y_BTHP = ssd_windowed(
        xs_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, window=self.state_window, reset_BT=reset_BT
      )
      h_BHPN = None
    elif cache is not None and T == 1:
      y_BHP, h_BHPN = ssd_step(
        cache.ssm_BHPN,
        xs_BTHP[:, 0],
        dt_BTH[:, 0],
        A_H,
        B_BTGN[:, 0],
        C_BTGN[:, 0],
        state_norm_max=self.state_norm_max,
      )
      y_BTHP = y_BHP[:, None]
    else:
      # M2 (state normalization) needs the recurrent form: the sequential scan.
      extra = {} if self.state_norm_max is None else dict(state_norm_max=self.state_norm_max)
      sequential = self.ssd_impl == "sequential" or self.state_norm_max is not None
      ssd = ssd_sequential if sequential else ssd_chunked
      y_BTHP, h_BHPN = ssd(
        xs_BTHP,
        dt_BTH,
        A_H,
        B_BTGN,
        C_BTGN,
        chunk=min(self.chunk_size, T),
        initial_state=None if cache is None else cache.ssm_BHPN,
        return_final_state=True,
        reset_BT=reset_BT,
        **extra,
      )
    y_BTHP = y_BTHP + self.D[...][:, None] * x_BTHP.astype(jnp.float32)
    y_BTE = self.norm(y_BTHP.reshape(Bsz, T, self.inner), z_BTE)
    out_BTD = self.out_proj(y_BTE.astype(self.dtype))

    if cache is not None:
      full_BSC = jnp.concatenate([cache.conv_BKC, xbc_BTC.astype(cache.conv_BKC.dtype)], axis=1)
      cache = Mamba2Cache(full_BSC[:, full_BSC.shape[1] - (self.d_conv - 1) :], h_BHPN)
    return out_BTD, cache


class Mamba2Block(nnx.Module):
  """Pre-norm residual block x + mixer(RMSNorm(x)) (HF `Mamba2Block`).

  With `residual_in_fp32` the residual stream stays float32 whatever the compute dtype.
  """

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.residual_in_fp32 = cfg.residual_in_fp32
    self.norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
    self.mixer = Mamba2Mixer(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x_BTD, *, segment_ids_BT=None, cache=None):
    residual_BTD = x_BTD.astype(jnp.float32) if self.residual_in_fp32 else x_BTD
    out_BTD, cache = self.mixer(
      self.norm(x_BTD).astype(self.dtype), segment_ids_BT=segment_ids_BT, cache=cache
    )
    return (residual_BTD + out_BTD).astype(residual_BTD.dtype), cache


def _run_layer(layer, x_BTD, segment_ids_BT):
  return layer(tag_layer_input(x_BTD), segment_ids_BT=segment_ids_BT, cache=None)[0]


def _remat_layer(policy: str):
  """The per-layer function under `model.remat` (`lcjax.models.remat`; the layers loop)."""
  if policy == "none":
    return _run_layer
  return nnx.remat(_run_layer, policy=checkpoint_policy(policy))


class Mamba2LM(nnx.Module):
  """Mamba-2 LM: embed → Mamba2Block × num_layers → RMSNorm → logits (HF `Mamba2ForCausalLM`).

  `model(tokens_BT, positions=None, segment_ids=None) -> logits_BTV` (float32), the
  DecoderLM interface. `positions` are ignored; `segment_ids` reset the state and the
  conv at each document start (exact). `init_cache`/`decode` serve `generate`.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    validate_mamba2_config(cfg)
    self.dtype = resolve_dtype(cfg.dtype)
    self.remat = cfg.remat
    self.embed_tokens = token_embedding(cfg, dtype=self.dtype, rngs=rngs)
    self.layers = nnx.List(
      [Mamba2Block(cfg, dtype=self.dtype, rngs=rngs) for _ in range(cfg.num_layers)]
    )
    self.norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
    self.lm_head = output_head(cfg, dtype=self.dtype, rngs=rngs)

  def hidden_states(
    self,
    tokens_BT: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    token_index: jax.Array | None = None,
    caches: list[Mamba2Cache] | None = None,
    cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, list[Mamba2Cache] | None]:
    """Final normed hidden states [B,T,D] (and updated caches when decoding).

    `positions` and `cache_index` are accepted for the DecoderLM interface and unused.
    `token_index` [B,T] (each token's index in the packed row, set by context-parallel
    layouts) is undone before the scan, which needs row order, and reapplied after.
    """
    del positions, cache_index
    if token_index is not None:
      if caches is not None:
        raise ValueError(
          "token_index reorders a packed row; decoding with a cache does not take it"
        )
      index_BT = jnp.broadcast_to(jnp.asarray(token_index, jnp.int32), tokens_BT.shape)
      slot_BT = jnp.argsort(index_BT, axis=1)  # the slot holding row position i
      in_order = lambda a_BT: None if a_BT is None else jnp.take_along_axis(a_BT, slot_BT, axis=1)
      h_BTD, _ = self.hidden_states(in_order(tokens_BT), segment_ids=in_order(segment_ids))
      return jnp.take_along_axis(h_BTD, index_BT[..., None], axis=1), None
    x_BTD = self.embed_tokens(tokens_BT)
    if caches is None:
      run_layer = _remat_layer(self.remat)
      for layer in self.layers:
        x_BTD = run_layer(layer, x_BTD, segment_ids)
      return self.norm(x_BTD), None
    new_caches = []
    for layer, cache in zip(self.layers, caches, strict=True):
      x_BTD, cache = layer(x_BTD, segment_ids_BT=segment_ids, cache=cache)
      new_caches.append(cache)
    return self.norm(x_BTD), new_caches

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """Vocabulary logits in float32 from hidden states (tied or separate head)."""
    return vocab_logits(self.embed_tokens, self.lm_head, h_BTD.astype(self.dtype))

  def __call__(self, tokens_BT, *, positions=None, segment_ids=None, token_index=None):
    """Logits [B,T,V] in float32."""
    h_BTD, _ = self.hidden_states(
      tokens_BT, positions=positions, segment_ids=segment_ids, token_index=token_index
    )
    return self.logits(h_BTD)

  def init_cache(self, batch: int, max_len: int | None = None) -> list[Mamba2Cache]:
    """Zero conv histories and SSM states; their size does not depend on `max_len`."""
    del max_len
    return [layer.mixer.init_cache(batch) for layer in self.layers]

  def decode(self, tokens_BT, caches: list[Mamba2Cache], cache_index=0) -> tuple[jax.Array, list]:
    """Runs `tokens_BT` after the cached prefix; returns logits and the updated caches."""
    h_BTD, caches = self.hidden_states(tokens_BT, caches=caches)
    return self.logits(h_BTD), caches
