"""Hugging Face interop: read and write `config.json` + safetensors folders.

`load_pretrained(path)` builds an lcjax model from a transformers checkpoint of
`model_type` llama, mistral, qwen2 or mamba2 (single file or sharded with
`model.safetensors.index.json`); `save_pretrained(model, model_config, path)`
writes a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.
Logits match transformers in float32 (tests/test_hf_interop.py). No torch is
needed: folder reading and writing live in `lcjax.interop.safetensors_io`
(safetensors' numpy API, bfloat16 via ml_dtypes); `model_type` mamba2 is handed to
`lcjax.interop.hf_mamba2`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.interop import hf_mamba2
from lcjax.interop.safetensors_io import (
  CONFIG_FILE,
  CheckpointError,
  get_path,
  read_config,
  read_tensors,
  set_path,
  tensor_files,
  write_checkpoint,
)
from lcjax.models import build_model, llama_config
from lcjax.models.config import head_dim, layer_types, validate_model_config
from lcjax.models.stacking import has_layer_stack, stack_layers, unstack_layers
from lcjax.positional.rope import standardize_rope_parameters, to_hf_rope_fields

__all__ = [
  "load_pretrained",
  "save_pretrained",
  "config_from_hf",
  "config_to_hf",
  "CheckpointError",
]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mamba2")
_ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
}
# Buffers some checkpoints carry that are recomputed, never loaded.
_IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json"):
  """Maps a transformers config dict to an lcjax model config (`llama_config` fields).

  Defaults for absent keys are those of transformers 5.x `LlamaConfig`,
  `MistralConfig` and `Qwen2Config`. `head_dim` is read as transformers reads it
  for all three types: `getattr(config, "head_dim", None) or hidden_size //
  num_attention_heads` (the rotary embeddings in modeling_{llama,mistral,qwen2}.py;
  LlamaConfig/MistralConfig resolve a null head_dim the same way, and Qwen2Config,
  which has no head_dim field, keeps the key when config.json has it).
  """
  model_type = hf.get("model_type")
  if model_type == "mamba2":
    return hf_mamba2.config_from_hf(hf, source=source)
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(
      f"{source}: model_type={model_type!r} is not supported; lcjax loads {SUPPORTED_MODEL_TYPES}"
    )
  for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
    if key not in hf:
      raise CheckpointError(f"{source}: required key {key!r} is missing")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"{source}: hidden_act={act!r} is not supported; lcjax implements silu")
  num_layers = hf["num_hidden_layers"]
  heads = hf["num_attention_heads"]
  window = hf.get("sliding_window")
  if model_type == "llama":
    kinds = ["full_attention"] * num_layers
    window = None
  elif model_type == "mistral":
    kinds = ["sliding_attention" if window is not None else "full_attention"] * num_layers
  else:  # qwen2: the window is active only with use_sliding_window, from max_window_layers on
    if not hf.get("use_sliding_window", False):
      window = None
    kinds = hf.get("layer_types") or [
      "sliding_attention"
      if window is not None and i >= hf.get("max_window_layers", 28)
      else "full_attention"
      for i in range(num_layers)
    ]
  if "sliding_attention" not in kinds:
    window = None
  attention_bias = bool(hf.get("attention_bias", False))
  max_pos = hf.get("max_position_embeddings", {"qwen2": 32768}.get(model_type, 2048))
  cfg = llama_config(
    hf_model_type=model_type,
    vocab_size=hf["vocab_size"],
    d_model=hf["hidden_size"],
    num_layers=num_layers,
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    mlp_dim=hf.get("intermediate_size", 4 * hf["hidden_size"]),
    rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
    max_position_embeddings=max_pos,
    rope=standardize_rope_parameters({**hf, "max_position_embeddings": max_pos}),
    qkv_bias=True if model_type == "qwen2" else attention_bias,
    o_bias=attention_bias if model_type == "llama" else False,
    mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    sliding_window=window,
    layer_types=tuple(kinds),
    initializer_range=hf.get("initializer_range", 0.02),
  )
  validate_model_config(cfg)
  return cfg


def config_to_hf(cfg) -> dict[str, Any]:
  """The transformers `config.json` dict for an lcjax model config."""
  if cfg.get("family") == "mamba2":
    return hf_mamba2.config_to_hf(cfg)
  model_type = cfg.hf_model_type
  kinds = list(layer_types(cfg))
  unsupported = sorted(set(kinds) - {"full_attention", "sliding_attention"})
  if unsupported:
    raise CheckpointError(
      f"model.layer_types uses {unsupported}, which transformers has no layer for; export a "
      "model with only full_attention/sliding_attention layers"
    )
  hf: dict[str, Any] = dict(
    model_type=model_type,
    architectures=[_ARCHITECTURES[model_type]],
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.d_model,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    intermediate_size=cfg.mlp_dim,
    hidden_act="silu",
    rms_norm_eps=cfg.rms_norm_eps,
    max_position_embeddings=cfg.max_position_embeddings,
    tie_word_embeddings=cfg.tie_embeddings,
    initializer_range=cfg.initializer_range,
    dtype="float32",
  )
  hf.update(to_hf_rope_fields(_hf_rope(cfg.rope.to_dict())))
  sliding = "sliding_attention" in kinds
  if model_type == "llama":
    if sliding:
      raise CheckpointError("model_type 'llama' has no sliding-window layers; use mistral or qwen2")
    if cfg.qkv_bias != cfg.o_bias:
      raise CheckpointError("llama's attention_bias sets q/k/v/o biases together; use qwen2")
    hf.update(head_dim=head_dim(cfg), attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  elif model_type == "mistral":
    if sliding and kinds.count("sliding_attention") != len(kinds):
      raise CheckpointError("mistral applies its window to every layer; use qwen2 for a mix")
    _require_no_bias(cfg, model_type)
    hf.update(head_dim=head_dim(cfg), sliding_window=cfg.sliding_window if sliding else None)
  else:
    if not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
      raise CheckpointError("qwen2 has q/k/v biases only; set qkv_bias=True, o_bias=mlp_bias=False")
    # Qwen2Config has no head_dim field but keeps the extra key (PreTrainedConfig
    # stores unknown kwargs), and Qwen2Attention / Qwen2RotaryEmbedding read it
    # (transformers/models/qwen2/modeling_qwen2.py).
    hf.update(
      head_dim=head_dim(cfg),
      use_sliding_window=sliding,
      sliding_window=cfg.sliding_window if sliding else None,
      max_window_layers=kinds.index("sliding_attention") if sliding else cfg.num_layers,
      layer_types=kinds,
    )
  return hf


# The rope types transformers computes ("default" inline, the rest in ROPE_INIT_FUNCTIONS).
HF_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "proportional")


def _hf_rope(rope: dict) -> dict:
  """The rope dict to export: ABF as HF's default RoPE; lcjax-only types refused.

  ABF (Xiong et al. 2023, "Effective Long-Context Scaling of Foundation Models") only
  raises the base: it is transformers' `default` type with its `rope_theta`, so an ABF
  continual-pretraining run exports as a checkpoint transformers loads unchanged.
  """
  if rope["rope_type"] == "abf":
    return {**rope, "rope_type": "default"}
  if rope["rope_type"] not in HF_ROPE_TYPES:
    raise CheckpointError(
      f"model.rope.rope_type={rope['rope_type']!r} is lcjax-only; transformers computes "
      f"{', '.join(HF_ROPE_TYPES)} (and lcjax's abf as default), so this model cannot be "
      "exported"
    )
  return rope


def _require_no_bias(cfg, model_type: str) -> None:
  if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
    raise CheckpointError(f"{model_type} has no attention or MLP biases; use qwen2 or llama")


# ---------------------------------------------------------------------------- weights


def _hf_names(cfg) -> Iterator[tuple[str, tuple, bool]]:
  """(HF tensor name, lcjax state path, transpose?) for every parameter."""
  yield "model.embed_tokens.weight", ("embed_tokens", "embedding"), False
  for i in range(cfg.num_layers):
    hf, lc = f"model.layers.{i}.", ("layers", i)
    for proj, has_bias in (
      ("q_proj", cfg.qkv_bias),
      ("k_proj", cfg.qkv_bias),
      ("v_proj", cfg.qkv_bias),
      ("o_proj", cfg.o_bias),
    ):
      yield f"{hf}self_attn.{proj}.weight", (*lc, "self_attn", proj, "kernel"), True
      if has_bias:
        yield f"{hf}self_attn.{proj}.bias", (*lc, "self_attn", proj, "bias"), False
    for proj in ("gate_proj", "up_proj", "down_proj"):
      yield f"{hf}mlp.{proj}.weight", (*lc, "mlp", proj, "kernel"), True
      if cfg.mlp_bias:
        yield f"{hf}mlp.{proj}.bias", (*lc, "mlp", proj, "bias"), False
    for norm in ("input_layernorm", "post_attention_layernorm"):
      yield f"{hf}{norm}.weight", (*lc, norm, "scale"), False
  yield "model.norm.weight", ("norm", "scale"), False
  if not cfg.tie_embeddings:
    yield "lm_head.weight", ("lm_head", "kernel"), True


def load_pretrained(path: str, *, dtype=jnp.float32):
  """Loads a transformers checkpoint folder into an lcjax model.

  Args:
    path: folder with `config.json` and `model.safetensors` (or a sharded index).
    dtype: parameter dtype (float32 default; compute dtype is `model_config.dtype`).

  Returns:
    (model, model_config).
  """
  cfg = config_from_hf(read_config(path), source=os.path.join(path, CONFIG_FILE))
  if cfg.family == "mamba2":
    return hf_mamba2.load_weights(path, cfg, dtype=dtype), cfg

  files = tensor_files(path)
  expected = list(_hf_names(cfg))
  missing = [name for name, _, _ in expected if name not in files]
  if missing:
    raise CheckpointError(
      f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all) for "
      f"model_type {cfg.hf_model_type!r}"
    )
  known = {name for name, _, _ in expected} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
  unexpected = sorted(n for n in files if n not in known and not _IGNORED_TENSORS.match(n))
  if unexpected:
    raise CheckpointError(
      f"{path}: tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all) has no place in "
      f"an lcjax {cfg.hf_model_type} model; is config.json the right one for these weights?"
    )
  tensors = read_tensors(files, [name for name, _, _ in expected])

  abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  # HF names one layer at a time; a scanned model's stack is filled per layer, then stacked.
  stacked = has_layer_stack(nnx.to_pure_dict(state))
  pure = unstack_layers(nnx.to_pure_dict(state))
  for name, lc_path, transpose in expected:
    array = tensors[name].T if transpose else tensors[name]
    want = get_path(pure, lc_path).shape
    if array.shape != want:
      raise CheckpointError(
        f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but config.json implies "
        f"{tuple(want[::-1]) if transpose else tuple(want)}"
      )
    set_path(pure, lc_path, jnp.asarray(array.astype(np.float32), dtype=dtype))
  nnx.replace_by_pure_dict(state, stack_layers(pure) if stacked else pure)
  return nnx.merge(graphdef, state), cfg


def save_pretrained(model, model_config, path: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `config.json` and float32 safetensors that transformers loads.

  Shards larger models with `model.safetensors.index.json` like transformers.
  Files are written under temporary names and renamed, so an existing folder is
  never left half-overwritten; weight files of an earlier save are removed
  (`safetensors_io.write_checkpoint`).
  """
  hf = config_to_hf(model_config)
  if model_config.get("family") == "mamba2":
    tensors = hf_mamba2.hf_tensors(model, model_config)
  else:
    pure = unstack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = {}
    for name, lc_path, transpose in _hf_names(model_config):
      array = np.asarray(jax.device_get(get_path(pure, lc_path)), dtype=np.float32)
      tensors[name] = np.ascontiguousarray(array.T if transpose else array)
  write_checkpoint(path, tensors, hf, max_shard_bytes=max_shard_bytes)
