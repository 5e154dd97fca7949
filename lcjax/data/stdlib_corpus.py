"""The embedded default corpus: the `.py` files of the running Python's standard library.

Every machine that runs lcjax has it, so the quickstart, the tests and the notebooks train on
real text (code) without a download. One document per file, read as bytes; paths are sorted;
`site-packages`, `dist-packages`, `__pycache__` and hidden directories are skipped (test
directories are kept: their `.py` files are code too, and a few are deliberately not UTF-8,
which exercises the tokenizers' undecodable-document path).

Measured on CPython 3.11.7 (`corpus_stats()`): 1790 documents, 31.5 MB, 721 documents longer
than 10K bytes, 51 longer than 100K bytes, the longest 757K bytes, median 6.5K bytes. With the
default `validation_fraction=0.02`, 39 of them (by a stable hash of the relative path, see
`lcjax.data.readers.validation_mask`) form the validation split and 1751 the train split.

    >>> from lcjax.data import build_source
    >>> docs = build_source({"kind": "stdlib"}, "train")
"""

from __future__ import annotations

import os
import sys
import sysconfig

import numpy as np

from lcjax.data.readers import validation_mask

__all__ = ["corpus_stats", "stdlib_files", "stdlib_root"]

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
LONG_DOCUMENT_BYTES = 10_000


def stdlib_root() -> str:
  """The directory of the running Python's standard library (the base one inside a venv)."""
  root = sysconfig.get_paths()["stdlib"]
  if not os.path.isdir(root):
    raise FileNotFoundError(
      f"the Python standard library directory {root} does not exist; use another data.source"
    )
  return root


def stdlib_files(root: str | None = None) -> list[str]:
  """Sorted '/'-separated paths, relative to `root`, of the standard library's `.py` files."""
  root = root or stdlib_root()
  paths = []
  for directory, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith(".")]
    for name in names:
      if name.endswith(".py"):
        relative = os.path.relpath(os.path.join(directory, name), root)
        paths.append(relative.replace(os.sep, "/"))
  return sorted(paths)


def corpus_stats(validation_fraction: float = 0.02, root: str | None = None) -> dict:
  """Counts the corpus from file sizes (no file is read).

  Returns a dict with `python`, `root`, `documents`, `bytes`, `documents_over_10k`,
  `documents_over_100k`, `max_bytes`, `median_bytes`, and `train_documents`,
  `validation_documents`, `validation_bytes` under the hash split of `validation_fraction`.
  """
  root = root or stdlib_root()
  paths = stdlib_files(root)
  sizes_N = np.array([os.path.getsize(os.path.join(root, p)) for p in paths], dtype=np.int64)
  in_validation_N = np.array(
    [bool(validation_mask(p, np.zeros(1, np.int64), validation_fraction)[0]) for p in paths],
    dtype=bool,
  )
  return {
    "python": sys.version.split()[0],
    "root": root,
    "documents": len(paths),
    "bytes": int(sizes_N.sum()),
    "documents_over_10k": int((sizes_N > LONG_DOCUMENT_BYTES).sum()),
    "documents_over_100k": int((sizes_N > 10 * LONG_DOCUMENT_BYTES).sum()),
    "max_bytes": int(sizes_N.max(initial=0)),
    "median_bytes": float(np.median(sizes_N)) if len(paths) else 0.0,
    "train_documents": int((~in_validation_N).sum()),
    "validation_documents": int(in_validation_N.sum()),
    "validation_bytes": int(sizes_N[in_validation_N].sum()),
  }
