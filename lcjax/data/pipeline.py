"""The checkpointable grain training pipeline: source -> tokenizer -> packer/mixture/DD -> batches.

`make_train_iterator(data_config, batch_size=..., seed=...)` yields dicts of numpy arrays
`tokens, targets, segment_ids, positions, loss_weights`, each `[batch_size, seq_len]` (int32,
`loss_weights` float32), with the row semantics of `lcjax.data.packing`. With
`data.decomposition` set, batches are Dataset Decomposition batches instead
(`lcjax.data.decomposition`): `[tokens_per_batch / 2^k, 2^k]` with `k` varying per step.

Order. Each source's documents are sharded by process first (process `i` of `n` takes documents
`i, i + n, i + 2n, ...` of the source, so processes never share a document and each packs its own
rows), then read in an order reshuffled at every epoch (grain's index shuffle, seeded by `seed`
and the source's position in the mixture, folded with the epoch), without end. `batch_size` is the
number of rows this process yields per batch (the per-process batch).

Checkpoints. `get_state()` returns a small JSON-serializable dict: the batch layout (checked on
restore) and the grain iterator state, which for the default single-threaded pipeline is the
packer's stream cursor, offset into the current document and counters (one per mixture source,
plus the number of mixture draws), or the DD step and per-bucket cursors. `set_state()` on any
iterator built from the same config gives the identical next batches.

Config (`default_data_config()`; every key is checked by `validate_data_config`):

- `source` (dict, `{"kind": "stdlib"}`): for `lcjax.data.sources.build_source`; also the corpus of
  `make_eval_documents`.
- `tokenizer` (dict, `{"kind": "byte"}`): for `lcjax.data.tokenizers.build_tokenizer`.
- `seq_len` (int, 1024): row length; with decomposition, the longest piece allowed.
- `position_scheme` (`"global"`): `global`, `per_document` or `anchor`.
- `loss_weighting` (`"token"`): `token` or `document` (LWM: each document weighs equally).
- `mixture` (None): a list of `{"source": dict, "weight": float}` (optionally `"name"`); training
  then draws each row from one of these sources with those weights (ProLong) instead of `source`.
- `decomposition` (None): a dict with keys `DECOMPOSITION_DEFAULTS` to train on Dataset
  Decomposition batches; `tokens_per_batch` defaults to `batch_size * 2^max_log2`, i.e.
  `batch_size` rows of the longest bucket.
- `shuffle` (True): reshuffle documents every epoch (else the source order every epoch).
- `split` (`"train"`): the source split to train on.
- `num_workers` (0): grain worker processes (`mp_prefetch`); 0 runs in the calling thread. With
  workers, each worker packs a slice of this process's documents.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from lcjax.config import ConfigError
from lcjax.data.decomposition import CURRICULA, DecomposedBatcher
from lcjax.data.mixture import MixedStream
from lcjax.data.packing import (
  COUNTER_KEYS,
  LOSS_WEIGHTINGS,
  POSITION_SCHEMES,
  DocumentPacker,
  frame_document,
)

__all__ = [
  "DECOMPOSITION_DEFAULTS",
  "TrainIterator",
  "default_data_config",
  "make_eval_documents",
  "make_train_iterator",
  "validate_data_config",
]

DECOMPOSITION_DEFAULTS = {
  "min_log2": None,  # None: max_log2 - 5 (six buckets, as in the paper), at least 0
  "max_log2": None,  # None: log2(seq_len); seq_len must then be a power of two
  "tokens_per_batch": None,  # None: batch_size * 2^max_log2
  "curriculum": "grow",
  "curriculum_base": 2.0,
  "curriculum_steps": 1000,
}


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the full default `data` config (see the module docstring for each key)."""
  return ml_collections.ConfigDict(
    {
      "source": {"kind": "stdlib"},
      "tokenizer": {"kind": "byte"},
      "seq_len": 1024,
      "position_scheme": "global",
      "loss_weighting": "token",
      "mixture": None,
      "decomposition": None,
      "shuffle": True,
      "split": "train",
      "num_workers": 0,
    }
  )


# Seams to the source and tokenizer registries, imported lazily (tests replace them).
def _build_source(source_config: dict, split: str) -> grain.MapDataset:
  from lcjax.data.sources import build_source

  return build_source(source_config, split)


def _build_tokenizer(tokenizer_config: dict) -> Any:
  from lcjax.data.tokenizers import build_tokenizer

  return build_tokenizer(tokenizer_config)


def _undecodable_errors() -> tuple[type[BaseException], ...]:
  from lcjax.data.tokenizers import UndecodableDocument

  return (UndecodableDocument, UnicodeError)


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


def _check_component(value: Any, field: str) -> dict:
  if not isinstance(value, Mapping) or not isinstance(value.get("kind"), str):
    raise ConfigError(f"{field} must be a dict with a 'kind' string, e.g. {{'kind': 'stdlib'}}")
  return dict(value)


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
    source = _check_component(entry.get("source"), f"{field}.source")
    weight = entry.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
      raise ConfigError(f"{field}.weight must be a non-negative number, got {weight!r}")
    if not math.isfinite(weight):
      raise ConfigError(f"{field}.weight must be finite, got {weight!r}")
    name = entry.get("name", f"{i}:{source['kind']}")
    entries.append({"source": source, "weight": float(weight), "name": str(name)})
  if sum(e["weight"] for e in entries) <= 0:
    raise ConfigError("data.mixture weights are all zero; give at least one source a weight > 0")
  return entries


