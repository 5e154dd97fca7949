"""Tokenizers: bytes (the default) and any Hugging Face tokenizer folder.

`build_tokenizer(tokenizer_config) -> Tokenizer`. Every tokenizer has
`encode(doc: str | bytes) -> int32[N]` (never adds special tokens: the packer places bos/eos),
`decode(ids) -> str`, and the ints `vocab_size` (the model's embedding rows, padded up to a
multiple of `pad_vocab_to`), `pad_id`, `bos_id` and `eos_id`.

Config keys (`TOKENIZER_OPTIONS`; an option set to None counts as unset, and setting one the
kind does not read, e.g. `path` for "byte", raises `ConfigError`):

- `kind`: "byte" (default) or "hf".
- `pad_vocab_to` (default 128): `vocab_size` is rounded up to a multiple of it (1: no padding).
- `hf` only: `path` (a folder with `tokenizer.json`, read with the `tokenizers` library; without
  one, `transformers.AutoTokenizer` reads the folder), `vocab_size` (an explicit size, e.g. the
  checkpoint's `config.json` value, at least the tokenizer's), and `bos_token`, `eos_token`,
  `pad_token` to override the special tokens named in `tokenizer_config.json` or
  `special_tokens_map.json`.

Contract for documents the packer may have to skip (and count):

- An empty document encodes to an empty array, for every tokenizer.
- The byte tokenizer never raises: `bytes` are taken as they are, `str` is UTF-8 encoded
  (lone surrogates pass through as their 3-byte encodings).
- An `hf` tokenizer raises `UndecodableDocument` for `bytes` that are not valid UTF-8 and for a
  `str` that cannot be UTF-8 encoded (lone surrogates).

Special ids. Byte: 0..255 are the bytes, 256 pad, 257 bos, 258 eos, vocab 384. HF: from the
tokenizer's config files; a missing bos falls back to eos (GPT-2 style "<|endoftext|>"
separators), a missing pad falls back to eos (pad positions carry no loss), and a tokenizer with
no eos at all must name one with `eos_token`.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Iterable, Mapping

import numpy as np

from lcjax.config import ConfigError, check_kind_options

__all__ = [
  "TOKENIZER_KINDS",
  "TOKENIZER_OPTIONS",
  "ByteTokenizer",
  "HFTokenizer",
  "Tokenizer",
  "UndecodableDocument",
  "build_tokenizer",
  "check_tokenizer_options",
]

TOKENIZER_KINDS = ("byte", "hf")
# Every option of every kind and its type (what `default_data_config()` declares each one as).
TOKENIZER_OPTIONS = {
  "kind": str,
  "pad_vocab_to": int,  # None: 128
  "path": str,
  "vocab_size": int,
  "bos_token": str,
  "eos_token": str,
  "pad_token": str,
}
_KIND_OPTIONS = {"byte": ("kind", "pad_vocab_to"), "hf": tuple(TOKENIZER_OPTIONS)}
_EOS_FALLBACKS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


class UndecodableDocument(ValueError):
  """A document the tokenizer cannot read (e.g. bytes that are not UTF-8); skip and count it."""


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Tokenizer(abc.ABC):
  """Maps documents to int32 token ids and back; see the module docstring for the contract."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  @abc.abstractmethod
  def encode(self, doc: str | bytes) -> np.ndarray:
    """Token ids (int32[N]) of `doc` without special tokens; empty for an empty document."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """Text of `ids`; padding rows of the vocabulary (ids the tokenizer lacks) are dropped."""

  def __repr__(self) -> str:
    return (
      f"{type(self).__name__}(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
      f"bos_id={self.bos_id}, eos_id={self.eos_id})"
    )


class ByteTokenizer(Tokenizer):
  """Bytes are tokens: ids 0..255, then pad 256, bos 257, eos 258; vocab 384 by default."""

  def __init__(self, pad_vocab_to: int = 128):
    self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
    self.vocab_size = _round_up(259, pad_vocab_to)

  def encode(self, doc: str | bytes) -> np.ndarray:
    if isinstance(doc, str):
      doc = doc.encode("utf-8", errors="surrogatepass")
    elif not isinstance(doc, bytes | bytearray | memoryview):
      raise TypeError(f"ByteTokenizer.encode takes str or bytes, not {type(doc).__name__}")
    return np.frombuffer(doc, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    names = {self.pad_id: "<pad>", self.bos_id: "<bos>", self.eos_id: "<eos>"}
    pieces, run = [], bytearray()
    for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1):
      i = int(i)
      if 0 <= i < 256:
        run.append(i)
      elif i in names and not skip_special_tokens:
        pieces.append(run.decode("utf-8", errors="replace") + names[i])
        run = bytearray()
    return "".join(pieces) + run.decode("utf-8", errors="replace")


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    value = json.load(f)
  return value if isinstance(value, dict) else {}


def _token_content(value) -> str | None:
  """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
  """A Hugging Face tokenizer folder (`tokenizers` fast path, `transformers` fallback)."""

  def __init__(
    self,
    path: str,
    *,
    pad_vocab_to: int = 128,
    vocab_size: int | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
  ):
    if not os.path.isdir(path):
      raise FileNotFoundError(
        f"tokenizer.path {path!r} is not a directory; point it at a Hugging Face tokenizer folder"
      )
    self.path = path
    self._fast = None
    self._auto = None
    if os.path.exists(os.path.join(path, "tokenizer.json")):
      import tokenizers

      self._fast = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
      vocab = self._fast.get_vocab(with_added_tokens=True)
      to_id = self._fast.token_to_id
    else:
      try:
        import transformers
      except ImportError:
        raise ImportError(
          f"{path} has no tokenizer.json and reading it needs transformers; install it with "
          "`pip install transformers` or save the tokenizer with tokenizer.json"
        ) from None
      self._auto = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
      vocab = self._auto.get_vocab()
      to_id = self._token_id_auto
    self.num_tokens = max(vocab.values()) + 1
    files = _read_json(os.path.join(path, "special_tokens_map.json"))
    files.update(_read_json(os.path.join(path, "tokenizer_config.json")))
    self.eos_id = self._special("eos", eos_token, files, to_id)
    if self.eos_id is None:
      found = [to_id(t) for t in _EOS_FALLBACKS if to_id(t) is not None]
      if not found:
        raise ConfigError(
          f"tokenizer {path} names no eos token; set tokenizer.eos_token to the token that ends "
          "a document"
        )
      self.eos_id = found[0]
    bos_id = self._special("bos", bos_token, files, to_id)
    pad_id = self._special("pad", pad_token, files, to_id)
    self.bos_id = self.eos_id if bos_id is None else bos_id
    self.pad_id = self.eos_id if pad_id is None else pad_id
    if vocab_size is not None:
      if vocab_size < self.num_tokens:
        raise ConfigError(
          f"tokenizer.vocab_size={vocab_size} is smaller than the {self.num_tokens} tokens of "
          f"{path}; raise it or leave it unset"
        )
      self.vocab_size = int(vocab_size)
    else:
      self.vocab_size = _round_up(self.num_tokens, pad_vocab_to)
    self._special_ids = {self.pad_id, self.bos_id, self.eos_id}

  def _token_id_auto(self, token: str) -> int | None:
    token_id = self._auto.convert_tokens_to_ids(token)
    unk = self._auto.unk_token_id
    return (
      None if token_id is None or (token_id == unk and token != self._auto.unk_token) else token_id
    )

  def _special(self, role: str, override: str | None, files: dict, to_id) -> int | None:
    """The id of the `role` token: the config override, then the folder's config files."""
    token = override if override is not None else _token_content(files.get(f"{role}_token"))
    if token is None and self._auto is not None:
      return getattr(self._auto, f"{role}_token_id", None)
    if token is None:
      return None
    token_id = to_id(token)
    if token_id is None:
      source = f"tokenizer.{role}_token" if override is not None else f"{self.path} config files"
      raise ConfigError(
        f"{role} token {token!r} from {source} is not in the vocabulary of {self.path}; set "
        f"tokenizer.{role}_token to one of its tokens"
      )
    return int(token_id)

  def encode(self, doc: str | bytes) -> np.ndarray:
    if isinstance(doc, bytes | bytearray | memoryview):
      try:
        doc = bytes(doc).decode("utf-8")
      except UnicodeDecodeError as err:
        raise UndecodableDocument(f"document is not valid UTF-8 ({err})") from None
    elif not isinstance(doc, str):
      raise TypeError(f"HFTokenizer.encode takes str or bytes, not {type(doc).__name__}")
    if not doc:
      return np.zeros(0, np.int32)
    try:
      if self._fast is not None:
        ids = self._fast.encode(doc, add_special_tokens=False).ids
      else:
        ids = self._auto.encode(doc, add_special_tokens=False)
    except (TypeError, UnicodeEncodeError) as err:
      try:
        doc.encode("utf-8")
      except UnicodeEncodeError as bad:
        raise UndecodableDocument(f"document cannot be UTF-8 encoded ({bad})") from None
      raise err
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    flat = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    kept = [int(i) for i in flat if 0 <= int(i) < self.num_tokens]
    if skip_special_tokens:
      kept = [i for i in kept if i not in self._special_ids]
    if self._fast is not None:
      return self._fast.decode(kept, skip_special_tokens=skip_special_tokens)
    return self._auto.decode(kept, skip_special_tokens=skip_special_tokens)


