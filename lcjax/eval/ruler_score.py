"""Scoring RULER samples: RULER's string matching over greedy generations, and two
teacher-forced scores from one forward pass.

Generation scores (NVIDIA/RULER `scripts/eval/synthetic/constants.py` and `evaluate.py`):
the model continues `prompt` (input + answer prefix) greedily for the task's
`tokens_to_generate` tokens (stopping at EOS); the text is post-processed as `postprocess_pred`
does (strip, control characters to newlines, strip) and scored with

  string_match_all = 100 * mean_samples( |{r in refs : r.lower() in pred.lower()}| / |refs| )
  string_match_part = 100 * mean_samples( max_{r in refs} [r.lower() in pred.lower()] )

(niah, vt, cwe and fwe use `string_match_all`, qa `string_match_part`), rounded to 2 decimals.

Greedy decoding runs on prompts of unequal lengths in one batch (`greedy_generate`): the
prompts are right-padded to one bucket and prefilled together, and each decoding step writes
row b's KV entry at its own index len_b + t (the model's `hidden_states` with a cache, vmapped
over rows so the cache index is per row). Causal masking by index hides the padding, so every
row decodes exactly as `lcjax.models.generate` decodes it alone (tests/test_ruler.py). Models
with Mamba-2 layers carry recurrent state through the padding, so their rows are grouped by
exact length and decoded with `lcjax.models.generate`.

Teacher-forced scores (for small models; studies.md §1): one forward over prompt + gold
continuation, tokenized together and split at the prompt's tokens (so BPE boundaries match what
generation sees; when the joint tokens do not start with the prompt's, the gold is tokenized
alone). For every gold token the model's log-probability and whether it is the argmax given
the gold prefix are read off. Greedy decoding emits the gold continuation exactly when every
gold token is that argmax, so `tf_em` (all gold tokens are argmax) equals exact match of
`greedy_generate` at 1/N of its cost (same tie rule: the lowest id wins, as `jnp.argmax`).
Items are scored like RULER: for string_match_all tasks the item-level score averages, over
the answers, whether all tokens of that answer inside the gold continuation are argmax
(`greedy_em_all`); for qa the best reference counts (`greedy_em_part`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.eval.ruler_data import RulerSample
from lcjax.models.generate import generate

__all__ = [
  "GENERATION_SCORERS",
  "TEACHER_FORCED_SCORERS",
  "gold_tokens",
  "greedy_generate",
  "model_forward",
  "postprocess_pred",
  "score_generations",
  "string_match_all",
  "string_match_part",
  "teacher_forced",
]


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
  """RULER `scripts/eval/synthetic/constants.py` string_match_part (any reference found)."""
  score = (
    sum(
      max(1.0 if r.lower() in p.lower() else 0.0 for r in ref)
      for p, ref in zip(preds, refs, strict=True)
    )
    / len(preds)
    * 100
  )
  return round(score, 2)


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
  """RULER `scripts/eval/synthetic/constants.py` string_match_all (fraction of references found)."""
  score = (
    sum(
      sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref)
      for p, ref in zip(preds, refs, strict=True)
    )
    / len(preds)
    * 100
  )
  return round(score, 2)


# scripts/eval/synthetic/constants.py TASKS[...]["metric_fn"], by generator.
GENERATION_SCORERS: dict[str, str] = {
  "niah": "string_match_all",
  "variable_tracking": "string_match_all",
  "common_words_extraction": "string_match_all",
  "freq_words_extraction": "string_match_all",
  "qa": "string_match_part",
}
TEACHER_FORCED_SCORERS = {
  "string_match_all": "greedy_em_all",
  "string_match_part": "greedy_em_part",
}
_METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(predict_str: str) -> str:
  """RULER `scripts/eval/evaluate.py` postprocess_pred."""
  predict_str = predict_str.strip()
  predict_str = _CONTROL.sub("\n", predict_str).strip()
  return predict_str


def score_generations(scorer: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
  """RULER's `scorer` over post-processed predictions (0-100, 2 decimals)."""
  return _METRICS[scorer]([postprocess_pred(p) for p in preds], refs)


# --- tokens of the gold continuations ----------------------------------------------------------