def _check_decomposition(decomposition: Any, seq_len: int) -> dict | None:
  if decomposition is None:
    return None
  if not isinstance(decomposition, Mapping):
    raise ConfigError("data.decomposition must be None or a dict of DECOMPOSITION_DEFAULTS keys")
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
  if dd["curriculum"] not in CURRICULA:
    raise ConfigError(
      f"data.decomposition.curriculum={dd['curriculum']!r} is unknown; "
      f"choose one of {', '.join(CURRICULA)}"
    )
  base = dd["curriculum_base"]
  if isinstance(base, bool) or not isinstance(base, int | float) or not base > 0:
    raise ConfigError(f"data.decomposition.curriculum_base must be a number > 0, got {base!r}")
  if not _is_int(dd["curriculum_steps"]) or dd["curriculum_steps"] < 1:
    raise ConfigError(
      f"data.decomposition.curriculum_steps must be an int >= 1, got {dd['curriculum_steps']!r}"
    )
  return dd


def validate_data_config(data_config: Any) -> dict[str, Any]:
  """Checks `data_config` (ConfigDict or dict) and returns it as a plain dict with defaults.

  Raises `ConfigError` with one sentence naming the field and the fix.
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
  config["source"] = _check_component(config["source"], "data.source")
  config["tokenizer"] = _check_component(config["tokenizer"], "data.tokenizer")
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
  return config


class _StreamDataset(grain.IterDataset):
  """A grain IterDataset over finite document MapDatasets, produced by a checkpointable stream.

  `make_stream(documents)` returns an object with `__next__`, `get_state` and `set_state`. Grain
  worker processes (`mp_prefetch`) slice the document datasets through `set_slice`.
  """

  def __init__(self, documents: Sequence[grain.MapDataset], make_stream: Callable[..., Any]):
    super().__init__(list(documents))
    self._make_stream = make_stream

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice  # Documents are reshuffled downstream either way.
    self._parents = tuple(parent.slice(sl) for parent in self._parents)

  def __iter__(self) -> grain.DatasetIterator:
    return _StreamIterator(self._make_stream(list(self._parents)))

  def __str__(self) -> str:
    return f"_StreamDataset(sources={len(self._parents)})"


class _StreamIterator(grain.DatasetIterator):
  def __init__(self, stream: Any):
    super().__init__()
    self._stream = stream

  def __next__(self) -> Any:
    return next(self._stream)

  def get_state(self) -> dict[str, Any]:
    return self._stream.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._stream.set_state(state)


def _shard(documents: grain.MapDataset, field: str, process_index: int, process_count: int):
  if len(documents) < process_count:
    raise ConfigError(
      f"{field} has {len(documents)} documents, fewer than the {process_count} processes; "
      "use a larger corpus or fewer processes"
    )
  return documents[process_index::process_count]


def _shuffle_seed(seed: int, source_index: int) -> int:
  return int(np.random.SeedSequence([seed, 7, source_index]).generate_state(1)[0])


def _collect_counters(state: Any, source: int | None, out: dict) -> None:
  """Sums every `counters` dict in a (possibly multi-worker) state, per mixture source."""
  if isinstance(state, Mapping):
    if isinstance(state.get("counters"), Mapping):
      totals = out.setdefault(source, {})
      for key, value in state["counters"].items():
        totals[key] = totals.get(key, 0) + int(value)
    for key, value in state.items():
      if key == "sources" and isinstance(value, list):
        for i, item in enumerate(value):
          _collect_counters(item, i, out)
      elif key not in ("counters", "future_states"):  # grain's elastic-restore leftovers
        _collect_counters(value, source, out)
  elif isinstance(state, list | tuple):
    for item in state:
      _collect_counters(item, source, out)


class TrainIterator:
  """Iterator of training batches with JSON-serializable `get_state` / `set_state` and `stats`."""

  def __init__(self, dataset: grain.IterDataset, layout: dict[str, Any], names: list[str]):
    self._dataset = dataset
    self._layout = layout
    self._names = names
    self._iterator = iter(dataset)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    return {"layout": dict(self._layout), "iterator": self._iterator.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = dict(state.get("layout", {}))
    if saved != self._layout:
      keys = set(saved) | set(self._layout)
      changed = sorted(k for k in keys if saved.get(k) != self._layout.get(k))
      raise ConfigError(
        f"the saved data-iterator state was made with a different {', '.join(changed)} "
        f"({ {k: saved.get(k) for k in changed} }); restore with the settings it was saved with"
      )
    self._iterator.set_state(state["iterator"])

  def stats(self) -> dict[str, Any]:
    """Counters so far: documents, skipped_empty, skipped_undecodable, tokens, rows.

    `documents` counts documents started; `tokens` counts non-padding tokens emitted. With a
    mixture, `sources` maps each source's name to its own counters.
    """
    per_source: dict[int | None, dict[str, int]] = {}
    _collect_counters(self._iterator.get_state(), None, per_source)
    totals = dict.fromkeys(COUNTER_KEYS, 0)
    for counters in per_source.values():
      for key, value in counters.items():
        totals[key] = totals.get(key, 0) + value
    if len(self._names) > 1:
      empty = dict.fromkeys(COUNTER_KEYS, 0)
      totals["sources"] = {name: per_source.get(i, empty) for i, name in enumerate(self._names)}
    return totals

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def make_train_iterator(
  data_config: Any,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> TrainIterator:
  """Returns the checkpointable training iterator of this process (module doc for details)."""
  config = validate_data_config(data_config)
  if not _is_int(batch_size) or batch_size < 1:
    raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
  if not (_is_int(process_count) and process_count >= 1 and 0 <= process_index < process_count):
    raise ConfigError(
      f"process_index={process_index} must be in [0, process_count={process_count})"
    )
  tokenizer = _build_tokenizer(config["tokenizer"])
  skip_errors = _undecodable_errors()
  if config["mixture"] is None:
    entries = [{"source": config["source"], "weight": 1.0, "name": config["source"]["kind"]}]
    fields = ["data.source"]
  else:
    entries = config["mixture"]
    fields = [f"data.mixture[{i}].source" for i in range(len(entries))]
  documents = [
    _shard(_build_source(entry["source"], config["split"]), field, process_index, process_count)
    for entry, field in zip(entries, fields, strict=True)
  ]
  layout = {
    "batch_size": int(batch_size),
    "seq_len": config["seq_len"],
    "process_index": int(process_index),
    "process_count": int(process_count),
    "num_workers": config["num_workers"],
    "sources": len(entries),
    "decomposition": config["decomposition"] is not None,
  }
  names = [entry["name"] for entry in entries]

  if config["decomposition"] is not None:
    dd = dict(config["decomposition"])
    tokens_per_batch = dd["tokens_per_batch"] or batch_size * (1 << dd["max_log2"])
    layout["tokens_per_batch"] = tokens_per_batch

    def make_stream(docs: list[grain.MapDataset]) -> DecomposedBatcher:
      return DecomposedBatcher(
        docs[0],
        tokenizer.encode,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        min_log2=dd["min_log2"],
        max_log2=dd["max_log2"],
        tokens_per_batch=tokens_per_batch,
        curriculum=dd["curriculum"],
        curriculum_base=dd["curriculum_base"],
        curriculum_steps=dd["curriculum_steps"],
        seed=seed,
        shuffle=config["shuffle"],
        position_scheme=config["position_scheme"],
        loss_weighting=config["loss_weighting"],
        skip_errors=skip_errors,
      )

    dataset = _StreamDataset(documents, make_stream)
  else:

    def make_packer(docs: grain.MapDataset, source_index: int) -> DocumentPacker:
      stream = docs.shuffle(_shuffle_seed(seed, source_index)) if config["shuffle"] else docs
      return DocumentPacker(
        stream.repeat(),
        tokenizer.encode,
        seq_len=config["seq_len"],
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        position_scheme=config["position_scheme"],
        loss_weighting=config["loss_weighting"],
        skip_errors=skip_errors,
        epoch_size=len(docs),
      )

    def make_stream(docs: list[grain.MapDataset]) -> Any:
      packers = [make_packer(d, i) for i, d in enumerate(docs)]
      if config["mixture"] is None:
        return packers[0]
      return MixedStream(packers, [e["weight"] for e in entries], seed)

    dataset = _StreamDataset(documents, make_stream).batch(batch_size)
  if config["num_workers"] > 0:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags; notebooks never parse them.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config["num_workers"]))
  return TrainIterator(dataset, layout, names)


def make_eval_documents(
  data_config: Any,
  split: str = "validation",
  max_documents: int | None = None,
  *,
  add_special_tokens: bool = True,
) -> list[np.ndarray]:
  """Returns the tokenized documents of `data.source`'s `split`, in source order.

  Each is int32 `[bos] + tokens + [eos]` as the packer frames documents for training (the raw
  tokens with `add_special_tokens=False`). Empty and undecodable documents are left out; at most
  `max_documents` are returned.
  """
  config = validate_data_config(data_config)
  if max_documents is not None and (not _is_int(max_documents) or max_documents < 0):
    raise ConfigError(f"max_documents must be None or an int >= 0, got {max_documents!r}")
  documents = _build_source(config["source"], split)
  tokenizer = _build_tokenizer(config["tokenizer"])
  skip_errors = _undecodable_errors()
  out = []
  for index in range(len(documents)):
    if max_documents is not None and len(out) >= max_documents:
      break
    try:
      tokens = np.asarray(tokenizer.encode(documents[index]), dtype=np.int32).reshape(-1)
    except skip_errors:
      continue
    if tokens.size == 0:
      continue
    if add_special_tokens:
      tokens = frame_document(tokens, tokenizer.bos_id, tokenizer.eos_id)
    out.append(tokens)
  return out
