"""The `data` config section: its defaults (`default_data_config`) and its validation.

Every key is checked by `validate_data_config`, which `make_train_iterator`,
`make_eval_documents` and `lcjax.train.config.validate_config` call, so a bad value fails before
anything is read or traced, with one sentence naming the field and the fix.

Keys (defaults in parentheses):

- `source` (`kind="stdlib"`): the documents, for `lcjax.data.sources.build_source`; also the
  corpus of `make_eval_documents`. It holds every option of every source kind
  (`lcjax.data.sources.SOURCE_OPTIONS`: kind, path, text_field, one_document_per_line, split,
  name, data_dir, validation_fraction, splits, min_bytes, max_bytes), all but `kind` unset (None),
  so each can be set from the command line, e.g. `--config.data.source.kind=jsonl
  --config.data.source.path='/data/*.jsonl'` (`path` also takes a list literal,
  `'["a/*.jsonl", "b/*.jsonl"]'`, and `splits` a dict literal). Setting an option the kind does
  not read raises. A config file may also replace the whole dict
  (`c.data.source = dict(kind="jsonl", path=...)`), but then the command line can only set the
  keys that dict has; prefer `c.data.source.update(kind="jsonl", path=...)`.
- `tokenizer` (`kind="byte"`): for `lcjax.data.tokenizers.build_tokenizer`; likewise holds every
  tokenizer option (`TOKENIZER_OPTIONS`: kind, pad_vocab_to, path, vocab_size, bos_token,
  eos_token, pad_token), unset but `kind`.
- `seq_len` (int, 1024): row length; with decomposition, the longest piece allowed.
- `position_scheme` (`"global"`): `global`, `per_document` or `anchor` (AnchorAttention: every
  row starts with one shared BOS anchor and documents have no BOS of their own; needs
  `model.anchor=True`, checked by `lcjax.train.config.validate_config`, and cannot be combined
  with `decomposition`, whose rows are slices of one document without an anchor).
- `loss_weighting` (`"token"`): `token` or `document` (LWM: each document piece weighs 1 in the
  batch's loss, whatever its length; `lcjax.data.packing.row_loss_weights`).
- `mixture` (None): a list of `{"source": dict, "weight": float}` (optionally `"name"`); training
  then draws each row from one of these sources with those weights (ProLong) instead of `source`.
  From the command line, give it as a list literal:
  `--config.data.mixture='[{"source": {"kind": "jsonl", "path": "a/*.jsonl"}, "weight": 0.6},
  {"source": {"kind": "stdlib"}, "weight": 0.4}]'`.
- `decomposition` (None): a dict with keys `DECOMPOSITION_DEFAULTS` to train on Dataset
  Decomposition batches; `tokens_per_batch` defaults to `batch_size * 2^max_log2`, i.e.
  `batch_size` rows of the longest bucket. From the command line, a dict literal:
  `--config.data.decomposition='{"min_log2": 3}'` (`'{}'` for all defaults).
- `synthetic` (task unset): generated task rows instead of packed documents
  (`lcjax.data.synthetic`): `task` (one of `SYNTHETIC_TASKS`, e.g. "passkey") and that task's
  options (`SYNTHETIC_OPTIONS`, unset but what the task reads), e.g.
  `--config.data.synthetic.task=passkey --config.data.synthetic.lm_weight=0.1`. It trains on
  those rows alone: it cannot be combined with `mixture` or `decomposition`, and needs
  `loss_weighting="token"` (the task sets the weights) and `num_workers=0`.
- `shuffle` (True): reshuffle documents every epoch (else the source order every epoch).
- `split` (`"train"`): the source split to train on.
- `num_workers` (0): grain worker processes (`mp_prefetch`); 0 runs in the calling thread. With
  workers, each worker packs a slice of this process's documents.

Unset options are `ml_collections` placeholders (value None, with a type) rather than missing
keys because `config_flags` locks the config and only overrides keys that exist, and parses a
value by the key's type: `object` keys (`source.path`, `source.splits`, `mixture`,
`decomposition`) take Python literals and keep anything else as a string. None always means
"unset, use the default", here and in `build_source` / `build_tokenizer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np
from ml_collections.config_dict import placeholder

from lcjax.config import ConfigError
from lcjax.data.decomposition import CURRICULA, LONG_SPLITS
from lcjax.data.packing import LOSS_WEIGHTINGS, POSITION_SCHEMES
from lcjax.data.sources import SOURCE_OPTIONS, check_source_options
from lcjax.data.synthetic import SYNTHETIC_OPTIONS, check_synthetic_options
from lcjax.data.tokenizers import TOKENIZER_OPTIONS, check_tokenizer_options

__all__ = ["DECOMPOSITION_DEFAULTS", "default_data_config", "validate_data_config"]

DECOMPOSITION_DEFAULTS = {
  "min_log2": None,  # None: max_log2 - 5 (six buckets, as in the paper), at least 0
  "max_log2": None,  # None: log2(seq_len); seq_len must then be a power of two
  "tokens_per_batch": None,  # None: batch_size * 2^max_log2
  # The odds of each bucket (shortest first), weighted by the bucket's batches per cycle
  # (lcjax.data.decomposition): "grow" with base 2 is the paper's Grow-P2, 32:16:8:4:2:1;
  # "shrink", "uniform" (in proportion to the data) or a list of odds.
  "curriculum": "grow",
  "curriculum_base": 2.0,  # the base of grow and shrink (unused with a list of odds)
  "cycles_per_pass": 1,  # cycles of the curriculum per pass over the data (reference --epochs)
  "long_split": "random",  # documents over 2^(max_log2+1): random (get_binary) or fixed pieces
}

# Keys of older configs, with what replaced them.
_REMOVED_DECOMPOSITION_KEYS = {
  "curriculum_steps": "the curriculum now runs in cycles over the data; set cycles_per_pass",
}


def _unset_options(option_types: Mapping[str, type]) -> dict[str, Any]:
  """Typed None placeholders for every option but `kind`, so the command line can set them."""
  return {key: placeholder(kind) for key, kind in option_types.items() if key != "kind"}


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the full default `data` config (see the module docstring for each key)."""
  return ml_collections.ConfigDict(
    {
      "source": {"kind": "stdlib", **_unset_options(SOURCE_OPTIONS)},
      "tokenizer": {"kind": "byte", **_unset_options(TOKENIZER_OPTIONS)},
      "seq_len": 1024,
      "position_scheme": "global",
      "loss_weighting": "token",
      "mixture": placeholder(object),
      "decomposition": placeholder(object),
      "synthetic": {key: placeholder(kind) for key, kind in SYNTHETIC_OPTIONS.items()},
      "shuffle": True,
      "split": "train",
      "num_workers": 0,
    }
  )