def gold_tokens(tokenizer, sample: RulerSample) -> list[tuple[np.ndarray, list[np.ndarray]]]:
  """Per gold continuation: (tokens_G, one boolean mask over G per item of `gold_items`).

  The continuation is tokenized with the prompt and split at the prompt's tokens; an item's
  mask marks the tokens that overlap its characters inside the continuation.
  """
  bos = getattr(tokenizer, "bos_id", None)
  out = []
  for gold, items in zip(sample.gold, sample.gold_items, strict=True):
    joint = np.asarray(tokenizer.encode(sample.prompt + gold), np.int32)
    if bos is not None:
      joint = np.concatenate([np.array([bos], np.int32), joint])
    P = sample.prompt_ids.size
    if joint.size > P and np.array_equal(joint[:P], sample.prompt_ids):
      g = joint[P:]
    else:
      g = np.asarray(tokenizer.encode(gold), np.int32)
    ends = [len(tokenizer.decode(g[: k + 1])) for k in range(g.size)]
    starts = [0] + ends[:-1]
    masks, at = [], 0
    for item in items:
      lo = gold.find(item, at)
      if lo < 0:
        lo = gold.find(item)
      hi = lo + len(item)
      at = max(at, hi)
      masks.append(np.array([s < hi and e > lo for s, e in zip(starts, ends, strict=True)], bool))
    out.append((g, masks))
  return out


# --- teacher-forced forward ---------------------------------------------------------------------

# forward(tokens_BT, where_BA) -> logits_BAV: next-token logits at the positions where_BA.
Forward = Callable[[np.ndarray, np.ndarray], jax.Array]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _gathered_logits(graphdef, state, tokens_BT, where_BA):
  model = nnx.merge(graphdef, state)
  if hasattr(model, "hidden_states"):
    h_BTD, _ = model.hidden_states(tokens_BT)
    h_BAD = jnp.take_along_axis(h_BTD, where_BA[:, :, None], axis=1)
    return model.logits(h_BAD).astype(jnp.float32)
  logits_BTV = model(tokens_BT)
  return jnp.take_along_axis(logits_BTV, where_BA[:, :, None], axis=1).astype(jnp.float32)


def model_forward(model) -> Forward:
  """The `Forward` of an lcjax model: one jitted pass, logits only at the gathered positions
  (a [B, T, V] logits array of a 32K prompt and a 128K vocabulary would not fit)."""
  graphdef, state = nnx.split(model)
  return lambda tokens_BT, where_BA: _gathered_logits(
    graphdef, state, jnp.asarray(tokens_BT, jnp.int32), jnp.asarray(where_BA, jnp.int32)
  )


@jax.jit
def _read_gold(logits_BAV, gold_BA):
  logp_BAV = jax.nn.log_softmax(logits_BAV, axis=-1)
  logp_BA = jnp.take_along_axis(logp_BAV, gold_BA[:, :, None], axis=-1)[:, :, 0]
  return logp_BA, jnp.argmax(logits_BAV, axis=-1) == gold_BA


def _bucket(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def teacher_forced(
  forward: Forward,
  rows: Sequence[tuple[np.ndarray, np.ndarray]],
  *,
  batch_size: int,
  length: int,
  pad_id: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
  """(logp_G, hit_G) per row (prompt_P, gold_G): log p(gold token | prefix) and argmax == gold.

  Rows are right-padded to one [batch_size, T] shape per call (T = `length` unless a row is
  longer, then the next multiple of 256) and gold positions to a multiple of 128, so a grid
  compiles once per length. Right padding is exact under causal attention.
  """
  if not rows:
    return []
  T = max(length, max(p.size + g.size for p, g in rows))
  T = T if T == length else _bucket(T, 256)
  A = _bucket(max(g.size for _, g in rows), 128)
  out = []
  for b in range(0, len(rows), batch_size):
    chunk = list(rows[b : b + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)
    tokens_BT = np.full((batch_size, T), pad_id, np.int32)
    where_BA = np.zeros((batch_size, A), np.int32)
    gold_BA = np.zeros((batch_size, A), np.int32)
    for i, (p, g) in enumerate(chunk):
      seq = np.concatenate([p, g])
      tokens_BT[i, : seq.size] = seq
      where_BA[i, : g.size] = p.size - 1 + np.arange(g.size)
      gold_BA[i, : g.size] = g
    logp_BA, hit_BA = _read_gold(forward(tokens_BT, where_BA), jnp.asarray(gold_BA))
    logp_BA, hit_BA = np.asarray(logp_BA), np.asarray(hit_BA)
    for i, (_, g) in enumerate(chunk[:real]):
      out.append((logp_BA[i, : g.size], hit_BA[i, : g.size]))
  return out


# --- greedy decoding of prompts of unequal lengths ----------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy_ragged(graphdef, state, tokens_BP, lengths_B, max_new_tokens):
  model = nnx.merge(graphdef, state)
  B, P = tokens_BP.shape
  caches = model.init_cache(B, P + max_new_tokens)
  h_BPD, caches = model.hidden_states(tokens_BP, caches=caches, cache_index=0)
  last_B1D = jnp.take_along_axis(h_BPD, (lengths_B - 1)[:, None, None], axis=1)
  first_B = jnp.argmax(model.logits(last_B1D)[:, 0], axis=-1).astype(jnp.int32)

  def one_row(token, cache, index):  # one row, its own cache index
    cache = jax.tree.map(lambda x: x[None], cache)
    h_11D, cache = model.hidden_states(token[None, None], caches=cache, cache_index=index)
    return model.logits(h_11D)[0, 0], jax.tree.map(lambda x: x[0], cache)

  def step(i, carry):
    out_BN, caches = carry
    logits_BV, caches = jax.vmap(one_row)(out_BN[:, i - 1], caches, lengths_B + i - 1)
    next_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return out_BN.at[:, i].set(next_B), caches

  out_BN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first_B)
  out_BN, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out_BN, caches))
  return out_BN


