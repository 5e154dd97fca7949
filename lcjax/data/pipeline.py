"""The checkpointable grain training pipeline: source -> tokenizer -> packer/mixture/DD -> batches.

`make_train_iterator(data_config, batch_size=..., seed=...)` yields dicts of numpy arrays
`tokens, targets, segment_ids, positions, loss_weights`, each `[batch_size, seq_len]` (int32,
`loss_weights` float32), with the row semantics of `lcjax.data.packing`. With
`data.decomposition` set, batches are Dataset Decomposition batches instead
(`lcjax.data.decomposition`): `[tokens_per_batch / 2^k, 2^k]` with `k` varying per step. With
`data.synthetic.task` set, rows are that task's generated rows (`lcjax.data.synthetic`), and
`data.source` is not read.

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

Config: the `data` section, `lcjax.data.config` (`default_data_config`, `validate_data_config`).

Components. `build_source(source_config, split)` and `build_tokenizer(tokenizer_config)` are the
registries of `lcjax.data.sources` and `lcjax.data.tokenizers` unless a caller passes its own
(tests pass fakes). They run in the calling process: worker processes receive the built
documents and tokenizer, pickled, never the builders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from lcjax.config import ConfigError
from lcjax.data.config import _is_int, validate_data_config
from lcjax.data.decomposition import DecomposedBatcher, min_over_processes
from lcjax.data.mixture import MixedStream
from lcjax.data.packing import COUNTER_KEYS, DocumentPacker, frame_document
from lcjax.data.sources import build_source as default_build_source
from lcjax.data.synthetic import SyntheticRows
from lcjax.data.tokenizers import Tokenizer, UndecodableDocument
from lcjax.data.tokenizers import build_tokenizer as default_build_tokenizer

__all__ = ["TrainIterator", "make_eval_documents", "make_train_iterator"]

SourceBuilder = Callable[[Any, str], grain.MapDataset]
TokenizerBuilder = Callable[[Any], Tokenizer]

# What the packer skips and counts as `skipped_undecodable` instead of failing the run.
_UNDECODABLE = (UndecodableDocument, UnicodeError)


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
  build_source: SourceBuilder = default_build_source,
  build_tokenizer: TokenizerBuilder = default_build_tokenizer,
) -> TrainIterator:
  """Returns the checkpointable training iterator of this process (module doc for details).

  `build_source` / `build_tokenizer` build the documents and the tokenizer from the validated
  `data.source` (or each mixture source) and `data.tokenizer`; the defaults are the registries.
  """
  config = validate_data_config(data_config)
  if not _is_int(batch_size) or batch_size < 1:
    raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
  if not (_is_int(process_count) and process_count >= 1 and 0 <= process_index < process_count):
    raise ConfigError(
      f"process_index={process_index} must be in [0, process_count={process_count})"
    )
  tokenizer = build_tokenizer(config["tokenizer"])
  if config["synthetic"] is not None:
    return _synthetic_iterator(config, tokenizer, batch_size, seed, process_index, process_count)
  if config["mixture"] is None:
    entries = [{"source": config["source"], "weight": 1.0, "name": config["source"]["kind"]}]
    fields = ["data.source"]
  else:
    entries = config["mixture"]
    fields = [f"data.mixture[{i}].source" for i in range(len(entries))]
  documents = [
    _shard(build_source(entry["source"], config["split"]), field, process_index, process_count)
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
        cycles_per_pass=dd["cycles_per_pass"],
        long_split=dd["long_split"],
        seed=seed,
        shuffle=config["shuffle"],
        position_scheme=config["position_scheme"],
        loss_weighting=config["loss_weighting"],
        skip_errors=_UNDECODABLE,
        # Every process draws the same bucket per step, so all schedule with the same sizes.
        agree_sizes=min_over_processes if process_count > 1 else None,
      )

    if process_count > 1 and config["num_workers"] > 0:
      raise ConfigError(
        "data.decomposition agrees bucket sizes across processes when indexing, which grain "
        "worker processes cannot do; set data.num_workers=0"
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
        skip_errors=_UNDECODABLE,
        epoch_size=len(docs),
      )

    def make_stream(docs: list[grain.MapDataset]) -> Any:
      packers = [make_packer(d, i) for i, d in enumerate(docs)]
      if config["mixture"] is None:
        return packers[0]
      return MixedStream(packers, [e["weight"] for e in entries], seed)

    dataset = _StreamDataset(documents, make_stream).batch(batch_size)
  if config["num_workers"] > 0:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; notebooks never parse them.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config["num_workers"]))
  return TrainIterator(dataset, layout, names)


def _synthetic_iterator(config, tokenizer, batch_size, seed, process_index, process_count):
  """Batches of `data.synthetic`'s generated rows (no documents are read)."""
  options = config["synthetic"]

  def make_stream(docs: list[grain.MapDataset]) -> SyntheticRows:
    del docs  # generated, not read
    return SyntheticRows(
      options,
      tokenizer,
      seq_len=config["seq_len"],
      seed=seed,
      split=config["split"],
      process_index=process_index,
      position_scheme=config["position_scheme"],
    )

  make_stream([])  # raises now (ConfigError) when a row cannot fit in seq_len
  layout = {
    "batch_size": int(batch_size),
    "seq_len": config["seq_len"],
    "process_index": int(process_index),
    "process_count": int(process_count),
    "num_workers": 0,
    "sources": 1,
    "decomposition": False,
    "synthetic": options["task"],
  }
  dataset = _StreamDataset([], make_stream).batch(batch_size)
  return TrainIterator(dataset, layout, [options["task"]])


def make_eval_documents(
  data_config: Any,
  split: str = "validation",
  max_documents: int | None = None,
  *,
  add_special_tokens: bool = True,
  build_source: SourceBuilder = default_build_source,
  build_tokenizer: TokenizerBuilder = default_build_tokenizer,
) -> list[np.ndarray]:
  """Returns the tokenized documents of `data.source`'s `split`, in source order.

  Each is int32 `[bos] + tokens + [eos]` as the packer frames documents for training (the raw
  tokens with `add_special_tokens=False`). Empty and undecodable documents are left out; at most
  `max_documents` are returned. `build_source` / `build_tokenizer` as in `make_train_iterator`.
  """
  config = validate_data_config(data_config)
  if max_documents is not None and (not _is_int(max_documents) or max_documents < 0):
    raise ConfigError(f"max_documents must be None or an int >= 0, got {max_documents!r}")
  documents = build_source(config["source"], split)
  tokenizer = build_tokenizer(config["tokenizer"])
  out = []
  for index in range(len(documents)):
    if max_documents is not None and len(out) >= max_documents:
      break
    try:
      tokens = np.asarray(tokenizer.encode(documents[index]), dtype=np.int32).reshape(-1)
    except _UNDECODABLE:
      continue
    if tokens.size == 0:
      continue
    if add_special_tokens:
      tokens = frame_document(tokens, tokenizer.bos_id, tokenizer.eos_id)
    out.append(tokens)
  return out