def _set_options(tokenizer_config) -> dict:
  """The options a ConfigDict or dict sets, as a plain dict: None-valued options are unset."""
  if tokenizer_config is None:
    return {}
  if hasattr(tokenizer_config, "to_dict"):
    tokenizer_config = tokenizer_config.to_dict()
  if not isinstance(tokenizer_config, Mapping):
    raise ConfigError(
      f"the tokenizer config must be a dict with a 'kind', got {tokenizer_config!r}"
    )
  return {key: value for key, value in tokenizer_config.items() if value is not None}


def check_tokenizer_options(options: Mapping, field: str = "tokenizer") -> None:
  """Raises `ConfigError`, naming `{field}.{key}`, for a set option the kind does not read.

  Ignoring it instead would let a misplaced option (a `path` without `kind="hf"`) silently do
  nothing. None-valued options count as unset; kinds outside `TOKENIZER_KINDS` are not checked
  (`build_tokenizer` rejects them).
  """
  kind = options.get("kind") or "byte"
  check_kind_options(
    options,
    field=field,
    kind=kind,
    allowed_by_kind=_KIND_OPTIONS,
    known=TOKENIZER_OPTIONS,
    what="tokenizer",
  )


def build_tokenizer(tokenizer_config=None) -> Tokenizer:
  """Builds the tokenizer a ConfigDict or dict describes (None: the byte tokenizer).

  Keys: `kind` ("byte" or "hf"), `pad_vocab_to`, and for "hf" `path`, `vocab_size`,
  `bos_token`, `eos_token`, `pad_token` (see the module docstring); None-valued keys are unset.
  """
  config = _set_options(tokenizer_config)
  kind = config.get("kind", "byte")
  if kind not in TOKENIZER_KINDS:
    raise ConfigError(
      f"tokenizer.kind {kind!r} is unknown; use one of {', '.join(TOKENIZER_KINDS)}"
    )
  check_tokenizer_options(config)
  pad_vocab_to = int(config.get("pad_vocab_to", 128))
  if pad_vocab_to < 1:
    raise ConfigError(f"tokenizer.pad_vocab_to={pad_vocab_to} must be >= 1; use 128 or 1")
  if kind == "byte":
    return ByteTokenizer(pad_vocab_to)
  path = config.get("path")
  if path is None:
    raise ConfigError("tokenizer.path is not set; set it to a Hugging Face tokenizer folder")
  return HFTokenizer(
    os.path.expanduser(str(path)),
    pad_vocab_to=pad_vocab_to,
    vocab_size=config.get("vocab_size"),
    bos_token=config.get("bos_token"),
    eos_token=config.get("eos_token"),
    pad_token=config.get("pad_token"),
  )
