"""A run's model, optimizer, train state and batch, built from its config in one place.

Every entry point that turns a run config into something to execute goes through here:
training (`lcjax.train.loop`), evaluating or exporting a finished run
(`lcjax.train.evaluate`, `scripts/convert_hf.py`), the ahead-of-time compile for a pod
(`lcjax.train.aot`), the benchmarks and the studies. So the model a run trains, the one
its evaluation restores and the one a pod compile measures cannot drift apart.

  model, model_cfg = build_run_model(config)              # random, or from init_from
  setup = abstract_setup(config)                          # graphdef, optimizer, state shapes
  batch = batch_spec(config, mesh)                        # ShapeDtypeStructs of one batch
  params, model_cfg, step = load_run_params(workdir)      # newest complete checkpoint

Settings live in one place each: the attention implementation and its block sizes in
`config.attention`, the context-parallel strategy in `config.parallel`; a run's
`config.model` has no copy of them (`model_config_for_run` fills them in).
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from lcjax.config import ConfigError, require
from lcjax.data.packing import ROW_KEYS
from lcjax.interop.hf import config_from_hf, load_pretrained
from lcjax.interop.native import MODEL_CONFIG_FILE, load_params, read_model_config
from lcjax.interop.safetensors_io import CONFIG_FILE, read_config
from lcjax.models import build_model, default_model_config
from lcjax.models.stacking import adapt_to_stored, layers_layout
from lcjax.parallel.sharding import batch_sharding
from lcjax.train.checkpoint import Checkpointer
from lcjax.train.optim import make_optimizer
from lcjax.train.step import init_state, make_train_step

log = logging.getLogger(__name__)

__all__ = [
  "BATCH_KEYS",
  "RUNTIME_MODEL_FIELDS",
  "TRAINING_MODEL_FIELDS",
  "RunSetup",
  "abstract_setup",
  "batch_spec",
  "build_run_model",
  "init_model_config",
  "load_init",
  "load_run_params",
  "model_config_for_run",
  "model_from_params",
  "run_train_step",
]

# The arrays of one training batch, each [rows, seq_len]: what the packer emits
# (`lcjax.data.packing.ROW_KEYS`), plus `token_index` when a context-parallel layout
# permutes the tokens (`lcjax.parallel.layouts.apply_layout`).
BATCH_KEYS = ROW_KEYS
LAYOUT_KEYS = ("token_index",)
_FLOAT_KEYS = ("loss_weights",)

# Model-config fields whose one home in a run config is elsewhere: the attention section
# and the parallel section. `llama_config()` keeps them so a model can be built on its
# own (notebooks, benchmarks); a run fills them in from those sections.
# Model fields that say how the weights are computed with, not what they are: with
# `init_from` they come from the run's `config.model`, on top of the checkpoint's config.
TRAINING_MODEL_FIELDS = ("dtype", "remat", "ssd_impl", "scan_layers", "mlp_chunk")
RUNTIME_MODEL_FIELDS = {
  "attention_impl": "attention.impl",
  "attention_block_q": "attention.block_q",
  "attention_block_kv": "attention.block_kv",
  "context_strategy": "parallel.context_strategy",
}


def _section_value(config, dotted: str):
  section, field = dotted.split(".")
  return config[section][field]


def model_config_for_run(config, init_model_config=None) -> ml_collections.ConfigDict:
  """The model config a run builds: `config.model`, or the checkpoint's (`init_from`).

  The attention implementation, its block sizes and the context strategy come from
  `config.attention` and `config.parallel` (their one home), for families that have
  attention; a `config.model` or `model_overrides` that holds one of those fields with
  another value is an error naming both spellings.

  With a checkpoint (`init_model_config`), the architecture is the checkpoint's:
  `model_overrides` change fields on it, and the fields that only say how the weights
  are computed with (`TRAINING_MODEL_FIELDS`: compute dtype, remat, scan_layers,
  mlp_chunk) come from
  `config.model`. The other fields a config sets in `config.model` (away from its
  family's default) are replaced by the checkpoint's, and a warning lists each one
  that differs, so a recipe's model (e.g. the quickstart's) can be reused with any
  checkpoint without a setting being dropped unseen.
  """
  base = config.model if init_model_config is None else init_model_config
  cfg = base.copy_and_resolve_references()
  cfg.unlock()  # a copy of a locked run config's section; it gains the runtime fields
  if init_model_config is None:
    require(
      not config.model_overrides,
      f"model_overrides={_plain(config.model_overrides)} applies to an init_from checkpoint, "
      "but init_from is not set; set those fields in config.model instead",
    )
    for key in RUNTIME_MODEL_FIELDS:
      if key in cfg:
        _require_runtime_agrees(config, key, cfg[key], f"model.{key}")
  else:
    configured = _configured_model_fields(config.model)
    family_fields = default_model_config(cfg.get("family", "llama"))
    for key in TRAINING_MODEL_FIELDS:
      # A checkpoint config written before a field existed (scan_layers, mlp_chunk) lacks it.
      if key in configured and (key in cfg or key in family_fields):
        cfg[key] = configured[key]
    for key, value in config.model_overrides.items():
      require(key in cfg, f"model_overrides.{key} is not a model field; known: {sorted(cfg)}")
      _require_runtime_agrees(config, key, value, f"model_overrides.{key}")
      cfg[key] = value
    replaced = {
      key: value
      for key, value in configured.items()
      if key not in TRAINING_MODEL_FIELDS
      and key not in config.model_overrides
      and _plain(cfg.get(key)) != _plain(value)
    }
    if replaced:
      log.warning(
        "init_from %s: the checkpoint's model replaces config.model's %s; set "
        "model_overrides.FIELD to change a field of the checkpoint",
        config.init_from,
        ", ".join(
          f"{k}={_plain(v)!r} (checkpoint: {_plain(cfg.get(k))!r})" for k, v in replaced.items()
        ),
      )
  if "num_heads" in cfg:  # families without attention (mamba2) have none of these
    for key, dotted in RUNTIME_MODEL_FIELDS.items():
      cfg[key] = _section_value(config, dotted)
  return cfg


def _plain(value):
  """ConfigDicts and tuples as plain dicts and lists, so configured values compare."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_plain(v) for v in value]
  return value


