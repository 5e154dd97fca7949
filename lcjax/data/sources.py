"""Document sources: random-access, deterministic sequences of documents as grain MapDatasets.

`build_source(source_config, split)` returns a `grain.MapDataset` whose element `i` is one
document (`str` or `bytes`); the same config and split always give the same documents in the
same order, so the iterator state that grain checkpoints is just an index.

Kinds and their config keys (every kind also takes `kind`):

- `stdlib` (the default corpus, on every machine): the `.py` files of the running Python's
  standard library, one document (bytes) per file; see `lcjax.data.stdlib_corpus`.
  Keys: `validation_fraction`.
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
  `tfds.data_source`; `text_field` (needs tensorflow-datasets).

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

import collections
import glob
import gzip
import hashlib
import importlib
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from lcjax.config import ConfigError

__all__ = [
  "SOURCE_KINDS",
  "DataPathNotFoundError",
  "DocumentSource",
  "EmptyCorpusError",
  "MissingDependencyError",
  "RecordError",
  "build_source",
  "describe_document",
  "validation_mask",
]

SOURCE_KINDS = ("stdlib", "text", "jsonl", "parquet", "array_record", "hf_dataset", "tfds")

_COMMON_KEYS = ("kind", "validation_fraction", "splits")
_KIND_KEYS = {
  "stdlib": (),
  "text": ("path", "one_document_per_line"),
  "jsonl": ("path", "text_field"),
  "parquet": ("path", "text_field"),
  "array_record": ("path", "text_field"),
  "hf_dataset": ("path", "text_field", "split"),
  "tfds": ("name", "data_dir", "text_field"),
}
_CACHED_FILES = 4  # Decompressed .jsonl.gz files / Parquet row groups kept per process.


class DataPathNotFoundError(ValueError, FileNotFoundError):
  """A configured data path or glob that matches no file; the message names it."""


class EmptyCorpusError(ValueError):
  """A source that yields no document for the requested split."""


class RecordError(ValueError):
  """A record that holds no document (bad JSON, missing or non-text field); names file and line.

  Raised when the record is read. It means the data does not match the config, so it is not
  skipped silently the way an undecodable document is.
  """


class MissingDependencyError(ImportError):
  """An optional package that a source kind needs is not installed; the message says how."""


def validation_mask(key: str, rows: np.ndarray, fraction: float) -> np.ndarray:
  """Returns which `rows` of the file named `key` belong to the validation split.

  A splitmix64 hash of (blake2b(key), row) mapped to [0, 1) is compared with `fraction`: the
  result depends only on the key, the row and the fraction.
  """
  digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
  seed = np.full(np.shape(rows), int.from_bytes(digest, "little"), dtype=np.uint64)
  x = seed + np.asarray(rows, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  x = x ^ (x >> np.uint64(31))
  unit = (x >> np.uint64(11)).astype(np.float64) / float(2**53)
  return unit < fraction


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


class _Reader:
  """Documents stored as rows of files: `counts[f]` rows in file `f`, split key `keys[f]`."""

  def __init__(self, files: Sequence[str], keys: Sequence[str], counts: Sequence[int]):
    self.files = list(files)
    self.keys = list(keys)
    self.counts = np.asarray(counts, dtype=np.int64)
    self._starts = np.concatenate([[0], np.cumsum(self.counts)])
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()  # grain may read from several threads.

  def __len__(self) -> int:
    return int(self._starts[-1])

  def locate(self, index: int) -> tuple[int, int]:
    file_index = int(np.searchsorted(self._starts, index, side="right")) - 1
    return file_index, index - int(self._starts[file_index])

  def read(self, index: int):
    return self.read_row(*self.locate(index))

  def read_row(self, file_index: int, row: int):
    raise NotImplementedError

  def describe(self, index: int) -> str:
    file_index, row = self.locate(index)
    return f"{self.files[file_index]} row {row}"

  def cached(self, key, load: Callable[[], Any]):
    """Returns `load()` through a small per-process, thread-safe LRU cache keyed by `key`."""
    with self._lock:
      if key in self._cache:
        self._cache.move_to_end(key)
        return self._cache[key]
      value = self._cache[key] = load()
      while len(self._cache) > _CACHED_FILES:
        self._cache.popitem(last=False)
      return value

  def select(self, split: str, fraction: float) -> np.ndarray:
    """Global indices of the rows in `split` under the hash split."""
    if split == "all":
      return np.arange(len(self), dtype=np.int64)
    picked = []
    for file_index, (key, count) in enumerate(zip(self.keys, self.counts, strict=True)):
      in_validation = validation_mask(key, np.arange(count), fraction)
      rows = np.flatnonzero(in_validation if split == "validation" else ~in_validation)
      picked.append(rows + self._starts[file_index])
    return np.concatenate(picked) if picked else np.zeros(0, np.int64)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = collections.OrderedDict()
    del state["_lock"]
    for name in getattr(self, "_unpicklable", ()):
      state[name] = {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


class _FileReader(_Reader):
  """One document (bytes) per file; `.gz` files are decompressed."""

  def __init__(self, files, keys):
    super().__init__(files, keys, [1] * len(files))

  def read_row(self, file_index, row):
    path = self.files[file_index]
    if path.endswith(".gz"):
      return _read_gz(path)
    with open(path, "rb") as f:
      return f.read()

  def describe(self, index):
    return self.files[index]


class _LineReader(_Reader):
  """One document per non-blank line; `parse(line_bytes, where)` turns a line into a document."""

  def __init__(self, files, keys, parse: Callable[[bytes, str], Any]):
    self._spans = [_index_lines(path) for path in files]
    super().__init__(files, keys, [len(starts) for starts, _ in self._spans])
    self._parse = parse

  def _line(self, file_index: int, row: int) -> bytes:
    path = self.files[file_index]
    start, end = (int(a[row]) for a in self._spans[file_index])
    if path.endswith(".gz"):
      data = self.cached(file_index, lambda: _read_gz(path))
      return data[start:end]
    with open(path, "rb") as f:
      f.seek(start)
      return f.read(end - start)

  def read_row(self, file_index, row):
    return self._parse(self._line(file_index, row), self.describe_row(file_index, row))

  def describe_row(self, file_index: int, row: int) -> str:
    return f"{self.files[file_index]}:{self._line_number(file_index, row)}"

  def describe(self, index):
    return self.describe_row(*self.locate(index))

  def _line_number(self, file_index: int, row: int) -> int:
    path, start = self.files[file_index], int(self._spans[file_index][0][row])
    if path.endswith(".gz"):
      return self.cached(file_index, lambda: _read_gz(path)).count(b"\n", 0, start) + 1
    with open(path, "rb") as f:
      return f.read(start).count(b"\n") + 1


def _read_gz(path: str) -> bytes:
  with gzip.open(path, "rb") as f:
    return f.read()


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Start and end byte offsets (in the decompressed stream) of the non-blank lines of `path`."""
  starts, ends, offset = [], [], 0
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    for line in f:
      if line.strip():
        starts.append(offset)
        ends.append(offset + len(line.rstrip(b"\r\n")))
      offset += len(line)
  return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def _raw_line(raw: bytes, where: str) -> bytes:
  """The line itself is the document."""
  return raw


