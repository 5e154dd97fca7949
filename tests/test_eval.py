"""Evaluations: strided perplexity accounting, passkey prompts and scoring, plots, JSON output."""

import json
import math
import os

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from lcjax.config import ConfigError
from lcjax.eval import (
  make_passkey_prompt,
  passkey_accuracy,
  perplexity,
  perplexity_vs_length,
  plot_passkey_heatmap,
  plot_ppl_vs_length,
  write_json,
)
from lcjax.eval.passkey import GARBAGE, NEEDLE, QUESTION, TASK, first_integer
from lcjax.eval.perplexity import prefix_invariant
from lcjax.models import build_model, llama_config
from lcjax.train.config import base_config, validate_config
from lcjax.train.evaluate import format_ppl_table
from lcjax.train.run_model import model_from_params


class FixedModel:
  """Predicts the same distribution p at every position: NLL of token t is -log p[t]."""

  def __init__(self, p_V):
    self.logp_V = jnp.log(jnp.asarray(p_V, jnp.float32))
    self.traces = 0

  def __call__(self, tokens_BT, *, positions=None, segment_ids=None):
    self.traces += 1  # runs once per jit compilation, not per call
    B, T = tokens_BT.shape
    return jnp.broadcast_to(self.logp_V, (B, T, self.logp_V.size))


class OracleModel:
  """Knows the chain next = perm[token], but only once it sees at least k tokens.

  At window position j the model has seen j + 1 tokens; with fewer than k it
  predicts uniformly (NLL log V), otherwise it is certain and right (NLL 0).
  """

  def __init__(self, perm_V, k):
    self.perm_V, self.k = jnp.asarray(perm_V), k

  def __call__(self, tokens_BT, *, positions=None, segment_ids=None):
    B, T = tokens_BT.shape
    V = self.perm_V.size
    sure_BTV = 1e4 * jax.nn.one_hot(self.perm_V[tokens_BT], V)
    sees_k_T = jnp.arange(T) + 1 >= self.k
    return jnp.where(sees_k_T[None, :, None], sure_BTV, jnp.zeros((B, T, V)))


def _chain(perm, start, n):
  doc = [start]
  for _ in range(n - 1):
    doc.append(int(perm[doc[-1]]))
  return np.array(doc, np.int32)


def _blind_targets(n, context_len, stride, k):
  """Targets scored with fewer than k visible tokens, counted target by target.

  Each target t (1..n-1) is scored by the first window (in start order) that
  contains it; window start s sees t - s tokens when predicting t.
  """
  last = n - 1 - context_len
  starts = sorted(set(range(0, last + 1, stride)) | {last})
  blind = 0
  for t in range(1, n):
    s = next(s for s in starts if s + 1 <= t <= s + context_len)
    blind += t - s < k
  return blind


def test_fixed_distribution_gives_exact_nll():
  rng = np.random.default_rng(0)
  p_V = rng.dirichlet(np.ones(11))
  docs = [rng.integers(0, 11, size=n).astype(np.int32) for n in (40, 9, 23, 5)]
  model = FixedModel(p_V)
  out = perplexity(model, docs, context_len=8, stride=3, batch_size=4)
  kept = [d for d in docs if d.size >= 9]
  targets = np.concatenate([d[1:] for d in kept])
  expected = -np.mean(np.log(p_V[targets]))
  assert out["tokens"] == targets.size == 39 + 8 + 22
  assert out["skipped_documents"] == 1 and out["documents"] == 3
  np.testing.assert_allclose(out["nll"], expected, rtol=1e-6)
  np.testing.assert_allclose(out["ppl"], math.exp(expected), rtol=1e-6)
  assert (out["context_len"], out["stride"], out["doc_mode"]) == (8, 3, "separate")
  # 40 tokens: starts 0,3,...,30 then 31; 9: start 0; 23: 0,3,...,12 then 14.
  assert out["windows"] == 12 + 1 + 6
  assert model.traces == 1, "one compilation for all windows, the last batch padded"


def test_concatenate_mode_joins_with_separator():
  rng = np.random.default_rng(1)
  p_V = rng.dirichlet(np.ones(7))
  docs = [rng.integers(0, 6, size=n).astype(np.int32) for n in (5, 4, 6)]
  out = perplexity(FixedModel(p_V), docs, context_len=6, doc_mode="concatenate", separator_id=6)
  stream = np.concatenate([docs[0], [6], docs[1], [6], docs[2]])
  np.testing.assert_allclose(out["nll"], -np.mean(np.log(p_V[stream[1:]])), rtol=1e-6)
  assert out["tokens"] == stream.size - 1 and out["skipped_documents"] == 0
  with pytest.raises(ValueError, match="no document"):
    perplexity(FixedModel(p_V), docs, context_len=6)


