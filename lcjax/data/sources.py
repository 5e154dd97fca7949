"""Document sources: random-access, deterministic sequences of documents as grain MapDatasets.

`build_source(source_config, split)` returns a `grain.MapDataset` whose element `i` is one
document (`str` or `bytes`); the same config and split always give the same documents in the
same order, so the iterator state that grain checkpoints is just an index.

Kinds and their config keys (every kind also takes `kind`; `SOURCE_OPTIONS` lists them all, and
an option set to None counts as unset):

- `stdlib` (the default corpus, on every machine): the `.py` files of the running Python's
  standard library, one document (bytes) per file; see `lcjax.data.stdlib_corpus`.
  Keys: `validation_fraction`; `min_bytes` / `max_bytes` keep only files of `min_bytes <= size <
  max_bytes` (long or short stand-in sources for a CPU-sized recipe, `configs/recipes/`). Each
  file keeps its hash split whatever the filter, so held-out files stay held out.
- `text`: `path` (a file, a directory read recursively, a glob, or a list of them), one
  document (bytes) per file, or one per non-blank line with `one_document_per_line=True`.
- `jsonl`: `path` globs of `.jsonl` or `.jsonl.gz` files, one JSON object per line;
  `text_field` (default "text") names the document. Blank lines are skipped.
- `parquet`: `path` globs of Parquet files; `text_field` names the column (needs pyarrow).
- `array_record`: `path` globs of ArrayRecord files, one document (bytes) per record, or, with
  `text_field` set, each record a JSON object holding the document in that field.
- `hf_dataset`: `path` of a Hugging Face dataset saved with `save_to_disk`; `text_field`;
  `split` names the saved split to read (needs `datasets`).
- `tfds`: `name` and optional `data_dir` of a tensorflow-datasets dataset read through
  `tfds.data_source`; `text_field`; `splits` (needs tensorflow-datasets).

Setting an option the kind does not read (e.g. `text_field` for `stdlib`) raises `ConfigError`
rather than being ignored, so a misspelt or misplaced option never silently does nothing.

Splits. File-based kinds and `hf_dataset` take `splits`, a mapping {split: glob or list of
globs} (for `hf_dataset`: {split: saved split name}) that selects the data of each split as it
is. Without it, every document goes to `validation` with probability `validation_fraction`
(default 0.02) and to `train` otherwise, decided by a stable hash of the document's file path
(relative to the path or glob root) and its row in that file: the split never depends on file
order, on the machine, or on Python's hash seed. The split `all` takes every document. `tfds`
passes the split name (or `splits[split]`, e.g. "train[:98%]") to tensorflow-datasets.

Costs. Line-based files are indexed once (one pass, offsets kept in memory) and then read by
seeking. A `.jsonl.gz` file is decompressed whole when one of its lines is read, and the last
few such files are kept in memory per process; Parquet row groups are cached the same way.
For globally shuffled training on many large shards, convert them to ArrayRecord.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from lcjax.config import ConfigError, check_kind_options
from lcjax.data.readers import (
  DataPathNotFoundError,
  EmptyCorpusError,
  MissingDependencyError,
  RecordError,
  _ArrayRecordReader,
  _FileReader,
  _import,
  _JsonField,
  _LineReader,
  _MappingReader,
  _ParquetReader,
  _raw_line,
  _Reader,
  validation_mask,
)
from lcjax.data.stdlib_corpus import stdlib_files, stdlib_root

__all__ = [
  "SOURCE_KINDS",
  "DataPathNotFoundError",
  "DocumentSource",
  "EmptyCorpusError",
  "MissingDependencyError",
  "RecordError",
  "SOURCE_OPTIONS",
  "build_source",
  "check_source_options",
  "describe_document",
  "validation_mask",
]

SOURCE_KINDS = ("stdlib", "text", "jsonl", "parquet", "array_record", "hf_dataset", "tfds")

# Every option of every kind and its type (what `default_data_config()` declares each one as, so
# the command line can set it: `object` options take a string or a list/dict literal).
SOURCE_OPTIONS = {
  "kind": str,
  "path": object,  # a file, directory or glob, or a list of them
  "text_field": str,
  "one_document_per_line": bool,
  "split": str,  # hf_dataset: the saved split to read
  "name": str,  # tfds: the dataset name
  "data_dir": str,
  "validation_fraction": float,
  "splits": object,  # {split: glob or list of globs}
  "min_bytes": int,  # stdlib: keep files of at least this size
  "max_bytes": int,  # stdlib: keep files smaller than this
}
_FILE_KIND = ("kind", "path", "text_field", "validation_fraction", "splits")
_KIND_OPTIONS = {
  "stdlib": ("kind", "validation_fraction", "min_bytes", "max_bytes"),
  "text": ("kind", "path", "one_document_per_line", "validation_fraction", "splits"),
  "jsonl": _FILE_KIND,
  "parquet": _FILE_KIND,
  "array_record": _FILE_KIND,
  "hf_dataset": ("kind", "path", "text_field", "split", "validation_fraction", "splits"),
  "tfds": ("kind", "name", "data_dir", "text_field", "splits"),
}


class DocumentSource(Sequence):
  """A random-access sequence of documents: the rows `indices` of a sharded reader.

  `describe(i)` names where document `i` comes from (e.g. "data/a.jsonl:12"), for messages.
  """

  def __init__(self, name: str, reader: _Reader, indices: np.ndarray):
    self.name = name
    self._reader = reader
    self._indices = np.asarray(indices, dtype=np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    return self._reader.read(int(self._indices[index]))

  def describe(self, index: int) -> str:
    return self._reader.describe(int(self._indices[index]))

  def __repr__(self) -> str:
    return f"DocumentSource({self.name}, {len(self)} documents)"


def _glob_root(pattern: str) -> str:
  """The directory a pattern's matches are named relative to (its part before any wildcard)."""
  if os.path.isdir(pattern):
    return pattern
  parts = pattern.split(os.sep)
  fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
  return os.sep.join(parts[:fixed]) or "."


