"""Safetensors folder I/O shared by the Hugging Face interop modules.

A transformers checkpoint folder holds `config.json` and either one
`model.safetensors` or shards `model-XXXXX-of-YYYYY.safetensors` listed in
`model.safetensors.index.json` (`{"metadata": {"total_size": ...}, "weight_map":
{tensor name: shard file}}`), the layout `transformers.PreTrainedModel.save_pretrained`
writes (transformers/modeling_utils.py, `save_pretrained`; shards split as in
huggingface_hub's `split_torch_state_dict_into_shards`). Tensors go through
safetensors' numpy API (bfloat16 via ml_dtypes), so no torch is needed.

`lcjax.interop.hf` (llama, mistral, qwen2) and `lcjax.interop.hf_mamba2` both build
on these functions; this module imports neither.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

__all__ = [
  "CheckpointError",
  "CONFIG_FILE",
  "INDEX_FILE",
  "SINGLE_FILE",
  "read_config",
  "tensor_files",
  "read_tensors",
  "write_checkpoint",
  "get_path",
  "set_path",
]

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# transformers' own weight file names: the only files `write_checkpoint` deletes.
_WEIGHT_FILE = re.compile(
  r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$"
)


class CheckpointError(ValueError):
  """A checkpoint folder lcjax cannot read; the message names the file and key."""


# ---------------------------------------------------------------------------- reading


def read_config(path: str) -> dict[str, Any]:
  """The parsed `config.json` of checkpoint folder `path`.

  Raises:
    CheckpointError: the file is absent or not valid JSON (the message names it).
  """
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise CheckpointError(f"{config_path}: not found; a Hugging Face folder needs {CONFIG_FILE}")
  with open(config_path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None


def tensor_files(path: str) -> dict[str, str]:
  """Tensor name → safetensors file path for every tensor of folder `path`.

  Reads the `weight_map` of `model.safetensors.index.json` when the folder is
  sharded (as transformers' `_get_resolved_checkpoint_files` prefers the index),
  else the tensor names of `model.safetensors`. Shard files are not opened here;
  `read_tensors` checks they exist.

  Raises:
    CheckpointError: neither file exists, or the index has no `weight_map` dict.
  """
  index_path = os.path.join(path, INDEX_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index_path}: has no 'weight_map' dict")
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, SINGLE_FILE)
  if not os.path.exists(single):
    raise CheckpointError(
      f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; lcjax reads safetensors checkpoints only"
    )
  with safe_open(single, framework="numpy") as f:
    return {name: single for name in f.keys()}


def read_tensors(files: dict[str, str], names: list[str]) -> dict[str, np.ndarray]:
  """Reads tensors `names` (keys of `files`, from `tensor_files`) as numpy arrays.

  Each file is opened once. Arrays keep their stored dtype (bfloat16 arrives as
  ml_dtypes.bfloat16).

  Raises:
    CheckpointError: a listed shard does not exist, or does not hold a tensor the
      index assigns to it.
  """
  by_file: dict[str, list[str]] = {}
  for name in names:
    by_file.setdefault(files[name], []).append(name)
  out = {}
  for file, file_names in by_file.items():
    if not os.path.exists(file):
      raise CheckpointError(f"{file}: shard listed in {INDEX_FILE} does not exist")
    with safe_open(file, framework="numpy") as f:
      present = set(f.keys())
      for name in file_names:
        if name not in present:
          raise CheckpointError(f"{file}: tensor {name!r} listed in the index is not in the file")
        out[name] = f.get_tensor(name)
  return out


# ---------------------------------------------------------------------------- writing


def _shard(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
  """Splits `tensors` in order into shards of at most `max_shard_bytes` (one tensor may exceed)."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors.items():
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  return shards


def write_checkpoint(
  path: str,
  tensors: dict[str, np.ndarray],
  config: dict[str, Any],
  *,
  max_shard_bytes: int = 5 * 2**30,
) -> None:
  """Writes `config.json` and `tensors` as a folder transformers' `from_pretrained` loads.

  One `model.safetensors` when the tensors fit in `max_shard_bytes`, else shards
  `model-XXXXX-of-YYYYY.safetensors` plus `model.safetensors.index.json`, named as
  transformers' `save_pretrained` names them, with safetensors metadata
  `{"format": "pt"}`. Every file is first written under a temporary name
  (`.NAME.tmp`) and renamed once all are written, so an existing folder is never
  left half-overwritten; weight files of an earlier save that this one does not
  replace (old shards, an old index) are then deleted so a stale index cannot
  point the next load at old shards. Other files in the folder are left alone.

  Args:
    path: output folder (created if needed).
    tensors: HF tensor name → array in HF layout; written in this order.
    config: the `config.json` dict.
    max_shard_bytes: largest shard size in bytes (a single larger tensor gets its own shard).
  """
  shards = _shard(tensors, max_shard_bytes)
  os.makedirs(path, exist_ok=True)
  written: list[tuple[str, str]] = []  # (tmp, final)

  def stage(final_name: str) -> str:
    tmp = os.path.join(path, f".{final_name}.tmp")
    written.append((tmp, os.path.join(path, final_name)))
    return tmp

  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], stage(SINGLE_FILE), metadata=meta)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, stage(file), metadata=meta)
      weight_map.update({name: file for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(stage(INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(stage(CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  for tmp, final in written:
    os.replace(tmp, final)
  keep = {os.path.basename(final) for _, final in written}
  for name in os.listdir(path):
    if _WEIGHT_FILE.match(name) and name not in keep:
      os.remove(os.path.join(path, name))


# ---------------------------------------------------------------------------- nested dicts


def get_path(tree: dict, path: tuple):
  """`tree[path[0]][path[1]]...`: the leaf of an `nnx.to_pure_dict` state at `path`."""
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: dict, path: tuple, value) -> None:
  """Replaces the existing leaf of `tree` at `path` with `value`.

  Raises:
    KeyError: the leaf does not exist (a parameter path the model does not have).
  """
  for key in path[:-1]:
    tree = tree[key]
  if path[-1] not in tree:
    raise KeyError(path)
  tree[path[-1]] = value
