"""Document sources: every kind on data written to tmp_path, the stdlib corpus, bad input."""

import gzip
import json
import os
import pickle
import sys

import grain
import ml_collections
import numpy as np
import pytest

from lcjax.config import ConfigError
from lcjax.data import sources, stdlib_corpus
from lcjax.data.sources import (
  DataPathNotFoundError,
  EmptyCorpusError,
  MissingDependencyError,
  RecordError,
  build_source,
  describe_document,
)


def _docs(dataset):
  return [dataset[i] for i in range(len(dataset))]


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


# --- the embedded stdlib corpus ---


def test_stdlib_split_is_deterministic_disjoint_and_long():
  train = build_source({"kind": "stdlib"}, "train")
  validation = build_source(ml_collections.ConfigDict({"kind": "stdlib"}), "validation")
  assert isinstance(train, grain.MapDataset)
  again = build_source(None, "train")  # stdlib is the default kind.
  names_train = [describe_document(train, i) for i in range(len(train))]
  names_validation = {describe_document(validation, i) for i in range(len(validation))}
  assert names_train == [describe_document(again, i) for i in range(len(again))]
  assert not set(names_train) & names_validation
  stats = stdlib_corpus.corpus_stats()
  assert len(train) + len(validation) == stats["documents"] > 500
  assert (len(train), len(validation)) == (stats["train_documents"], stats["validation_documents"])
  assert 0.005 < len(validation) / stats["documents"] < 0.05
  assert stats["documents_over_10k"] > 100
  assert names_train == sorted(names_train)
  doc = train[len(train) // 2]
  assert isinstance(doc, bytes) and doc == again[len(train) // 2]
  assert sum(len(validation[i]) for i in range(len(validation))) == stats["validation_bytes"]


def _reference_unit(key, row):
  """splitmix64 of (blake2b(key) + row * golden) in Python ints, mapped to [0, 1)."""
  import hashlib

  mask = 2**64 - 1
  x = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
  x = (x + row * 0x9E3779B97F4A7C15) & mask
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
  return ((x ^ (x >> 31)) >> 11) / 2**53


def test_validation_mask_is_a_fixed_function():
  """The split must never change between releases, machines or hash seeds."""
  mask = sources.validation_mask("pkg/module.py", np.arange(16), 0.5)
  assert mask.tolist() == [_reference_unit("pkg/module.py", r) < 0.5 for r in range(16)]
  assert "".join(str(int(m)) for m in mask) == "1011101010000011"
  fraction = sources.validation_mask("x", np.arange(100_000), 0.02).mean()
  assert abs(fraction - 0.02) < 0.002


# --- file-based kinds ---


def test_text_files_directory_glob_and_lines(tmp_path):
  _write(str(tmp_path / "a.txt"), "alpha")
  _write(str(tmp_path / "sub" / "b.txt"), b"\xffbeta")
  _write(str(tmp_path / ".hidden"), "skip me")
  _write(str(tmp_path / "lines" / "c.txt"), "one\n\n  \ntwo\r\nthree")
  _write(str(tmp_path / "zipped" / "d.txt.gz"), gzip.compress(b"gamma"))
  directory = build_source(
    {"kind": "text", "path": str(tmp_path), "validation_fraction": 0}, "train"
  )
  assert _docs(directory) == [b"alpha", b"one\n\n  \ntwo\r\nthree", b"\xffbeta", b"gamma"]
  assert describe_document(directory, 2).endswith("sub/b.txt")
  globbed = build_source({"kind": "text", "path": str(tmp_path / "**" / "*.txt")}, "all")
  assert sorted(_docs(globbed)) == sorted(_docs(directory)[:-1])  # Not the .gz file.
  several = build_source(
    {"kind": "text", "path": [str(tmp_path / "sub" / "*"), str(tmp_path / "a.txt")]}, "all"
  )
  assert _docs(several) == [b"\xffbeta", b"alpha"]
  lines = build_source(
    {"kind": "text", "path": str(tmp_path / "lines" / "c.txt"), "one_document_per_line": True},
    "all",
  )
  assert _docs(lines) == [b"one", b"two", b"three"]
  assert describe_document(lines, 1).endswith("c.txt:4")


def test_hash_split_partitions_documents_independent_of_file_order(tmp_path):
  lines = [f"line {i}" for i in range(200)]
  _write(str(tmp_path / "d" / "x.txt"), "\n".join(lines))
  config = {"kind": "text", "path": str(tmp_path / "d"), "one_document_per_line": True}
  config["validation_fraction"] = 0.3
  train = _docs(build_source(config, "train"))
  validation = _docs(build_source(config, "validation"))
  assert sorted(train + validation) == sorted(s.encode() for s in lines)
  assert 30 < len(validation) < 90
  # The same file under another directory name keeps its split (keys are relative paths).
  _write(str(tmp_path / "moved" / "x.txt"), "\n".join(lines))
  moved = dict(config, path=str(tmp_path / "moved"))
  assert _docs(build_source(moved, "validation")) == validation


def test_splits_mapping_selects_files(tmp_path):
  _write(str(tmp_path / "train-0.txt"), "t0")
  _write(str(tmp_path / "train-1.txt"), "t1")
  _write(str(tmp_path / "valid-0.txt"), "v0")
  config = {"kind": "text", "path": str(tmp_path), "splits": {"train": "train-*", "test": "v*"}}
  assert _docs(build_source(config, "train")) == [b"t0", b"t1"]
  assert _docs(build_source(config, "test")) == [b"v0"]
  with pytest.raises(ConfigError, match="'validation' is not in source.splits"):
    build_source(config, "validation")


def test_none_valued_options_are_unset(tmp_path):
  _write(str(tmp_path / "a.txt"), "one\ntwo\n")
  config = ml_collections.ConfigDict(
    {
      "kind": "text",
      "path": str(tmp_path / "a.txt"),
      "text_field": ml_collections.config_dict.placeholder(str),  # another kind's option, unset
      "splits": ml_collections.config_dict.placeholder(object),
      "validation_fraction": None,
    }
  )
  assert _docs(build_source(config, "all")) == [b"one\ntwo\n"]
  config.one_document_per_line = True
  assert _docs(build_source(config, "all")) == [b"one", b"two"]


def test_jsonl_and_jsonl_gz(tmp_path):
  records = [{"text": f"doc {i} é", "id": i} for i in range(5)]
  body = "\n".join(json.dumps(r) for r in records) + "\n\n"
  _write(str(tmp_path / "a.jsonl"), body)
  with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
    f.write(body.replace('"doc', '"gz'))
  dataset = build_source({"kind": "jsonl", "path": str(tmp_path / "*.jsonl*")}, "all")
  expected = [f"doc {i} é" for i in range(5)] + [f"gz {i} é" for i in range(5)]
  assert _docs(dataset) == expected
  assert _docs(pickle.loads(pickle.dumps(dataset))) == expected
  assert describe_document(dataset, 7).endswith("b.jsonl.gz:3")
  by_id = {"kind": "jsonl", "path": str(tmp_path / "a.jsonl"), "text_field": "id"}
  with pytest.raises(RecordError, match=r"a\.jsonl:1 field 'id' holds int, not a string"):
    build_source(by_id, "all")


def test_jsonl_missing_field_names_file_and_line(tmp_path):
  lines = ['{"text": "ok"}', "", '{"text": "fine"}', '{"body": "no text"}', "{not json"]
  _write(str(tmp_path / "bad.jsonl"), "\n".join(lines))
  dataset = build_source({"kind": "jsonl", "path": str(tmp_path / "bad.jsonl")}, "all")
  assert dataset[1] == "fine"
  with pytest.raises(RecordError, match=r"bad\.jsonl:4 has no field 'text' \(it has \['body'\]\)"):
    dataset[2]
  with pytest.raises(RecordError, match=r"bad\.jsonl:5 is not valid JSON"):
    dataset[3]
  # A config that does not match the data fails when the source is built.
  with pytest.raises(RecordError, match=r"bad\.jsonl:1 has no field 'body'"):
    build_source(
      {"kind": "jsonl", "path": str(tmp_path / "bad.jsonl"), "text_field": "body"}, "all"
    )


def test_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  table = pa.table({"content": [f"row {i}" for i in range(10)], "n": list(range(10))})
  pq.write_table(table, tmp_path / "a.parquet", row_group_size=3)
  pq.write_table(table.slice(0, 2), tmp_path / "b.parquet")
  config = {"kind": "parquet", "path": str(tmp_path / "*.parquet"), "text_field": "content"}
  dataset = build_source(config, "all")
  assert _docs(dataset) == [f"row {i}" for i in range(10)] + ["row 0", "row 1"]
  assert _docs(pickle.loads(pickle.dumps(dataset)))[4] == "row 4"
  with pytest.raises(ConfigError, match=r"a\.parquet has no column 'text' \(columns: "):
    build_source(dict(config, text_field="text"), "all")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
  _write(str(tmp_path / "a.parquet"), b"PAR1")
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(MissingDependencyError, match="pip install pyarrow"):
    build_source({"kind": "parquet", "path": str(tmp_path / "a.parquet")}, "all")


def test_array_record_bytes_and_json(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter

  for name, records in [("a", [b"\x00raw", b"bytes"]), ("b", [b"more"])]:
    writer = ArrayRecordWriter(str(tmp_path / f"{name}.array_record"), "group_size:1")
    for record in records:
      writer.write(record)
    writer.close()
  writer = ArrayRecordWriter(str(tmp_path / "j.arecord"), "group_size:1")
  for i in range(3):
    writer.write(json.dumps({"text": f"json {i}"}).encode())
  writer.close()
  raw = build_source({"kind": "array_record", "path": str(tmp_path / "*.array_record")}, "all")
  assert _docs(raw) == [b"\x00raw", b"bytes", b"more"]
  assert _docs(pickle.loads(pickle.dumps(raw))) == [b"\x00raw", b"bytes", b"more"]
  parsed = build_source(
    {"kind": "array_record", "path": str(tmp_path / "j.arecord"), "text_field": "text"}, "all"
  )
  assert _docs(parsed) == ["json 0", "json 1", "json 2"]


def test_hf_dataset_from_disk(tmp_path):
  datasets = pytest.importorskip("datasets")
  rows = {"text": [f"hf {i}" for i in range(40)], "label": list(range(40))}
  datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "flat"))
  config = {"kind": "hf_dataset", "path": str(tmp_path / "flat"), "validation_fraction": 0.25}
  train, validation = (
    _docs(build_source(config, "train")),
    _docs(build_source(config, "validation")),
  )
  assert sorted(train + validation) == sorted(rows["text"]) and validation
  splits = datasets.DatasetDict(
    train=datasets.Dataset.from_dict({"body": ["a", "b"]}),
    validation=datasets.Dataset.from_dict({"body": ["c"]}),
  )
  splits.save_to_disk(str(tmp_path / "dict"))
  config = {"kind": "hf_dataset", "path": str(tmp_path / "dict"), "text_field": "body"}
  assert _docs(build_source(config, "train")) == ["a", "b"]
  assert _docs(build_source(config, "validation")) == ["c"]
  assert len(build_source(dict(config, split="train", validation_fraction=0.0), "train")) == 2
  with pytest.raises(ConfigError, match="has no column 'text'"):
    build_source(dict(config, text_field="text"), "train")
  with pytest.raises(ConfigError, match=r"has splits \['train', 'validation'\], not 'test'"):
    build_source(dict(config, split="test"), "train")
  with pytest.raises(DataPathNotFoundError, match="nowhere"):
    build_source({"kind": "hf_dataset", "path": str(tmp_path / "nowhere")}, "train")


def test_tfds_without_the_package_names_the_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(MissingDependencyError, match="pip install tensorflow-datasets"):
    build_source({"kind": "tfds", "name": "wikipedia"}, "train")


# --- bad input ---


def test_missing_path_empty_corpus_and_bad_options(tmp_path):
  missing = str(tmp_path / "nowhere" / "*.jsonl")
  with pytest.raises(DataPathNotFoundError, match="nowhere") as info:
    build_source({"kind": "jsonl", "path": missing}, "train")
  assert isinstance(info.value, FileNotFoundError)
  with pytest.raises(ConfigError, match="source.path is not set"):
    build_source({"kind": "text"}, "train")
  _write(str(tmp_path / "blank.jsonl"), "\n  \n")
  with pytest.raises(EmptyCorpusError, match=r"blank\.jsonl.*has no documents"):
    build_source({"kind": "jsonl", "path": str(tmp_path / "blank.jsonl")}, "train")
  with pytest.raises(EmptyCorpusError, match="stdlib"):
    build_source({"kind": "stdlib", "validation_fraction": 0.0}, "validation")
  with pytest.raises(ConfigError, match="'webdataset' is unknown; use one of stdlib, text"):
    build_source({"kind": "webdataset"}, "train")
  with pytest.raises(ConfigError, match="source.pathh is not a source option"):
    build_source({"kind": "text", "pathh": "x"}, "train")
  with pytest.raises(ConfigError, match="source.splits does not apply to kind 'stdlib'"):
    build_source({"kind": "stdlib", "splits": {"train": "*.py"}}, "train")
  with pytest.raises(
    ConfigError,
    match="source.text_field does not apply to kind 'stdlib'; options for 'stdlib': kind, "
    "validation_fraction",
  ):
    build_source({"kind": "stdlib", "text_field": "x"}, "train")
  with pytest.raises(ConfigError, match="source.validation_fraction does not apply to kind 'tfds'"):
    build_source({"kind": "tfds", "name": "wikipedia", "validation_fraction": 0.1}, "train")
  with pytest.raises(ConfigError, match="split 'test' is unknown"):
    build_source({"kind": "stdlib"}, "test")
  with pytest.raises(ConfigError, match="validation_fraction=1.5 is not in"):
    build_source({"kind": "stdlib", "validation_fraction": 1.5}, "train")
