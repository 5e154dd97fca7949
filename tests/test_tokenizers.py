"""Tokenizers: the byte tokenizer and Hugging Face folders built here (no downloads)."""

import json
import pickle

import ml_collections
import numpy as np
import pytest

from lcjax.config import ConfigError
from lcjax.data.tokenizers import (
  ByteTokenizer,
  HFTokenizer,
  UndecodableDocument,
  build_tokenizer,
)

_TRAINING_TEXT = ["hello world", "def foo(): return 1", "héllo wörld ✓", "import os\n"] * 10


def _train_bpe(special_tokens):
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=special_tokens,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(_TRAINING_TEXT, trainer)
  return tok


def _write_json(path, value):
  with open(path, "w") as f:
    json.dump(value, f)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """A tiny byte-level BPE with <pad>, <s>, </s> saved as tokenizer.json + tokenizer_config.json."""
  folder = tmp_path_factory.mktemp("bpe")
  _train_bpe(["<pad>", "<s>", "</s>"]).save(str(folder / "tokenizer.json"))
  _write_json(folder / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
  _write_json(folder / "special_tokens_map.json", {"pad_token": {"content": "<pad>"}})
  return folder


# --- byte ---


def test_byte_tokenizer_round_trip_and_specials():
  tok = build_tokenizer(None)
  assert isinstance(tok, ByteTokenizer)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (384, 256, 257, 258)
  text = "def f():\n  return 'héllo ✓'"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  raw = b"\xff\xfeabc\x00\x80"
  assert tok.encode(raw).tolist() == list(raw)
  assert tok.decode(tok.encode(raw)) == raw.decode("utf-8", errors="replace")
  assert tok.encode("").shape == (0,) and tok.encode(b"").dtype == np.int32
  assert tok.encode("a\ud800").tolist() == [97, 0xED, 0xA0, 0x80]  # Never raises.
  with_specials = [257, 104, 105, 258, 256, 300]
  assert tok.decode(with_specials) == "hi"
  assert tok.decode(with_specials, skip_special_tokens=False) == "<bos>hi<eos><pad>"
  assert build_tokenizer({"kind": "byte", "pad_vocab_to": 1}).vocab_size == 259
  assert pickle.loads(pickle.dumps(tok)).encode("x").tolist() == [120]


# --- Hugging Face folders ---


def test_hf_tokenizer_round_trip_specials_and_vocab(hf_folder):
  tok = build_tokenizer(ml_collections.ConfigDict({"kind": "hf", "path": str(hf_folder)}))
  assert isinstance(tok, HFTokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.num_tokens <= 300 and tok.vocab_size == 384
  for text in ["hello world", "héllo ✓ wörld\n\tunseen ƒ"]:
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and not set(ids.tolist()) & {0, 1, 2}
    assert tok.decode(ids) == text
    assert tok.encode(text.encode("utf-8")).tolist() == ids.tolist()
  ids = tok.encode("hello")
  assert tok.decode([1, *ids.tolist(), 2, 0, 383]) == "hello"
  assert "</s>" in tok.decode([*ids.tolist(), 2], skip_special_tokens=False)
  assert tok.encode("").shape == (0,) and tok.encode(b"").shape == (0,)
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode("hello world").tolist() == tok.encode("hello world").tolist()
  config = {"kind": "hf", "path": str(hf_folder)}
  assert build_tokenizer(dict(config, pad_vocab_to=1)).vocab_size == tok.num_tokens
  assert build_tokenizer(dict(config, vocab_size=512)).vocab_size == 512
  assert build_tokenizer(dict(config, pad_token="</s>")).pad_id == 2
  with pytest.raises(ConfigError, match="vocab_size=10 is smaller than"):
    build_tokenizer(dict(config, vocab_size=10))
  with pytest.raises(ConfigError, match=r"eos token '<end>' from tokenizer.eos_token is not in"):
    build_tokenizer(dict(config, eos_token="<end>"))


def test_hf_tokenizer_rejects_undecodable_documents(hf_folder):
  tok = build_tokenizer({"kind": "hf", "path": str(hf_folder)})
  with pytest.raises(UndecodableDocument, match="not valid UTF-8"):
    tok.encode(b"ok \xff\xfe broken")
  with pytest.raises(UndecodableDocument, match="cannot be UTF-8 encoded"):
    tok.encode("lone \ud800 surrogate")
  assert issubclass(UndecodableDocument, ValueError)


def test_hf_tokenizer_fallbacks_for_missing_specials(tmp_path):
  gpt2_style = tmp_path / "gpt2"
  gpt2_style.mkdir()
  _train_bpe(["<|endoftext|>"]).save(str(gpt2_style / "tokenizer.json"))
  tok = build_tokenizer({"kind": "hf", "path": str(gpt2_style)})  # No config files at all.
  assert tok.pad_id == tok.bos_id == tok.eos_id == 0
  bare = tmp_path / "bare"
  bare.mkdir()
  _train_bpe([]).save(str(bare / "tokenizer.json"))
  with pytest.raises(ConfigError, match="names no eos token; set tokenizer.eos_token"):
    build_tokenizer({"kind": "hf", "path": str(bare)})
  assert build_tokenizer({"kind": "hf", "path": str(bare), "eos_token": "o"}).eos_id >= 0


def test_hf_folder_without_tokenizer_json_uses_transformers(tmp_path):
  pytest.importorskip("transformers")
  fast = _train_bpe(["<|endoftext|>"])
  fast.model.save(str(tmp_path))  # vocab.json + merges.txt, a GPT-2 style slow tokenizer.
  _write_json(
    tmp_path / "tokenizer_config.json",
    {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"},
  )
  tok = build_tokenizer({"kind": "hf", "path": str(tmp_path)})
  assert tok._fast is None and tok.eos_id == tok.bos_id == tok.pad_id == 0
  text = "héllo ✓ def foo"
  assert tok.encode(text).tolist() == fast.encode(text).ids
  assert tok.decode(tok.encode(text)) == text
  with pytest.raises(UndecodableDocument):
    tok.encode(b"\xc3")


def test_bad_tokenizer_configs(tmp_path):
  with pytest.raises(ConfigError, match="'wordpiece' is unknown; use one of byte, hf"):
    build_tokenizer({"kind": "wordpiece"})
  with pytest.raises(ConfigError, match="tokenizer.path is not set"):
    build_tokenizer({"kind": "hf"})
  with pytest.raises(FileNotFoundError, match="nowhere"):
    build_tokenizer({"kind": "hf", "path": str(tmp_path / "nowhere")})
  with pytest.raises(ConfigError, match="tokenizer.vocab is not a tokenizer option"):
    build_tokenizer({"vocab": 3})
  with pytest.raises(ConfigError, match="pad_vocab_to=0 must be >= 1"):
    build_tokenizer({"pad_vocab_to": 0})
  with pytest.raises(
    ConfigError,
    match="tokenizer.path does not apply to kind 'byte'; options for 'byte': kind, pad_vocab_to",
  ):
    build_tokenizer({"path": str(tmp_path)})


def test_none_valued_options_are_unset():
  placeholder = ml_collections.config_dict.placeholder
  config = ml_collections.ConfigDict(
    {"kind": "byte", "pad_vocab_to": placeholder(int), "path": placeholder(str), "vocab_size": None}
  )
  assert build_tokenizer(config).vocab_size == 384