def _configured_model_fields(model_section) -> dict:
  """The fields of a run's model section that differ from its family's defaults."""
  defaults = default_model_config(model_section.get("family", "llama"))
  return {
    key: model_section[key]
    for key in model_section
    if key not in RUNTIME_MODEL_FIELDS
    and (key not in defaults or _plain(model_section[key]) != _plain(defaults[key]))
  }


def _require_runtime_agrees(config, key: str, value, spelled: str) -> None:
  if key not in RUNTIME_MODEL_FIELDS:
    return
  home = RUNTIME_MODEL_FIELDS[key]
  require(
    value == _section_value(config, home),
    f"{spelled}={value!r} disagrees with config.{home}={_section_value(config, home)!r}, "
    f"the one home of this setting in a run config; set config.{home} instead",
  )


def build_run_model(config, *, seed: int | None = None) -> tuple[nnx.Module, Any]:
  """(model, model_config) of a run: from `init_from`, or random with `train.seed`."""
  if config.init_from is None:
    cfg = model_config_for_run(config)
    return build_model(cfg, rngs=nnx.Rngs(config.train.seed if seed is None else seed)), cfg
  params, init_cfg = load_init(config.init_from)
  cfg = model_config_for_run(config, init_cfg)
  # The loaded weights in a graph rebuilt with the run's fields (attention, rope overrides).
  return model_from_params(params, cfg), cfg


def init_model_config(path: str) -> ml_collections.ConfigDict:
  """The model config of what `init_from` names, from its config file alone (no weights)."""
  cfg = read_model_config(path)
  if cfg is not None:
    return cfg
  return config_from_hf(read_config(path), source=os.path.join(path, CONFIG_FILE))


def load_init(path: str) -> tuple[Any, ml_collections.ConfigDict]:
  """(params, model_config) of what `init_from` names, by what the folder holds.

  - an lcjax run folder (`model_config.json` + `checkpoints/`): its newest complete
    checkpoint's parameters (the optimizer state is not carried over);
  - an lcjax params folder (`model_config.json` + `params/`, `scripts/convert_hf.py --to lcjax`);
  - otherwise a Hugging Face folder (`config.json` + safetensors).
  """
  if read_model_config(path) is not None:
    if os.path.isdir(os.path.join(path, "checkpoints")):
      params, cfg, _ = load_run_params(path)
      return params, cfg
    model, cfg = load_params(path)
  else:
    model, cfg = load_pretrained(path)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg


def abstract_model(model_cfg) -> nnx.Module:
  """The model of `model_cfg` with ShapeDtypeStructs for parameters (no memory)."""
  return nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))


