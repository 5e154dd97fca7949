"""Hugging Face interop for Mamba-2: transformers' `Mamba2ForCausalLM` config and weights.

`lcjax.interop.hf.load_pretrained` / `save_pretrained` / `config_from_hf` /
`config_to_hf` hand `model_type == "mamba2"` to the functions here; this module
does not import `lcjax.interop.hf` (folder I/O is `lcjax.interop.safetensors_io`).
The forward pass matches transformers 5.x's torch path in float32
(tests/test_mamba2.py). Weight names:

  backbone.embeddings.weight             embed_tokens.embedding
  backbone.layers.{i}.norm.weight        layers.{i}.norm.scale
  backbone.layers.{i}.mixer.in_proj.*    layers.{i}.mixer.in_proj.*   (Linear: transposed)
  backbone.layers.{i}.mixer.conv1d.*     layers.{i}.mixer.conv1d.*    ([C,1,K] weight, [K,C] kernel)
  backbone.layers.{i}.mixer.{dt_bias,A_log,D}                         (same names)
  backbone.layers.{i}.mixer.norm.weight  layers.{i}.mixer.norm.scale  (gated RMSNorm)
  backbone.layers.{i}.mixer.out_proj.*   layers.{i}.mixer.out_proj.*  (Linear: transposed)
  backbone.norm_f.weight                 norm.scale
  lm_head.weight                         lm_head.kernel (absent when embeddings are tied)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.interop.safetensors_io import (
  CheckpointError,
  get_path,
  read_tensors,
  set_path,
  tensor_files,
)
from lcjax.models import build_model
from lcjax.models.mamba2 import mamba2_config, num_heads, validate_mamba2_config

__all__ = ["config_from_hf", "config_to_hf", "hf_tensors", "load_weights", "hf_tensor_names"]

# transformers 5.x Mamba2Config defaults for keys a config.json may omit.
_HF_DEFAULTS = dict(
  state_size=128,
  expand=2,
  head_dim=64,
  num_heads=128,
  n_groups=8,
  conv_kernel=4,
  chunk_size=256,
  layer_norm_epsilon=1e-5,
  use_bias=False,
  use_conv_bias=True,
  residual_in_fp32=True,
  time_step_min=0.001,
  time_step_max=0.1,
  time_step_floor=1e-4,
  time_step_limit=(0.0, math.inf),
  tie_word_embeddings=False,
  initializer_range=0.1,
)
# Older checkpoints (mamba_ssm, early transformers) name the embedding this way;
# transformers' Mamba2Model renames it on load, and so do we.
_OLD_EMBEDDING = "backbone.embedding.weight"


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json"):
  """Maps a transformers `Mamba2Config` dict to an lcjax `mamba2_config`."""
  for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
    if key not in hf:
      raise CheckpointError(f"{source}: required key {key!r} is missing")
  get = lambda key: hf.get(key, _HF_DEFAULTS[key])
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"{source}: hidden_act={act!r} is not supported; lcjax implements silu")
  if hf.get("norm_before_gate", False):
    raise CheckpointError(
      f"{source}: norm_before_gate=True is not supported; lcjax (like transformers' Mamba2) "
      "computes norm(y * silu(z))"
    )
  if not hf.get("rms_norm", True):
    raise CheckpointError(
      f"{source}: rms_norm=False is not supported; Mamba-2 uses a gated RMSNorm"
    )
  expand = get("expand")
  if not isinstance(expand, int):
    raise CheckpointError(f"{source}: expand={expand!r} is not supported; lcjax needs an integer")
  hidden, heads, head_dim = hf["hidden_size"], get("num_heads"), get("head_dim")
  if heads * head_dim != expand * hidden:
    raise CheckpointError(
      f"{source}: num_heads*head_dim={heads * head_dim} must equal expand*hidden_size="
      f"{expand * hidden}"
    )
  cfg = mamba2_config(
    vocab_size=hf["vocab_size"],
    d_model=hidden,
    num_layers=hf["num_hidden_layers"],
    d_state=get("state_size"),
    d_conv=get("conv_kernel"),
    expand=expand,
    head_dim=head_dim,
    n_groups=get("n_groups"),
    chunk_size=get("chunk_size"),
    rms_norm_eps=get("layer_norm_epsilon"),
    tie_embeddings=bool(get("tie_word_embeddings")),
    dt_min=get("time_step_min"),
    dt_max=get("time_step_max"),
    dt_init_floor=get("time_step_floor"),
    time_step_limit=tuple(_float(v, source) for v in get("time_step_limit")),
    use_conv_bias=bool(get("use_conv_bias")),
    use_bias=bool(get("use_bias")),
    residual_in_fp32=bool(get("residual_in_fp32")),
    initializer_range=get("initializer_range"),
  )
  validate_mamba2_config(cfg)
  return cfg


def _float(value, source: str) -> float:
  """A float from config.json; transformers 5 writes inf as {"__float__": "Infinity"}."""
  if isinstance(value, dict) and set(value) == {"__float__"}:
    value = value["__float__"]
  try:
    return float(value)
  except (TypeError, ValueError):
    raise CheckpointError(f"{source}: time_step_limit entry {value!r} is not a number") from None


def config_to_hf(cfg) -> dict[str, Any]:
  """The transformers `config.json` dict (`Mamba2ForCausalLM`) for an lcjax mamba2 config.

  An infinite time_step_limit bound is written as a float (JSON `Infinity`), which
  transformers 4.x and 5.x both read.
  """
  validate_mamba2_config(cfg)
  return dict(
    model_type="mamba2",
    architectures=["Mamba2ForCausalLM"],
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.d_model,
    num_hidden_layers=cfg.num_layers,
    state_size=cfg.d_state,
    expand=cfg.expand,
    head_dim=cfg.head_dim,
    num_heads=num_heads(cfg),
    n_groups=cfg.n_groups,
    conv_kernel=cfg.d_conv,
    chunk_size=cfg.chunk_size,
    layer_norm_epsilon=cfg.rms_norm_eps,
    use_bias=cfg.use_bias,
    use_conv_bias=cfg.use_conv_bias,
    hidden_act="silu",
    residual_in_fp32=cfg.residual_in_fp32,
    time_step_min=cfg.dt_min,
    time_step_max=cfg.dt_max,
    time_step_floor=cfg.dt_init_floor,
    time_step_limit=[float(v) for v in cfg.time_step_limit],
    tie_word_embeddings=cfg.tie_embeddings,
    initializer_range=cfg.initializer_range,
    dtype="float32",
  )


# Layouts: copy as is; linear ([out, in] in HF, [in, out] here); conv ([C, 1, K] ↔ [K, C]).
_TO_LCJAX = {
  "copy": lambda a: a,
  "linear": lambda a: a.T,
  "conv": lambda a: a[:, 0, :].T,
}
_TO_HF = {
  "copy": lambda a: a,
  "linear": lambda a: a.T,
  "conv": lambda a: a.T[:, None, :],
}


def hf_tensor_names(cfg) -> Iterator[tuple[str, tuple, str]]:
  """(HF tensor name, lcjax state path, layout) for every parameter."""
  yield "backbone.embeddings.weight", ("embed_tokens", "embedding"), "copy"
  for i in range(cfg.num_layers):
    hf, lc = f"backbone.layers.{i}.", ("layers", i)
    mixer, lc_mixer = f"{hf}mixer.", (*lc, "mixer")
    yield f"{hf}norm.weight", (*lc, "norm", "scale"), "copy"
    yield f"{mixer}in_proj.weight", (*lc_mixer, "in_proj", "kernel"), "linear"
    if cfg.use_bias:
      yield f"{mixer}in_proj.bias", (*lc_mixer, "in_proj", "bias"), "copy"
    yield f"{mixer}conv1d.weight", (*lc_mixer, "conv1d", "kernel"), "conv"
    if cfg.use_conv_bias:
      yield f"{mixer}conv1d.bias", (*lc_mixer, "conv1d", "bias"), "copy"
    for name in ("dt_bias", "A_log", "D"):
      yield f"{mixer}{name}", (*lc_mixer, name), "copy"
    yield f"{mixer}norm.weight", (*lc_mixer, "norm", "scale"), "copy"
    yield f"{mixer}out_proj.weight", (*lc_mixer, "out_proj", "kernel"), "linear"
    if cfg.use_bias:
      yield f"{mixer}out_proj.bias", (*lc_mixer, "out_proj", "bias"), "copy"
  yield "backbone.norm_f.weight", ("norm", "scale"), "copy"
  if not cfg.tie_embeddings:
    yield "lm_head.weight", ("lm_head", "kernel"), "linear"


def load_weights(path: str, cfg, *, dtype=jnp.float32):
  """Builds the lcjax Mamba2LM for `cfg` with the safetensors weights in `path`."""
  files = tensor_files(path)
  on_disk: dict[str, str] = {}  # our name → the checkpoint's, where they differ
  if "backbone.embeddings.weight" not in files and _OLD_EMBEDDING in files:
    on_disk["backbone.embeddings.weight"] = _OLD_EMBEDDING
    files = dict(files)
    files["backbone.embeddings.weight"] = files.pop(_OLD_EMBEDDING)
  expected = list(hf_tensor_names(cfg))
  missing = [name for name, _, _ in expected if name not in files]
  if missing:
    raise CheckpointError(
      f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all) for "
      "model_type 'mamba2'"
    )
  known = {name for name, _, _ in expected} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
  unexpected = sorted(n for n in files if n not in known)
  if unexpected:
    raise CheckpointError(
      f"{path}: tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all) has no place in "
      "an lcjax mamba2 model; is config.json the right one for these weights?"
    )
  raw = read_tensors(
    {on_disk.get(n, n): f for n, f in files.items()}, [on_disk.get(n, n) for n, _, _ in expected]
  )
  tensors = {name: raw[on_disk.get(name, name)] for name, _, _ in expected}

  abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  for name, lc_path, layout in expected:
    array, want = tensors[name], get_path(pure, lc_path).shape
    if layout == "conv" and (array.ndim != 3 or array.shape[1] != 1):
      raise CheckpointError(f"{path}: tensor {name!r} has shape {array.shape}; expected [C, 1, K]")
    array = _TO_LCJAX[layout](array)
    if array.shape != want:
      raise CheckpointError(
        f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but config.json implies "
        f"{tuple(_TO_HF[layout](np.zeros(want)).shape)}"
      )
    set_path(pure, lc_path, jnp.asarray(array.astype(np.float32), dtype=dtype))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def hf_tensors(model, cfg) -> dict[str, np.ndarray]:
  """HF name → float32 numpy array (HF layout) for every parameter of a Mamba2LM."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tensors = {}
  for name, lc_path, layout in hf_tensor_names(cfg):
    array = np.asarray(jax.device_get(get_path(pure, lc_path)), dtype=np.float32)
    tensors[name] = np.ascontiguousarray(_TO_HF[layout](array))
  return tensors