class _JsonField:
  """Parses a JSON object and returns its `text_field`; errors name the record."""

  def __init__(self, text_field: str):
    self.text_field = text_field

  def __call__(self, raw: bytes, where: str) -> str:
    text_field = self.text_field
    try:
      record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
      raise RecordError(f"{where} is not valid JSON ({err}); fix or remove that record") from None
    if not isinstance(record, dict) or text_field not in record:
      fields = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise RecordError(
        f"{where} has no field {text_field!r} (it has {fields}); set source.text_field to the "
        "field that holds the document"
      )
    value = record[text_field]
    if not isinstance(value, str):
      raise RecordError(
        f"{where} field {text_field!r} holds {type(value).__name__}, not a string; set "
        "source.text_field to a text field"
      )
    return value


class _ParquetReader(_Reader):
  """One document per row of the `text_field` column; row groups are read whole and cached."""

  def __init__(self, files, keys, text_field: str):
    pq = _import("pyarrow.parquet", "parquet", "pyarrow")
    self.text_field = text_field
    self._group_starts = []
    counts = []
    for path in files:
      meta = pq.ParquetFile(path).metadata
      names = meta.schema.names
      if text_field not in names:
        raise ConfigError(
          f"Parquet file {path} has no column {text_field!r} (columns: {names}); set "
          "source.text_field to the column that holds the documents"
        )
      sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
      self._group_starts.append(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
      counts.append(meta.num_rows)
    super().__init__(files, keys, counts)

  def read_row(self, file_index, row):
    starts = self._group_starts[file_index]
    group = int(np.searchsorted(starts, row, side="right")) - 1

    def load():
      pq = _import("pyarrow.parquet", "parquet", "pyarrow")
      table = pq.ParquetFile(self.files[file_index]).read_row_group(group, [self.text_field])
      return table.column(self.text_field).to_pylist()

    value = self.cached((file_index, group), load)[row - int(starts[group])]
    if not isinstance(value, str | bytes):
      raise RecordError(
        f"{self.files[file_index]} row {row} column {self.text_field!r} is "
        f"{type(value).__name__}, not text; drop null rows or pick another source.text_field"
      )
    return value


class _ArrayRecordReader(_Reader):
  """One document per ArrayRecord record: the bytes, or a JSON object's `text_field`."""

  _unpicklable = ("_readers",)

  def __init__(self, files, keys, text_field: str | None):
    from array_record.python import array_record_module

    counts = []
    for path in files:
      reader = array_record_module.ArrayRecordReader(path)
      counts.append(reader.num_records())
      reader.close()
    super().__init__(files, keys, counts)
    self._parse = _JsonField(text_field) if text_field else None
    self._readers = {}

  def read_row(self, file_index, row):
    with self._lock:
      if file_index not in self._readers:
        from array_record.python import array_record_module

        self._readers[file_index] = array_record_module.ArrayRecordReader(
          self.files[file_index], "readahead_buffer_size:0"
        )
    raw = self._readers[file_index].read([row])[0]
    if self._parse is None:
      return raw
    return self._parse(raw, f"{self.files[file_index]} record {row}")


class _MappingReader(_Reader):
  """Rows of a random-access dataset of dicts (HF datasets, tfds); the document is a field."""

  def __init__(self, name: str, rows, text_field: str):
    super().__init__([name], [name], [len(rows)])
    self._rows = rows
    self.text_field = text_field

  def read_row(self, file_index, row):
    value = self._rows[row][self.text_field]
    if isinstance(value, np.ndarray) and value.shape == ():
      value = value.item()
    if not isinstance(value, str | bytes):
      raise RecordError(
        f"{self.files[0]} row {row} field {self.text_field!r} is {type(value).__name__}, not "
        "text; set source.text_field to a text field"
      )
    return value


def _import(module: str, kind: str, package: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise MissingDependencyError(
      f"source kind {kind!r} needs the {package} package, which is not installed; install it "
      f"with `pip install {package}`"
    ) from None


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


def _get(config, key: str, default=None):
  value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  return default if value is None else value


def _to_dict(value) -> dict | None:
  if value is None:
    return None
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ConfigError("source.splits must be a mapping {split: glob}; e.g. {'train': 'a/*.jsonl'}")
  return dict(value)


def _check_keys(config, kind: str) -> None:
  keys = config.keys() if hasattr(config, "keys") else ()
  every_kind = set(_COMMON_KEYS).union(*_KIND_KEYS.values())
  for key in keys:
    if key not in every_kind:
      allowed = ", ".join(_COMMON_KEYS + _KIND_KEYS[kind])
      raise ConfigError(f"source.{key} is not a source option; options for {kind!r}: {allowed}")


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
  kind (see the module docstring). Element `i` is a `str` or `bytes` document; order and split
  are deterministic. Raises `ConfigError` for bad options, `DataPathNotFoundError` for a path
  that matches nothing, `EmptyCorpusError` when the split holds no document, and
  `MissingDependencyError` when an optional package is missing.
  """
  config = source_config if source_config is not None else {}
  kind = _get(config, "kind", "stdlib")
  if kind not in SOURCE_KINDS:
    raise ConfigError(f"source.kind {kind!r} is unknown; use one of {', '.join(SOURCE_KINDS)}")
  _check_keys(config, kind)
  fraction = float(_get(config, "validation_fraction", 0.02))
  if not 0.0 <= fraction <= 1.0:
    raise ConfigError(f"source.validation_fraction={fraction} is not in [0, 1]; use e.g. 0.02")
  splits = _to_dict(_get(config, "splits"))
  if splits is None and kind != "tfds" and split not in ("train", "validation", "all"):
    raise ConfigError(
      f"split {split!r} is unknown; use train, validation or all, or name it in source.splits"
    )
  if splits is not None and kind == "stdlib":
    raise ConfigError("source.splits does not apply to kind 'stdlib'; set validation_fraction")
  hash_split = splits is None
  if kind == "stdlib":
    from lcjax.data import stdlib_corpus

    root = stdlib_corpus.stdlib_root()
    keys = stdlib_corpus.stdlib_files(root)
    files = [os.path.join(root, key) for key in keys]
    name, reader = f"stdlib {root}", _FileReader(files, keys)
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