def _recurrent(model) -> bool:
  return "mamba2" in tuple(getattr(model, "layer_kinds", ()))


def greedy_generate(
  model,
  prompts: Sequence[np.ndarray],
  *,
  max_new_tokens: int,
  batch_size: int,
  bucket: int | None = None,
  pad_id: int = 0,
) -> list[np.ndarray]:
  """Greedy continuations (int32 [max_new_tokens] each) of prompts of any lengths.

  Args:
    model: an lcjax model with `init_cache`, `hidden_states` (caches, cache_index), `logits`.
    prompts: int token arrays (BOS included).
    max_new_tokens: tokens to generate per prompt.
    batch_size: rows per call; the last batch repeats its last row.
    bucket: the padded prompt length (default: the longest prompt), one compile per value.
    pad_id: token written after shorter prompts (never attended).
  """
  if not prompts:
    return []
  if not (hasattr(model, "init_cache") and hasattr(model, "decode")):
    raise TypeError(f"{type(model).__name__} has no KV cache (init_cache/decode) to decode with")
  longest = max(p.size for p in prompts)
  P = longest if bucket is None else bucket
  if P < longest:
    raise ValueError(f"bucket={P} is shorter than the longest prompt ({longest} tokens)")
  out: list[np.ndarray | None] = [None] * len(prompts)
  if _recurrent(model):  # exact lengths only: padding would pass through the SSM state
    by_size: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
      by_size.setdefault(p.size, []).append(i)
    for size, ids in by_size.items():
      for b in range(0, len(ids), batch_size):
        part = ids[b : b + batch_size]
        rows = [prompts[i] for i in part] + [prompts[part[-1]]] * (batch_size - len(part))
        new_BN = np.asarray(generate(model, np.stack(rows), max_new_tokens=max_new_tokens))
        for k, i in enumerate(part):
          out[i] = new_BN[k, size:]
    return out
  graphdef, state = nnx.split(model)
  for b in range(0, len(prompts), batch_size):
    part = list(range(b, min(b + batch_size, len(prompts))))
    part += [part[-1]] * (batch_size - len(part))
    tokens_BP = np.full((batch_size, P), pad_id, np.int32)
    lengths_B = np.zeros(batch_size, np.int32)
    for k, i in enumerate(part):
      tokens_BP[k, : prompts[i].size] = prompts[i]
      lengths_B[k] = prompts[i].size
    new_BN = np.asarray(
      _greedy_ragged(
        graphdef, state, jnp.asarray(tokens_BP), jnp.asarray(lengths_B), max_new_tokens
      )
    )
    for k, i in enumerate(part[: min(batch_size, len(prompts) - b)]):
      out[i] = new_BN[k]
  return out


def cut_at_eos(new_N: np.ndarray, eos_id: int | None) -> np.ndarray:
  """The generated tokens before the first EOS (generation stops there)."""
  if eos_id is None:
    return new_N
  stop = np.flatnonzero(new_N == eos_id)
  return new_N if stop.size == 0 else new_N[: stop[0]]


def leading_matches(hit_G: np.ndarray) -> int:
  """How many gold tokens in a row from the start are argmax (greedy would emit them)."""
  miss = np.flatnonzero(~np.asarray(hit_G, bool))
  return int(hit_G.size if miss.size == 0 else miss[0])


def item_score(scorer: str, hits: Sequence[np.ndarray], masks: Sequence[Sequence[np.ndarray]]):
  """The teacher-forced score of one sample, 0-100, averaged like RULER's `scorer`.

  `hits[c]` are gold continuation c's argmax flags and `masks[c]` its items' token masks.
  string_match_all: the fraction of items (of the first continuation) whose tokens are all
  argmax; string_match_part: whether some continuation is argmax throughout.
  """
  if scorer == "string_match_part":
    return 100.0 * max(float(np.all(h)) for h in hits)
  found = [float(np.all(hits[0][m])) if m.any() else 0.0 for m in masks[0]]
  return 100.0 * sum(found) / max(len(found), 1)


def mean_or_nan(values: Sequence[float]) -> float:
  return float(np.mean(values)) if len(values) else math.nan
