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
from lcjax.models.stacking import adapt_to_stored, layers_layout

__all__ = [
  "MODEL_CONFIG_FILE",
  "load_params",
  "read_model_config",
  "save_params",
  "write_model_config",
]


MODEL_CONFIG_FILE = "model_config.json"


def write_model_config(model_config, folder: str) -> None:
  """Writes `folder/model_config.json` (the lcjax model fields), atomically."""
  path = os.path.join(folder, MODEL_CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(model_config.to_json(indent=2, sort_keys=True))
  os.replace(tmp, path)


def read_model_config(folder: str) -> ml_collections.ConfigDict | None:
  """The model config in `folder/model_config.json`, or None when there is none."""
  path = os.path.join(folder, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    fields = json.load(f)
  if isinstance(fields.get("layer_types"), list):  # a tuple in the config, a list in JSON
    fields["layer_types"] = tuple(fields["layer_types"])
  if fields.get("remat") == "dots":  # the same policy, renamed save_dots (lcjax.models.remat)
    fields["remat"] = "save_dots"
  return ml_collections.ConfigDict(fields)


def save_params(model, model_config, path: str) -> None:
  """Writes `path/params` (orbax, the model's nnx.Param state) and `path/model_config.json`."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  state = nnx.state(model, nnx.Param)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), nnx.to_pure_dict(state), force=True)
  write_model_config(model_config, path)


def load_params(path: str):
  """Returns (model, model_config) from a folder written by `save_params`."""
  path = os.path.abspath(path)
  cfg = read_model_config(path)
  if cfg is None:
    raise FileNotFoundError(
      f"{os.path.join(path, MODEL_CONFIG_FILE)}: not found; is {path} an lcjax params folder?"
    )
  abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  with ocp.StandardCheckpointer() as ckptr:
    folder = os.path.join(path, "params")
    # Folders written before model.scan_layers hold per-layer parameters (and the reverse).
    stored = layers_layout(ckptr.metadata(folder).item_metadata.tree)
    restore_target, convert = adapt_to_stored(target, stored)
    pure = convert(ckptr.restore(folder, restore_target))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state), cfg