def _expand(paths: str | Sequence[str], field: str) -> tuple[list[str], list[str]]:
  """Files matched by `paths` (files, directories, globs) and their stable split keys.

  Each pattern's matches are sorted; patterns keep their order; duplicates are dropped.
  """
  patterns = [paths] if isinstance(paths, str) else list(paths)
  if not patterns:
    raise ConfigError(f"{field} is empty; set it to a file, a directory or a glob")
  files, keys, seen = [], [], set()
  for pattern in patterns:
    pattern = os.path.expanduser(str(pattern))
    if os.path.isdir(pattern):
      matches = []
      for root, dirs, names in os.walk(pattern):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        matches += [os.path.join(root, n) for n in names if not n.startswith(".")]
    else:
      matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
    if not matches:
      raise DataPathNotFoundError(
        f"{field} {pattern!r} matches no file; check the path or point {field} at your data"
      )
    root = _glob_root(pattern)
    for path in sorted(matches):
      real = os.path.realpath(path)
      if real not in seen:
        seen.add(real)
        files.append(path)
        keys.append(os.path.relpath(path, root).replace(os.sep, "/"))
  return files, keys


def _get(config: dict, key: str, default=None):
  """`config[key]`, or `default` when unset (`_set_options` already dropped None values)."""
  return config.get(key, default)


def _to_dict(value) -> dict | None:
  if value is None:
    return None
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ConfigError("source.splits must be a mapping {split: glob}; e.g. {'train': 'a/*.jsonl'}")
  return dict(value)


def _set_options(source_config) -> dict[str, Any]:
  """The options a ConfigDict or dict sets, as a plain dict: None-valued options are unset."""
  if source_config is None:
    return {}
  if hasattr(source_config, "to_dict"):
    source_config = source_config.to_dict()
  if not isinstance(source_config, Mapping):
    raise ConfigError(f"the source config must be a dict with a 'kind', got {source_config!r}")
  return {key: value for key, value in source_config.items() if value is not None}


