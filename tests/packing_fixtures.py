"""Documents for the packing and decomposition tests: byte strings, one that does not decode."""

import numpy as np

UNDECODABLE = b"\xff<undecodable>"


class Undecodable(ValueError):
  pass


def encode(doc):
  """Bytes -> int32 token ids; numbered documents (arrays) are already tokens."""
  if isinstance(doc, np.ndarray):
    return doc
  if doc == UNDECODABLE:
    raise Undecodable("not utf-8")
  return np.frombuffer(doc, dtype=np.uint8).astype(np.int32)


def random_docs(seed, count, max_len):
  rng = np.random.default_rng(seed)
  return [
    bytes(rng.integers(0, 256, rng.integers(1, max_len)).astype(np.uint8)) for _ in range(count)
  ]
