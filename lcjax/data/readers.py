"""File readers behind `lcjax.data.sources`: one random-access reader per storage format.

Each reader maps a row number to one document and can say where a row comes from
(`describe`). Line-based files are indexed once (byte offsets in memory) and read by
seeking; gzip files and Parquet row groups are cached per process (`_CACHED_FILES`).
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import importlib
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lcjax.config import ConfigError

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