def check_source_options(options: Mapping[str, Any], field: str = "source") -> None:
  """Raises `ConfigError`, naming `{field}.{key}`, for a set option the kind does not read.

  Ignoring it instead would let a misplaced option (`text_field` for `stdlib`) silently do
  nothing. None-valued options count as unset. Kinds outside `SOURCE_KINDS` are not checked (a
  caller with its own `build_source` may define them); `build_source` rejects them.
  """
  kind = options.get("kind") or "stdlib"
  check_kind_options(
    options,
    field=field,
    kind=kind,
    allowed_by_kind=_KIND_OPTIONS,
    known=SOURCE_OPTIONS,
    what="source",
  )


def _file_patterns(config, split: str, splits: dict | None) -> tuple[Any, str]:
  """The path patterns of `split` and the config field they came from."""
  path = _get(config, "path")
  if splits is None:
    if path is None:
      raise ConfigError("source.path is not set; set it to a file, a directory or a glob")
    return path, "source.path"
  if split not in splits:
    raise ConfigError(
      f"split {split!r} is not in source.splits (has {sorted(splits)}); add it or drop splits"
    )
  patterns = splits[split]
  if path is not None and isinstance(path, str) and os.path.isdir(path):
    patterns = [
      os.path.join(path, p) for p in ([patterns] if isinstance(patterns, str) else patterns)
    ]
  return patterns, f"source.splits[{split!r}]"


def _build_files(config, kind: str, split: str, splits: dict | None) -> tuple[str, _Reader]:
  patterns, field = _file_patterns(config, split, splits)
  files, keys = _expand(patterns, field)
  text_field = _get(config, "text_field", "text")
  if kind == "text":
    if _get(config, "one_document_per_line", False):
      return f"text lines {patterns}", _LineReader(files, keys, _raw_line)
    return f"text files {patterns}", _FileReader(files, keys)
  if kind == "jsonl":
    return f"jsonl {patterns}", _LineReader(files, keys, _JsonField(text_field))
  if kind == "parquet":
    return f"parquet {patterns}", _ParquetReader(files, keys, text_field)
  text_field = _get(config, "text_field")
  return f"array_record {patterns}", _ArrayRecordReader(files, keys, text_field)


def _build_hf_dataset(config, split: str, splits: dict | None) -> tuple[str, _Reader, bool]:
  """Returns (name, reader, whether the reader still needs the hash split)."""
  datasets = _import("datasets", "hf_dataset", "datasets")
  path = _get(config, "path")
  if path is None:
    raise ConfigError("source.path is not set; set it to a folder written by save_to_disk")
  if not os.path.exists(path):
    raise DataPathNotFoundError(
      f"source.path {path!r} does not exist; point it at a folder written by save_to_disk"
    )
  loaded = datasets.load_from_disk(path)
  saved_split, hash_split = _get(config, "split"), True
  if splits is not None:
    if split not in splits:
      raise ConfigError(f"split {split!r} is not in source.splits (has {sorted(splits)})")
    saved_split, hash_split = splits[split], False
  if isinstance(loaded, datasets.DatasetDict):
    if saved_split is None and split in loaded:
      saved_split, hash_split = split, False
    if saved_split not in loaded:
      raise ConfigError(
        f"dataset {path} has splits {sorted(loaded)}, not {saved_split or split!r}; set "
        "source.split to the saved split to read (it is then split by hash) or source.splits"
      )
    loaded = loaded[saved_split]
  text_field = _get(config, "text_field", "text")
  if text_field not in loaded.column_names:
    raise ConfigError(
      f"dataset {path} has no column {text_field!r} (columns: {loaded.column_names}); set "
      "source.text_field"
    )
  name = f"{path}[{saved_split}]" if saved_split else path
  rows = loaded.select_columns([text_field])
  return f"hf_dataset {name}", _MappingReader(name, rows, text_field), hash_split


def _build_tfds(config, split: str, splits: dict | None) -> tuple[str, _Reader]:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise MissingDependencyError(
      "source kind 'tfds' needs tensorflow-datasets, which is not installed; install it with "
      "`pip install tensorflow-datasets` or use another source kind"
    ) from None
  name = _get(config, "name")
  if name is None:
    raise ConfigError("source.name is not set; set it to a tensorflow-datasets name")
  tfds_split = (splits or {}).get(split, split)
  rows = tfds.data_source(name, split=tfds_split, data_dir=_get(config, "data_dir"))
  label = f"{name}[{tfds_split}]"
  return f"tfds {label}", _MappingReader(label, rows, _get(config, "text_field", "text"))