def model_from_params(params, model_cfg, rope: dict | None = None) -> nnx.Module:
  """The model of `model_cfg` holding `params`; with `rope`, another RoPE dict (same weights).

  RoPE has no parameters, so a trained model evaluates under YaRN, NTK, ... by
  rebuilding the graph with another `rope` dict (`eval.rope_variants`).
  """
  cfg = model_cfg
  if rope is not None:
    require("rope" in model_cfg, f"model.family={model_cfg.family!r} has no RoPE to swap")
    cfg = model_cfg.copy_and_resolve_references()
    cfg.rope = dict(rope)
    if "max_position_embeddings" in rope:
      cfg.max_position_embeddings = rope["max_position_embeddings"]
  graphdef, abstract = nnx.split(abstract_model(cfg), nnx.Param)
  # Weights saved by a scanned model into an unrolled one, or the reverse (model.scan_layers).
  _, to_model_layout = adapt_to_stored(nnx.to_pure_dict(abstract), layers_layout(params))
  return nnx.merge(graphdef, to_model_layout(params))


class RunSetup(NamedTuple):
  """What a train step is built from, without memory: for compiling, restoring, shapes."""

  model_cfg: Any
  graphdef: Any  # the model graph without its parameters (nnx.split(model, nnx.Param))
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state: Any  # the train-state pytree ({params, opt_state, step, rng}) of ShapeDtypeStructs
  n_params: int


def abstract_setup(config, model_cfg=None) -> RunSetup:
  """The run's graph, optimizer and abstract train state (`jax.eval_shape`: no memory)."""
  model_cfg = model_config_for_run(config) if model_cfg is None else model_cfg
  model = abstract_model(model_cfg)
  graphdef, params = nnx.split(model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  tx, schedule = make_optimizer(config.train, pure)
  state = jax.eval_shape(lambda: init_state(build_model(model_cfg, rngs=nnx.Rngs(0)), tx, 0))
  n_params = sum(int(x.size) for x in jax.tree.leaves(pure))
  return RunSetup(model_cfg, graphdef, tx, schedule, state, n_params)


def run_train_step(config, setup: RunSetup, *, document_mask: bool = True):
  """The jitted train step of this run (`lcjax.train.step.make_train_step`).

  `document_mask=False` ignores the batch's segment ids (one document per row), for
  benchmarks that compare with models that have no document mask.
  """
  return make_train_step(
    setup.graphdef,
    setup.tx,
    setup.schedule,
    grad_accum=config.train.grad_accum,
    loss_chunk=config.train.loss_chunk,
    document_mask=document_mask,
  )


def batch_spec(config, mesh: Mesh | None = None, *, rows: int | None = None) -> dict[str, Any]:
  """ShapeDtypeStructs of one global batch (`BATCH_KEYS`, + `token_index` with context > 1).

  With `mesh`, each carries the batch sharding: rows over ('data', 'fsdp'), the sequence
  over 'context'. `rows` defaults to `train.batch_size`.
  """
  rows = config.train.batch_size if rows is None else rows
  shape = (rows, config.data.seq_len)
  sharding = None if mesh is None else batch_sharding(mesh)
  keys = BATCH_KEYS
  if mesh is not None and mesh.shape["context"] > 1:
    keys = keys + LAYOUT_KEYS
  return {
    key: jax.ShapeDtypeStruct(
      shape, jnp.float32 if key in _FLOAT_KEYS else jnp.int32, sharding=sharding
    )
    for key in keys
  }


def load_run_params(workdir: str, *, step: int | None = None, config=None):
  """(params, model_config, step) of a run folder's newest complete checkpoint (or `step`).

  The model config is WORKDIR/model_config.json, written when the run started; for runs
  that predate it, `config` (the run config) rebuilds it. Only the parameters are read:
  the optimizer state is not needed to evaluate or export.
  """
  model_cfg = read_model_config(workdir)
  if model_cfg is None:
    if config is None or config.init_from is not None:
      raise FileNotFoundError(
        f"{os.path.join(workdir, MODEL_CONFIG_FILE)}: not found; is {workdir} an lcjax run "
        "folder (scripts/train.py --workdir)?"
      )
    model_cfg = model_config_for_run(config)
  elif config is not None:  # evaluation may change the attention settings, not the model
    for key, dotted in RUNTIME_MODEL_FIELDS.items():
      if key in model_cfg:
        model_cfg[key] = _section_value(config, dotted)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: not found; the run in {workdir} saved no checkpoint")
  checkpointer = Checkpointer(directory, keep=1_000_000, async_save=False)
  try:
    steps = checkpointer.steps()
    if not steps:
      raise FileNotFoundError(f"{directory} has no complete checkpoint")
    if step is not None and step not in steps:
      raise ConfigError(f"{directory} has no checkpoint of step {step}; it has steps {steps}")
    params_abstract = nnx.to_pure_dict(nnx.state(abstract_model(model_cfg), nnx.Param))
    step, params = checkpointer.restore_params(params_abstract, step=step)
  finally:
    checkpointer.close()
  return params, model_cfg, step