@pytest.mark.parametrize(
  "context_len,stride,k", [(8, 4, 6), (8, 8, 3), (8, 2, 4), (5, 1, 5), (16, 5, 12)]
)
def test_strided_protocol_scores_only_new_tokens(context_len, stride, k):
  V = 16
  rng = np.random.default_rng(context_len * 100 + stride)
  perm = rng.permutation(V)
  lengths = [20, 37, context_len + 1, 64, context_len]  # the last one is too short
  docs = [_chain(perm, int(rng.integers(V)), n) for n in lengths]
  out = perplexity(OracleModel(perm, k), docs, context_len=context_len, stride=stride, batch_size=3)
  kept = [n for n in lengths if n >= context_len + 1]
  assert out["tokens"] == sum(n - 1 for n in kept)
  assert out["windows"] == sum(1 + math.ceil((n - 1 - context_len) / stride) for n in kept)
  assert out["skipped_documents"] == 1
  blind = sum(_blind_targets(n, context_len, stride, k) for n in kept)
  np.testing.assert_allclose(out["nll"], blind * math.log(V) / out["tokens"], rtol=1e-5, atol=1e-7)


def test_strided_protocol_hand_example():
  """N=20, L=8, stride 4: starts 0, 4, 8, 11 score 8+4+4+3 = 19 targets.

  With k=6 the blind targets are 5 in the first window (positions 0-4) and one
  each in the second and third (position 4); the end-aligned last window scores
  positions 5-7 only, so 7 targets pay log V.
  """
  perm = np.random.default_rng(2).permutation(16)
  out = perplexity(OracleModel(perm, 6), [_chain(perm, 3, 20)], context_len=8, stride=4)
  assert (out["tokens"], out["windows"]) == (19, 4)
  np.testing.assert_allclose(out["nll"], 7 * math.log(16) / 19, rtol=1e-6)
  capped = perplexity(
    OracleModel(perm, 6), [_chain(perm, 3, 20)], context_len=8, stride=4, max_windows=2
  )
  assert (capped["tokens"], capped["windows"]) == (12, 2)


def test_vs_length_scores_the_same_text_at_every_length():
  rng = np.random.default_rng(3)
  p_V = rng.dirichlet(np.ones(9))
  docs = [rng.integers(0, 9, size=n).astype(np.int32) for n in (70, 30, 100, 64)]
  rows = perplexity_vs_length(FixedModel(p_V), docs, [8, 16, 32, 64], stride_fraction=0.5)
  assert [r["context_len"] for r in rows] == [8, 16, 32, 64]
  assert [r["stride"] for r in rows] == [4, 8, 16, 32]
  # Only the 70- and 100-token documents have 65 tokens: every length scores them.
  assert {r["tokens"] for r in rows} == {69 + 99}
  assert {r["skipped_documents"] for r in rows} == {2}
  expected = -np.mean(np.log(p_V[np.concatenate([docs[0][1:], docs[2][1:]])]))
  np.testing.assert_allclose([r["nll"] for r in rows], expected, rtol=1e-6)
  short = perplexity_vs_length(FixedModel(p_V), docs, [8, 16], max_tokens_per_document=20)
  assert {r["tokens"] for r in short} == {19 * 4}


def test_bad_arguments_raise_clear_errors():
  model = FixedModel(np.ones(4) / 4)
  docs = [np.arange(20, dtype=np.int32) % 4]
  with pytest.raises(ValueError, match="stride=9 exceeds context_len=8"):
    perplexity(model, docs, context_len=8, stride=9)
  with pytest.raises(ValueError, match="doc_mode='books' is unknown"):
    perplexity(model, docs, context_len=8, doc_mode="books")
  with pytest.raises(ValueError, match="1-D integer"):
    perplexity(model, [np.zeros((2, 3))], context_len=2)
  with pytest.raises(ValueError, match="max_tokens_per_document=10"):
    perplexity_vs_length(model, docs, [8, 16], max_tokens_per_document=10)


def _tiny_llama(seed=0):
  cfg = llama_config(
    dtype="float32", d_model=32, num_heads=2, num_kv_heads=1, mlp_dim=64, num_layers=2
  )
  return build_model(cfg, rngs=nnx.Rngs(seed)), cfg


