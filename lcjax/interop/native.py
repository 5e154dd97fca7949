"""lcjax's own parameter checkpoints: orbax params + the lcjax model config.

A folder holds `model_config.json` (lcjax fields) and `params/` (an orbax
checkpoint of the model's `nnx.Param` state). `scripts/convert_hf.py` converts
between this and Hugging Face folders.
"""

from __future__ import annotations

import json
import os

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from lcjax.models import build_model

__all__ = ["save_params", "load_params"]


def save_params(model, model_config, path: str) -> None:
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  state = nnx.state(model, nnx.Param)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), nnx.to_pure_dict(state), force=True)
  with open(os.path.join(path, "model_config.json"), "w") as f:
    f.write(model_config.to_json(indent=2, sort_keys=True))


def load_params(path: str):
  """Returns (model, model_config) from a folder written by `save_params`."""
  path = os.path.abspath(path)
  config_path = os.path.join(path, "model_config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path}: not found; is {path} an lcjax params folder?")
  with open(config_path) as f:
    fields = json.load(f)
  if isinstance(fields.get("layer_types"), list):
    fields["layer_types"] = tuple(fields["layer_types"])
  cfg = ml_collections.ConfigDict(fields)
  abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  with ocp.StandardCheckpointer() as ckptr:
    pure = ckptr.restore(os.path.join(path, "params"), target)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state), cfg
