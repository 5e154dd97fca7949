"""Small real files for README.md's placeholders: text and JSONL shards, a tiny HF folder.

tests/test_readme_commands.py runs the README's commands on these in place of the
`/data/*.jsonl`, `/models/...` and other placeholders it names.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

_WORDS = (
  "the model reads long documents and packs them into rows with masks so that attention "
  "never crosses a boundary while rotary positions restart at every document of the corpus "
  "def return import class value token length context ring device shard"
).split()


def corpus(num_docs: int, seed: int = 0, words_per_doc: int = 220) -> list[str]:
  """Deterministic documents of a few hundred tokens (long enough for a perplexity window)."""
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(num_docs):
    words = rng.choice(_WORDS, size=words_per_doc)
    docs.append(f"document {i}: " + " ".join(words) + ".")
  return docs


def write_data_files(pattern: str, text_field: str) -> None:
  """Writes three files matching `pattern` (a glob with one `*`) in the format its name says."""
  folder, name = os.path.split(pattern)
  os.makedirs(folder, exist_ok=True)
  for shard in range(3):
    path = os.path.join(folder, name.replace("*", f"part{shard}", 1).replace("*", ""))
    docs = corpus(40, seed=shard)
    if re.search(r"\.jsonl?(\.gz)?$", path):
      data = "".join(json.dumps({text_field: doc, "id": i}) + "\n" for i, doc in enumerate(docs))
    elif re.search(r"\.txt(\.gz)?$", path):
      data = "\n".join(docs) + "\n"
    else:
      pytest.fail(
        f"no rule writes test data for {pattern!r}; add its format to write_data_files in "
        f"tests/{Path(__file__).name}",
        pytrace=False,
      )
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
      f.write(data)


def build_tiny_hf_folder(folder: Path, max_positions: int) -> Path:
  """A 1-layer LlamaForCausalLM (torch, CPU) and a BPE tokenizer.json, as an HF hub folder.

  The tokenizer is trained on the same words as the test data, names its bos/eos/pad in
  tokenizer_config.json and special_tokens_map.json (what lcjax's `hf` tokenizer reads), and
  the model's vocabulary is the tokenizer's padded to 128, as lcjax pads it.
  """
  import tokenizers
  import torch
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  folder.mkdir(parents=True, exist_ok=True)
  specials = ["<pad>", "<s>", "</s>"]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(corpus(60), trainer)
  tok.save(str(folder / "tokenizer.json"))
  names = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
  (folder / "tokenizer_config.json").write_text(
    json.dumps({**names, "tokenizer_class": "PreTrainedTokenizerFast"})
  )
  (folder / "special_tokens_map.json").write_text(json.dumps(names))
  ids = {name: tok.token_to_id(token) for name, token in names.items()}
  config = transformers.LlamaConfig(
    vocab_size=-(-tok.get_vocab_size() // 128) * 128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=max_positions,
    tie_word_embeddings=False,
    pad_token_id=ids["pad_token"],
    bos_token_id=ids["bos_token"],
    eos_token_id=ids["eos_token"],
  )
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(folder)
  return folder


def write_longbench_folder(folder: Path) -> Path:
  """A LongBench-format folder (`<dataset>.jsonl`, as LongBench's data.zip) of 2 hotpotqa rows."""
  folder.mkdir(parents=True, exist_ok=True)
  rows = [
    {
      "context": " ".join(corpus(1, seed=i, words_per_doc=60)),
      "input": f"Which city is capital number {i}?",
      "answers": [f"city {i}"],
      "all_classes": None,
      "length": 60,
    }
    for i in range(2)
  ]
  (folder / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return folder