def test_tiny_llama_perplexity_is_finite_and_chunking_is_exact():
  model, cfg = _tiny_llama()
  rng = np.random.default_rng(4)
  docs = [rng.integers(0, 256, size=n).astype(np.int32) for n in (50, 41)]
  full = perplexity(model, docs, context_len=24, stride=12, batch_size=2, logits_chunk=None)
  chunked = perplexity(model, docs, context_len=24, stride=12, batch_size=2, logits_chunk=10)
  assert full["tokens"] == 49 + 40
  assert np.isfinite(full["nll"]) and 1.0 < full["ppl"] < 10 * cfg.vocab_size
  np.testing.assert_allclose(chunked["nll"], full["nll"], rtol=1e-6)


class ByteTokenizer:
  """Byte-level tokenizer: ids 0..255 are UTF-8 bytes, 256 is BOS."""

  bos_id = 256

  def encode(self, text):
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids):
    return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


@pytest.mark.parametrize("length", [260, 517, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_layout_length_and_depth(length, depth):
  tok = ByteTokenizer()
  ids, answer = make_passkey_prompt(tok, length_tokens=length, depth=depth, key=40721)
  assert answer == "40721"
  assert ids.dtype == np.int32 and ids[0] == tok.bos_id
  # Byte tokens: the filler is cut by characters, so the length is exact.
  assert len(ids) == length
  task, prefix, needle, suffix, question = tok.decode(ids).split("\n")
  assert (task, needle, question) == (TASK, NEEDLE.format(key=40721), QUESTION)
  garbage = " ".join([GARBAGE] * 50)
  assert garbage.startswith(prefix) and garbage.startswith(suffix)
  filler = len(prefix) + len(suffix)
  assert filler == length - 1 - len(TASK) - len(needle) - len(QUESTION) - 4
  assert abs(len(prefix) / filler - depth) <= 1 / filler


def test_passkey_prompt_within_one_sentence_for_a_coarse_tokenizer():
  """A word-level tokenizer cannot hit the target exactly: it stays under, within a sentence."""

  class WordTokenizer:
    def encode(self, text):
      return np.array([len(w) for w in text.split(" ")], np.int32)

  ids, _ = make_passkey_prompt(WordTokenizer(), length_tokens=300, depth=0.5, key=123)
  assert 300 - len(GARBAGE.split(" ")) <= len(ids) <= 300
  with pytest.raises(ValueError, match="length_tokens=50 is below"):
    make_passkey_prompt(ByteTokenizer(), length_tokens=50, depth=0.5, key=1)
  with pytest.raises(ValueError, match="depth=1.5"):
    make_passkey_prompt(ByteTokenizer(), length_tokens=500, depth=1.5, key=1)


class CopyKeyModel(nnx.Module):
  """Cheats: finds "key is " in its token cache and emits the digits that follow it."""

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size
    self.pattern = tuple(b"key is ")

  def init_cache(self, batch, max_len):
    return dict(tokens=jnp.zeros((batch, max_len), jnp.int32), prompt_len=jnp.zeros((), jnp.int32))

  def decode(self, tokens_BT, cache, cache_index):
    B, T = tokens_BT.shape
    tokens_BN = jax.lax.dynamic_update_slice_in_dim(cache["tokens"], tokens_BT, cache_index, 1)
    prompt_len = jnp.where(cache_index == 0, T, cache["prompt_len"])
    N, m = tokens_BN.shape[1], len(self.pattern)
    match_BM = jnp.ones((B, N - m + 1), bool)
    for j, byte in enumerate(self.pattern):
      match_BM &= tokens_BN[:, j : N - m + 1 + j] == byte
    key_start_B = jnp.argmax(match_BM, axis=1) + m
    generated = cache_index + T - prompt_len  # answer tokens emitted before this one
    next_B = jnp.take_along_axis(tokens_BN, (key_start_B + generated)[:, None], axis=1)[:, 0]
    logits_BTV = (
      jnp.zeros((B, T, self.vocab_size)).at[:, -1].set(jax.nn.one_hot(next_B, self.vocab_size))
    )
    return logits_BTV, dict(tokens=tokens_BN, prompt_len=prompt_len)


def test_passkey_accuracy_of_a_copying_model_is_one():
  out = passkey_accuracy(
    CopyKeyModel(257), ByteTokenizer(), lengths=[300, 420], depths=[0.0, 0.5, 1.0], trials=2, seed=7
  )
  assert out["accuracy"] == [[1.0] * 3] * 2
  assert len(out["records"]) == 2 * 3 * 2
  keys = [r["key"] for r in out["records"]]
  assert all(10_000 <= k < 100_000 for k in keys) and len(set(keys)) > 1
  assert all(
    r["prediction"] == r["key"] and r["prompt_tokens"] <= r["length"] for r in out["records"]
  )
  again = passkey_accuracy(
    CopyKeyModel(257),
    ByteTokenizer(),
    lengths=[300, 420],
    depths=[0.0, 0.5, 1.0],
    trials=2,
    seed=7,
    batch_size=4,
  )
  assert [r["key"] for r in again["records"]] == keys, "keys follow the seed"
  assert again["accuracy"] == out["accuracy"], "padded batches score only the real rows"
  assert first_integer(" 0123. 45") == 123 and first_integer("none") is None


def test_passkey_accuracy_of_a_tiny_random_llama(tmp_path):
  model, _ = _tiny_llama(seed=1)
  out = passkey_accuracy(model, ByteTokenizer(), lengths=[270], depths=[0.0, 1.0], trials=2, seed=0)
  acc = np.asarray(out["accuracy"])
  assert acc.shape == (1, 2) and np.all((acc >= 0) & (acc <= 1))
  assert {r["prompt_tokens"] for r in out["records"]} == {270}
  path = write_json(tmp_path / "eval" / "passkey.json", out)
  assert json.load(open(path))["accuracy"] == out["accuracy"]
  with pytest.raises(TypeError, match="init_cache/decode"):
    passkey_accuracy(
      FixedModel(np.ones(4) / 4), ByteTokenizer(), lengths=[300], depths=[0.5], trials=1, seed=0
    )


def test_plots_write_valid_pngs(tmp_path):
  rows = lambda scale: [dict(context_len=n, ppl=scale * n**0.1) for n in (64, 128, 256, 512)]
  ppl_path = plot_ppl_vs_length(
    {"default": rows(3.0), "yarn": rows(2.0)},
    tmp_path / "plots" / "ppl_vs_length.png",
    train_len=128,
  )
  heat_path = plot_passkey_heatmap(
    [[1.0, 0.5, 0.0], [0.25, 1.0, 0.75]],
    [256, 512],
    [0.0, 0.5, 1.0],
    tmp_path / "plots" / "passkey_depth_length.png",
    title="passkey",
  )
  for path in (ppl_path, heat_path):
    assert os.path.getsize(path) > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  with pytest.raises(ValueError, match="indexed \\[length\\]\\[depth\\]"):
    plot_passkey_heatmap([[1.0, 0.5]], [256, 512], [0.0, 0.5], tmp_path / "bad.png")


def test_write_json_is_atomic_and_handles_numpy(tmp_path):
  path = tmp_path / "eval" / "ppl.json"
  write_json(path, dict(nll=np.float32(1.5), grid=np.eye(2), n=np.int64(3)))
  assert json.loads(path.read_text()) == dict(nll=1.5, grid=[[1.0, 0.0], [0.0, 1.0]], n=3)
  with pytest.raises(TypeError, match="not JSON serializable"):
    write_json(path, dict(bad=object()))
  assert json.loads(path.read_text())["n"] == 3, "a failed write leaves the old file"
  assert os.listdir(tmp_path / "eval") == ["ppl.json"]


# ------------------------------------------------------------------------------------------------
# Truncated protocol (YaRN / LongRoPE): one window of the first L + 1 tokens per document.


def test_truncated_protocol_scores_each_document_prefix_once():
  rng = np.random.default_rng(5)
  p_V = rng.dirichlet(np.ones(11))
  docs = [rng.integers(0, 11, size=n).astype(np.int32) for n in (40, 9, 23, 5, 8)]
  model = FixedModel(p_V)
  out = perplexity(model, docs, context_len=8, batch_size=2, protocol="truncated")
  # Documents of >= 9 tokens (40, 9, 23) each give targets tokens[1:9]; 5 and 8 are skipped.
  targets = np.concatenate([d[1:9] for d in docs if d.size >= 9])
  np.testing.assert_allclose(out["nll"], -np.mean(np.log(p_V[targets])), rtol=1e-6)
  assert (out["tokens"], out["windows"], out["documents"]) == (24, 3, 3)
  assert (out["skipped_documents"], out["stride"], out["protocol"]) == (2, None, "truncated")
  assert model.traces == 1, "one compilation, the last batch of one document padded"
  capped = perplexity(model, docs, context_len=8, max_windows=2, protocol="truncated")
  assert (capped["tokens"], capped["documents"]) == (16, 2)
  sliding = perplexity(model, docs, context_len=8)
  assert sliding["protocol"] == "sliding" and sliding["tokens"] == 39 + 8 + 22


def test_truncated_protocol_equals_hand_computation_on_a_tiny_llama():
  """Each document's first L + 1 tokens: inputs [:L] at positions 0..L-1, all L targets."""
  model, _ = _tiny_llama(seed=2)
  rng = np.random.default_rng(6)
  docs = [rng.integers(0, 256, size=n).astype(np.int32) for n in (50, 12, 41, 30)]
  lengths = [8, 16, 24]
  rows = perplexity_vs_length(
    model, docs, lengths, batch_size=2, max_documents=2, protocol="truncated", logits_chunk=5
  )
  # Documents with >= 25 tokens are 50, 41 and 30; max_documents keeps the first two.
  kept = [docs[0], docs[2]]
  for length, row in zip(lengths, rows, strict=True):
    nll = []
    for doc in kept:
      logits_LV = np.asarray(model(jnp.asarray(doc[None, :length]))[0], np.float64)
      logp_LV = logits_LV - np.log(np.sum(np.exp(logits_LV), axis=-1, keepdims=True))
      nll.append(-logp_LV[np.arange(length), doc[1 : length + 1]])
    np.testing.assert_allclose(row["nll"], np.mean(np.concatenate(nll)), rtol=1e-5)
    assert (row["tokens"], row["windows"], row["documents"]) == (2 * length, 2, 2)
    assert (row["skipped_documents"], row["protocol"], row["stride"]) == (1, "truncated", None)


def test_truncated_protocol_one_window_for_all_lengths_equals_one_per_length():
  """A prefix-invariant model (causal, RoPE independent of the window length) scores every
  length from one max-length window per document; a `dynamic` RoPE reads the length, so it
  gets one window per length."""
  model, cfg = _tiny_llama(seed=3)
  rng = np.random.default_rng(7)
  docs = [rng.integers(0, 256, size=n).astype(np.int32) for n in (70, 66, 90)]
  lengths = [16, 32, 64]
  kwargs = dict(batch_size=2, protocol="truncated")
  shared = perplexity_vs_length(model, docs, lengths, share_prefix=True, **kwargs)
  separate = perplexity_vs_length(model, docs, lengths, share_prefix=False, **kwargs)
  np.testing.assert_allclose([r["nll"] for r in shared], [r["nll"] for r in separate], rtol=1e-6)
  assert [{**r, "nll": 0, "ppl": 0} for r in shared] == [
    {**r, "nll": 0, "ppl": 0} for r in separate
  ]
  assert prefix_invariant(model) and not prefix_invariant(FixedModel(np.ones(4) / 4))
  dynamic = dict(rope_type="dynamic", rope_theta=1e4, factor=2.0, max_position_embeddings=2048)
  assert not prefix_invariant(model_from_params(nnx.state(model, nnx.Param), cfg, dynamic))


def test_truncated_protocol_bad_arguments():
  model = FixedModel(np.ones(4) / 4)
  docs = [np.arange(20, dtype=np.int32) % 4]
  with pytest.raises(ValueError, match="protocol='strided' is unknown"):
    perplexity(model, docs, context_len=8, protocol="strided")
  with pytest.raises(ValueError, match="stride=4 applies to protocol 'sliding'"):
    perplexity(model, docs, context_len=8, stride=4, protocol="truncated")
  with pytest.raises(ValueError, match="needs doc_mode='separate'"):
    perplexity_vs_length(model, docs, [8], doc_mode="concatenate", protocol="truncated")
  with pytest.raises(ValueError, match="no document"):
    perplexity(model, docs, context_len=20, protocol="truncated")


def test_ppl_protocol_config_field_and_table_header():
  config = base_config()
  config.eval.ppl_protocol = "windows"
  with pytest.raises(ConfigError, match=r"eval\.ppl_protocol='windows' is unknown"):
    validate_config(config, num_devices=1)
  model = FixedModel(np.ones(4) / 4)
  docs = [np.arange(40, dtype=np.int32) % 4]
  for protocol, words in (("truncated", "one window of L tokens"), ("sliding", "stride 8, 16")):
    rows = perplexity_vs_length(model, docs, [8, 16], stride_fraction=1.0, protocol=protocol)
    table = format_ppl_table({"trained": rows}, train_len=8)
    assert table.splitlines()[0].startswith(f"protocol: {protocol} (") and words in table