def _plain(value: Any) -> Any:
  """ConfigDicts (and dicts/lists holding them) -> plain dicts and lists."""
  if isinstance(value, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {key: _plain(item) for key, item in value.items()}
  if isinstance(value, list | tuple):
    return [_plain(item) for item in value]
  return value


def _is_int(value: Any) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_component(
  value: Any, field: str, check_options: Callable[[Mapping[str, Any], str], None]
) -> dict:
  """The options a source/tokenizer dict sets (None-valued ones dropped), checked for its kind."""
  if not isinstance(value, Mapping) or not isinstance(value.get("kind"), str):
    raise ConfigError(f"{field} must be a dict with a 'kind' string, e.g. {{'kind': 'stdlib'}}")
  options = {key: item for key, item in value.items() if item is not None}
  check_options(options, field)
  return options


def _check_mixture(mixture: Any) -> list[dict] | None:
  if mixture is None:
    return None
  if not isinstance(mixture, list | tuple) or not mixture:
    raise ConfigError(
      "data.mixture must be None or a non-empty list of {'source': {...}, 'weight': w} dicts"
    )
  entries = []
  for i, entry in enumerate(mixture):
    field = f"data.mixture[{i}]"
    if not isinstance(entry, Mapping):
      raise ConfigError(f"{field} must be a dict {{'source': {{...}}, 'weight': w}}")
    unknown = sorted(set(entry) - {"source", "weight", "name"})
    if unknown:
      raise ConfigError(f"{field} has unknown keys {unknown}; use only source, weight and name")
    source = _check_component(entry.get("source"), f"{field}.source", check_source_options)
    weight = entry.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
      raise ConfigError(f"{field}.weight must be a non-negative number, got {weight!r}")
    if not math.isfinite(weight):
      raise ConfigError(f"{field}.weight must be finite, got {weight!r}")
    name = entry.get("name")
    name = f"{i}:{source['kind']}" if name is None else name
    entries.append({"source": source, "weight": float(weight), "name": str(name)})
  if sum(e["weight"] for e in entries) <= 0:
    raise ConfigError("data.mixture weights are all zero; give at least one source a weight > 0")
  return entries


def _check_decomposition(decomposition: Any, seq_len: int) -> dict | None:
  if decomposition is None:
    return None
  if not isinstance(decomposition, Mapping):
    raise ConfigError("data.decomposition must be None or a dict of DECOMPOSITION_DEFAULTS keys")
  for key, hint in _REMOVED_DECOMPOSITION_KEYS.items():
    if key in decomposition:
      raise ConfigError(f"data.decomposition.{key} was removed: {hint}")
  unknown = sorted(set(decomposition) - set(DECOMPOSITION_DEFAULTS))
  if unknown:
    raise ConfigError(
      f"data.decomposition has unknown keys {unknown}; known: {', '.join(DECOMPOSITION_DEFAULTS)}"
    )
  dd = {**DECOMPOSITION_DEFAULTS, **decomposition}
  if dd["max_log2"] is None:
    if seq_len & (seq_len - 1):
      raise ConfigError(
        f"data.seq_len={seq_len} is not a power of two; set data.decomposition.max_log2"
      )
    dd["max_log2"] = seq_len.bit_length() - 1
  if dd["min_log2"] is None:
    dd["min_log2"] = max(dd["max_log2"] - 5, 0)
  for key in ("min_log2", "max_log2"):
    if not _is_int(dd[key]) or dd[key] < 0:
      raise ConfigError(f"data.decomposition.{key} must be a non-negative int, got {dd[key]!r}")
  if dd["min_log2"] > dd["max_log2"]:
    raise ConfigError(
      f"data.decomposition.min_log2={dd['min_log2']} exceeds max_log2={dd['max_log2']}; "
      "lower min_log2"
    )
  if (1 << dd["max_log2"]) > seq_len:
    raise ConfigError(
      f"data.decomposition.max_log2={dd['max_log2']} gives pieces longer than "
      f"data.seq_len={seq_len}; lower max_log2 or raise seq_len"
    )
  tokens = dd["tokens_per_batch"]
  if tokens is not None and (not _is_int(tokens) or tokens <= 0 or tokens % (1 << dd["max_log2"])):
    raise ConfigError(
      f"data.decomposition.tokens_per_batch={tokens!r} must be a positive multiple of "
      f"2^max_log2={1 << dd['max_log2']}"
    )
  curriculum = dd["curriculum"]
  num_buckets = dd["max_log2"] - dd["min_log2"] + 1
  if isinstance(curriculum, list | tuple):
    if len(curriculum) != num_buckets or not all(
      _is_number(o) and math.isfinite(o) and o > 0 for o in curriculum
    ):
      raise ConfigError(
        f"data.decomposition.curriculum={list(curriculum)!r} must hold {num_buckets} positive "
        f"odds, one per bucket 2^{dd['min_log2']}..2^{dd['max_log2']} (shortest first)"
      )
    dd["curriculum"] = [float(o) for o in curriculum]
  elif curriculum not in CURRICULA:
    raise ConfigError(
      f"data.decomposition.curriculum={curriculum!r} is unknown; "
      f"choose one of {', '.join(CURRICULA)} or give a list of {num_buckets} odds"
    )
  base = dd["curriculum_base"]
  if not _is_number(base) or not math.isfinite(base) or not base > 0:
    raise ConfigError(f"data.decomposition.curriculum_base must be a number > 0, got {base!r}")
  if not _is_int(dd["cycles_per_pass"]) or dd["cycles_per_pass"] < 1:
    raise ConfigError(
      f"data.decomposition.cycles_per_pass must be an int >= 1, got {dd['cycles_per_pass']!r}"
    )
  if dd["long_split"] not in LONG_SPLITS:
    raise ConfigError(
      f"data.decomposition.long_split={dd['long_split']!r} is unknown; "
      f"choose one of {', '.join(LONG_SPLITS)}"
    )
  return dd


def _is_number(value: Any) -> bool:
  return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def validate_data_config(data_config: Any) -> dict[str, Any]:
  """Checks `data_config` (ConfigDict or dict) and returns it as a plain dict with defaults.

  `source`, `tokenizer` and each mixture entry's `source` come back holding only the options
  that are set (None-valued ones dropped). Raises `ConfigError` with one sentence naming the
  field and the fix.
  """
  config = _plain(data_config)
  if not isinstance(config, Mapping):
    raise ConfigError("the data config must be a ConfigDict or dict; see default_data_config()")
  defaults = _plain(default_data_config())
  unknown = sorted(set(config) - set(defaults))
  if unknown:
    raise ConfigError(
      f"data config field {unknown[0]!r} is unknown; known fields: {', '.join(sorted(defaults))}"
    )
  config = {**defaults, **config}
  config["source"] = _check_component(config["source"], "data.source", check_source_options)
  config["tokenizer"] = _check_component(
    config["tokenizer"], "data.tokenizer", check_tokenizer_options
  )
  if not _is_int(config["seq_len"]) or config["seq_len"] < 2:
    raise ConfigError(f"data.seq_len must be an int >= 2, got {config['seq_len']!r}")
  config["seq_len"] = int(config["seq_len"])
  if config["position_scheme"] not in POSITION_SCHEMES:
    raise ConfigError(
      f"data.position_scheme={config['position_scheme']!r} is unknown; "
      f"choose one of {', '.join(POSITION_SCHEMES)}"
    )
  if config["loss_weighting"] not in LOSS_WEIGHTINGS:
    raise ConfigError(
      f"data.loss_weighting={config['loss_weighting']!r} is unknown; "
      f"choose one of {', '.join(LOSS_WEIGHTINGS)}"
    )
  if not isinstance(config["shuffle"], bool):
    raise ConfigError(f"data.shuffle must be true or false, got {config['shuffle']!r}")
  if not isinstance(config["split"], str) or not config["split"]:
    raise ConfigError(f"data.split must be a split name such as 'train', got {config['split']!r}")
  if not _is_int(config["num_workers"]) or config["num_workers"] < 0:
    raise ConfigError(f"data.num_workers must be an int >= 0, got {config['num_workers']!r}")
  config["mixture"] = _check_mixture(config["mixture"])
  config["decomposition"] = _check_decomposition(config["decomposition"], config["seq_len"])
  if config["mixture"] is not None and config["decomposition"] is not None:
    raise ConfigError(
      "data.mixture and data.decomposition cannot be combined; set one of them to None"
    )
  if config["position_scheme"] == "anchor" and config["decomposition"] is not None:
    # A decomposed row is a slice of one document that starts with a content token, not with
    # the shared BOS anchor; with one document per row the anchor mask would change nothing.
    raise ConfigError(
      "data.position_scheme='anchor' needs packed rows that start with the shared BOS anchor, "
      "which data.decomposition does not build; set data.decomposition=None or use "
      "position_scheme='global' (and model.anchor=False)"
    )
  config["synthetic"] = _check_synthetic(config)
  return config


def _check_synthetic(config: dict) -> dict | None:
  """`data.synthetic`'s task options with defaults (None: off); the fields it excludes."""
  synthetic = config["synthetic"]
  if synthetic is not None and not isinstance(synthetic, Mapping):
    raise ConfigError("data.synthetic must be a dict such as {'task': 'passkey'}")
  options = check_synthetic_options(synthetic)
  if options is None:
    return None
  for field in ("mixture", "decomposition"):
    if config[field] is not None:
      raise ConfigError(
        f"data.synthetic.task={options['task']!r} trains on its own rows; set data.{field} to None"
      )
  if config["loss_weighting"] != "token":
    raise ConfigError(
      f"data.synthetic.task={options['task']!r} sets its own loss weights; set "
      "data.loss_weighting='token'"
    )
  if config["num_workers"]:
    raise ConfigError(
      f"data.synthetic.task={options['task']!r} rows are generated in the training process; "
      "set data.num_workers=0"
    )
  return options
