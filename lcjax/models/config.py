"""Model configs for the Llama family (Llama, Mistral, Qwen2) and their validation.

These are the `model` section of a run config (`lcjax.train.base_config`; the README's
config table). The mapping to Hugging Face `config.json` keys lives in
`lcjax.interop.hf`. `attention_impl`, `attention_block_q/kv` and `context_strategy` are
here so a model can be built on its own (notebooks, benchmarks); in a run config their
one home is `config.attention` / `config.parallel`, and the run's `model` section does
not have them (`lcjax.train.run_model.model_config_for_run`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from lcjax.attention.registry import impl_names
from lcjax.config import ConfigError, require
from lcjax.models.mamba2 import mamba2_config, validate_mamba2_config
from lcjax.models.remat import REMAT_POLICIES, validate_remat
from lcjax.positional.rope import validate_rope_parameters

__all__ = [
  "llama_config",
  "validate_model_config",
  "layer_types",
  "longgen_layer_types",
  "head_dim",
  "scan_layers_enabled",
  "LAYER_TYPES",
  "REMAT_POLICIES",
]

# Per-layer attention kinds. "full_attention" and "sliding_attention" are the Hugging
# Face `layer_types` names (sliding: the last `sliding_window` keys). The lcjax-only
# "sink_window_attention" is LongGen's sparse layer (Ge et al. 2024, "A Little Goes a
# Long Way: Efficient Long Context Training and Inference with Partial Contexts"): the
# last `sparse_window` keys plus the first `sparse_sinks` tokens of the row (attention
# sinks), a `MaskSpec(window=..., sinks=...)` that the block-sparse kernels skip blocks of.
# "strided_attention" is LongGen's other sparse layer, the S2-Attention pattern (Lin et al.
# 2024): a local band of `sparse_local_blocks` blocks of `sparse_block` tokens plus every
# `sparse_stride`-th block, with a phase that differs per kv head, plus the sinks
# (`MaskSpec(stride=..., stride_block=..., local_blocks=..., sinks=...)`).
LAYER_TYPES = (
  "full_attention",
  "sliding_attention",
  "sink_window_attention",
  "strided_attention",
  "mamba2",
)


def llama_config(**overrides: Any) -> ml_collections.ConfigDict:
  """A tiny Llama config; every field can be overridden by keyword.

  `rope` holds standardized Hugging Face `rope_parameters` (see
  `lcjax.positional.rope.standardize_rope_parameters`). Settings that belong to one RoPE type
  live in that dict, not here, so they travel with it when a run swaps RoPEs: e.g.
  `rope=dict(rope_type="eabf", original_max_position_embeddings=4096, eabf_unscaled_layers=2)`,
  the leading layers that entropy-aware ABF leaves unscaled (`lcjax.positional.rope_variants`).
  """
  cfg = ml_collections.ConfigDict(
    dict(
      family="llama",
      hf_model_type="llama",  # llama | mistral | qwen2: what save_pretrained writes
      vocab_size=384,
      d_model=128,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=ml_collections.config_dict.placeholder(int),  # None: d_model // num_heads
      mlp_dim=352,
      rms_norm_eps=1e-5,
      max_position_embeddings=2048,
      rope=dict(rope_type="default", rope_theta=10000.0, max_position_embeddings=2048),
      qkv_bias=False,  # Qwen2: True
      o_bias=False,  # Llama `attention_bias=True` sets both qkv_bias and o_bias
      mlp_bias=False,
      tie_embeddings=False,
      sliding_window=ml_collections.config_dict.placeholder(int),  # Mistral / Qwen2
      layer_types=ml_collections.config_dict.placeholder(tuple),  # None: derived
      # mamba2 layers of hybrid stacks: mamba2_config fields for their mixer (d_state, head_dim,
      # expand, n_groups, chunk_size, ...); d_model, norm eps, dtype come from this config.
      mamba={},
      sparse_window=ml_collections.config_dict.placeholder(int),  # sink_window_attention
      sparse_sinks=0,  # sink_window_attention, strided_attention: first tokens of the row
      sparse_stride=ml_collections.config_dict.placeholder(int),  # strided_attention: every
      # sparse_stride-th block of sparse_block tokens, per-kv-head phase (S2's vert_stride)
      sparse_block=64,  # strided_attention: tokens per sparse block
      sparse_local_blocks=1,  # strided_attention: most recent blocks always visible
      anchor=False,  # AnchorAttention: key 0 visible to every document
      dtype="auto",  # compute dtype: auto = bfloat16 on TPU/GPU, float32 on CPU
      # Activation checkpointing per layer: none | full | save_dots | offload | offload_dots
      # (lcjax.models.remat documents each).
      remat="none",
      # Layers as one jax.lax.scan over stacked parameters (MaxText's scan_layers): None =
      # on when every layer has the same attention type, True/False to force (True needs
      # uniform layers; hybrids loop). lcjax.models.stacking maps the per-layer names.
      scan_layers=ml_collections.config_dict.placeholder(bool),
      mlp_chunk=0,  # tokens per MLP chunk within each context shard; 0 = one chunk
      attention_impl="auto",  # a registered impl (lcjax.attention.IMPLS) or auto
      context_strategy="ring",  # ring | all_gather, used when the mesh's context axis is > 1
      attention_block_q=512,
      attention_block_kv=512,
      initializer_range=0.02,
    )
  )
  for key, value in overrides.items():
    if key not in cfg:
      raise ConfigError(
        f"model config has no field {key!r}; known fields: {', '.join(sorted(cfg))}"
      )
    if isinstance(value, dict):
      cfg[key] = ml_collections.ConfigDict(value)
    else:
      cfg[key] = value
  return cfg


def scan_layers_enabled(cfg) -> bool:
  """Whether the decoder's layers are stacked and scanned (`model.scan_layers`).

  Unset (None), they are when all layers share one attention type; stacks with
  mamba2 layers or mixed types run as a loop (a scan needs one layer body).
  """
  kinds = layer_types(cfg)
  uniform = len(set(kinds)) == 1 and kinds[0] != "mamba2"
  scan = cfg.get("scan_layers")
  return uniform if scan is None else bool(scan)


def head_dim(cfg) -> int:
  return cfg.head_dim if cfg.head_dim is not None else cfg.d_model // cfg.num_heads


def layer_types(cfg) -> tuple[str, ...]:
  """Per-layer attention kinds; default: sliding everywhere if `sliding_window` else full."""
  if cfg.layer_types is not None:
    return tuple(cfg.layer_types)
  kind = "sliding_attention" if cfg.sliding_window is not None else "full_attention"
  return (kind,) * cfg.num_layers


def longgen_layer_types(
  num_layers: int, full_fraction: float = 1 / 3, sparse: str = "sink_window_attention"
) -> tuple[str, ...]:
  """LongGen's hybrid layout: full attention in the middle layers, `sparse` elsewhere.

  LongGen (Ge et al. 2024, "A Little Goes a Long Way") keeps round(num_layers *
  full_fraction) full-attention layers (1/3 by default, at least one when the fraction
  is positive) as one contiguous band centred in the stack, and makes the bottom and
  top layers sparse; the paper finds the middle the best place for the full layers.
  E.g. longgen_layer_types(6) = 2 sparse, 2 full, 2 sparse.
  """
  require(
    isinstance(num_layers, int) and num_layers >= 1,
    f"num_layers={num_layers!r} must be a positive integer",
  )
  require(0.0 <= full_fraction <= 1.0, f"full_fraction={full_fraction!r} must be between 0 and 1")
  require(
    sparse in LAYER_TYPES and sparse != "full_attention",
    f"sparse={sparse!r} must be a sparse layer type other than 'full_attention'",
  )
  n_full = round(num_layers * full_fraction)
  if full_fraction > 0:
    n_full = max(n_full, 1)
  start = (num_layers - n_full) // 2
  return tuple(
    "full_attention" if start <= i < start + n_full else sparse for i in range(num_layers)
  )


def mamba_mixer_config(cfg):
  """The mamba2_config of a hybrid stack's Mamba-2 layers (Lieber et al. 2024, Jamba-style).

  Width, norm epsilon, dtype and initialization come from the model config; the rest
  from `model.mamba` (e.g. `mamba=dict(d_state=16, head_dim=32)`).
  """
  mamba = cfg.get("mamba") or {}
  mamba = mamba.to_dict() if hasattr(mamba, "to_dict") else dict(mamba)
  shared = dict(
    d_model=cfg.d_model,
    rms_norm_eps=cfg.rms_norm_eps,
    dtype=cfg.dtype,
    initializer_range=cfg.initializer_range,
    num_layers=1,
    vocab_size=cfg.vocab_size,
  )
  return mamba2_config(**{**shared, **mamba})


def validate_model_config(cfg) -> None:
  """Raises ConfigError with one sentence naming the field and the fix."""
  require(cfg.family == "llama", f"model.family={cfg.family!r} is unknown; use 'llama'")
  require(
    cfg.hf_model_type in ("llama", "mistral", "qwen2"),
    f"model.hf_model_type={cfg.hf_model_type!r} is unsupported; use llama, mistral or qwen2",
  )
  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
    require(cfg[name] >= 1, f"model.{name}={cfg[name]} must be a positive integer")
  require(
    cfg.num_heads % cfg.num_kv_heads == 0,
    f"model.num_heads={cfg.num_heads} must be a multiple of model.num_kv_heads="
    f"{cfg.num_kv_heads} for grouped-query attention",
  )
  require(
    cfg.head_dim is not None or cfg.d_model % cfg.num_heads == 0,
    f"model.d_model={cfg.d_model} is not divisible by model.num_heads={cfg.num_heads}; "
    "set model.head_dim explicitly",
  )
  require(head_dim(cfg) % 2 == 0, f"model.head_dim={head_dim(cfg)} must be even for RoPE")
  kinds = layer_types(cfg)
  require(
    len(kinds) == cfg.num_layers,
    f"model.layer_types has {len(kinds)} entries but model.num_layers={cfg.num_layers}",
  )
  for kind in kinds:
    require(kind in LAYER_TYPES, f"model.layer_types entry {kind!r} is unknown; use {LAYER_TYPES}")
  if "mamba2" in kinds:
    try:
      validate_mamba2_config(mamba_mixer_config(cfg))
    except ConfigError as e:  # name the hybrid's sub-config, not a top-level field
      raise ConfigError(f"model.mamba (the mamba2 layers of layer_types): {e}") from None
  if "sliding_attention" in kinds:
    require(
      cfg.sliding_window is not None and cfg.sliding_window >= 1,
      "model.layer_types uses 'sliding_attention' but model.sliding_window is not set",
    )
  require(
    isinstance(cfg.sparse_sinks, int) and cfg.sparse_sinks >= 0,
    f"model.sparse_sinks={cfg.sparse_sinks!r} must be a non-negative integer",
  )
  if "sink_window_attention" in kinds:
    require(
      cfg.sparse_window is not None and cfg.sparse_window >= 1,
      "model.layer_types uses 'sink_window_attention' but model.sparse_window is not a "
      "positive integer",
    )
    # Without sinks the layer is a plain sliding window under another name (LongGen's
    # sparse layer keeps the first tokens visible); say which one is meant.
    require(
      cfg.sparse_sinks >= 1,
      "model.layer_types uses 'sink_window_attention' with model.sparse_sinks=0, which is a "
      "plain sliding window; set model.sparse_sinks >= 1 or use 'sliding_attention' with "
      "model.sliding_window",
    )
  if "strided_attention" in kinds:
    require(
      isinstance(cfg.sparse_stride, int) and cfg.sparse_stride >= 1,
      "model.layer_types uses 'strided_attention' but model.sparse_stride is not a positive "
      "integer",
    )
    for field in ("sparse_block", "sparse_local_blocks"):
      value = cfg[field]
      require(
        isinstance(value, int) and value >= 1, f"model.{field}={value!r} must be a positive integer"
      )
  try:
    validate_rope_parameters(cfg.rope.to_dict(), head_dim=head_dim(cfg))
  except ValueError as e:  # name the config field, as every other model error does
    raise ConfigError(f"model.rope: {e}") from None
  rope_max = cfg.rope.get("max_position_embeddings")
  require(
    rope_max is None or rope_max == cfg.max_position_embeddings,
    f"model.rope.max_position_embeddings={rope_max} differs from model.max_position_embeddings="
    f"{cfg.max_position_embeddings}; set them equal (dynamic NTK and LongRoPE read it)",
  )
  if "attention_impl" in cfg:  # the run's one home is config.attention.impl
    require(
      cfg.attention_impl in impl_names(),
      f"attention impl {cfg.attention_impl!r} is unknown; use one of {', '.join(impl_names())}",
    )
  validate_remat(cfg.remat)
  if cfg.get("scan_layers"):
    require(
      len(set(kinds)) == 1 and kinds[0] != "mamba2",
      f"model.scan_layers=True needs layers of one attention type, but model.layer_types has "
      f"{sorted(set(kinds))}; leave model.scan_layers unset (hybrids run as a loop)",
    )
  mlp_chunk = cfg.get("mlp_chunk", 0)
  require(
    isinstance(mlp_chunk, int) and mlp_chunk >= 0,
    f"model.mlp_chunk={mlp_chunk!r} must be a non-negative integer (tokens; 0 = off)",
  )
  require(
    cfg.dtype in ("auto", "float32", "bfloat16", "float16"),
    f"model.dtype={cfg.dtype!r} is unknown; use auto, float32, bfloat16 or float16",
  )