def _stdlib_by_size(root: str, keys: list[str], low: Any, high: Any) -> list[str]:
  """The standard-library files (relative paths) of `low <= size < high` bytes."""
  for key, value in (("min_bytes", low), ("max_bytes", high)):
    if value is not None and (not isinstance(value, int | np.integer) or value < 0):
      raise ConfigError(f"source.{key}={value!r} must be an integer >= 0 (a file size in bytes)")
  low = low or 0
  if high is not None and high <= low:
    raise ConfigError(f"source.max_bytes={high} must exceed source.min_bytes={low}")
  sizes = [os.path.getsize(os.path.join(root, key)) for key in keys]
  return [k for k, n in zip(keys, sizes, strict=True) if n >= low and (high is None or n < high)]


def describe_document(dataset: grain.MapDataset, index: int) -> str:
  """Where document `index` of a dataset from `build_source` comes from, e.g. "a.jsonl:12".

  For other datasets (or after transformations) it returns "document {index}".
  """
  documents = getattr(dataset, "_source", None)  # What grain.MapDataset.source wraps.
  if isinstance(documents, DocumentSource):
    return documents.describe(index % len(documents))
  return f"document {index}"


def build_source(source_config, split: str) -> grain.MapDataset:
  """Builds the documents of `split` ("train", "validation" or "all") as a grain MapDataset.

  `source_config` is a ConfigDict or dict with `kind` (default "stdlib") and the keys of that
  kind (see the module docstring); None-valued keys are unset. Element `i` is a `str` or `bytes`
  document; order and split are deterministic. Raises `ConfigError` for bad options,
  `DataPathNotFoundError` for a path that matches nothing, `EmptyCorpusError` when the split
  holds no document, and `MissingDependencyError` when an optional package is missing.
  """
  config = _set_options(source_config)
  kind = _get(config, "kind", "stdlib")
  if kind not in SOURCE_KINDS:
    raise ConfigError(f"source.kind {kind!r} is unknown; use one of {', '.join(SOURCE_KINDS)}")
  check_source_options(config)
  fraction = float(_get(config, "validation_fraction", 0.02))
  if not 0.0 <= fraction <= 1.0:
    raise ConfigError(f"source.validation_fraction={fraction} is not in [0, 1]; use e.g. 0.02")
  splits = _to_dict(_get(config, "splits"))
  if splits is None and kind != "tfds" and split not in ("train", "validation", "all"):
    raise ConfigError(
      f"split {split!r} is unknown; use train, validation or all, or name it in source.splits"
    )
  hash_split = splits is None
  if kind == "stdlib":
    root = stdlib_root()
    keys, name = stdlib_files(root), f"stdlib {root}"
    low, high = _get(config, "min_bytes"), _get(config, "max_bytes")
    if low is not None or high is not None:
      keys = _stdlib_by_size(root, keys, low, high)
      name += f" [{low or 0}, {high if high is not None else 'inf'}) bytes"
    files = [os.path.join(root, key) for key in keys]
    reader = _FileReader(files, keys)
  elif kind == "hf_dataset":
    name, reader, hash_split = _build_hf_dataset(config, split, splits)
  elif kind == "tfds":
    (name, reader), hash_split = _build_tfds(config, split, splits), False
  else:
    name, reader = _build_files(config, kind, split, splits)
  indices = reader.select(split, fraction) if hash_split else np.arange(len(reader))
  documents = DocumentSource(f"{name} ({split})", reader, indices)
  if not len(documents):
    raise EmptyCorpusError(
      f"source {documents.name} has no documents; point source.path at data or change "
      "source.validation_fraction / source.splits"
    )
  documents[0]  # Fails now, naming the record, if the config does not match the data.
  return grain.MapDataset.source(documents)
