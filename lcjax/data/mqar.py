"""Multi-query associative recall (MQAR) examples: K key-value pairs, a separator, K queries.

Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models"
(arXiv:2312.04927), §3.1 and Fig. 2; the task is HazyResearch/zoology
`zoology/data/associative_recall.py` (`_mqar`): keys and values come from disjoint halves
of the vocabulary, every key appears once per example (`np.random.choice(...,
replace=False)`), values are drawn without replacement too, and the label is the value
that follows the queried key; every other label is ignored (-100 there, loss weight 0
here). RULER's MQ-NIAH is the same task in natural language (Hsieh et al. 2024).

lcjax's layout (notes/studies.md §4, the CPU design of the state-capacity study) keeps the
queries contiguous after a separator instead of Zoology's power-law gaps:

  k_1 v_1 k_2 v_2 ... k_K v_K SEP q_1 a_1 q_2 a_2 ... q_Q a_Q

with `q_j` one of the K keys and `a_j` its value; the loss weighs the targets `a_j` alone
(predicted from `... q_j`). With Q <= K the queried keys are distinct; with Q > K every key
is queried once per round of a fresh permutation. A recurrent model must hold all K pairs
in its state at SEP, which is what the study measures against the state size N.

Token ids (no tokenizer needed; ids are below every special id of the byte tokenizer):
keys `0..num_keys-1`, values `num_keys..num_keys+num_values-1`, SEP `num_keys+num_values`
(`mqar_vocabulary`). Row `tokens` are the example without its last token and `targets`
the example shifted by one, as the packer frames a document (`lcjax.data.packing`).

- `mqar_example(rng, num_pairs=, num_queries=, num_keys=, num_values=)`: one example's
  tokens and its answer mask.
- `mqar_batch(rng, rows=, num_pairs=, ...)`: [B, T] tokens / targets / weights of `rows`
  examples with exactly `num_pairs` pairs (the evaluation, `lcjax.eval.mqar`).
- `mqar_length(num_pairs, num_queries)`: tokens of one example (2K + 1 + 2Q).

Training rows (K uniform in [1, max_pairs] per row) are `lcjax.data.synthetic`'s task
`mqar` (`data.synthetic.task="mqar"`), built on `mqar_example`.
"""

from __future__ import annotations

import numpy as np

__all__ = [
  "MQAR_DEFAULTS",
  "mqar_batch",
  "mqar_example",
  "mqar_length",
  "mqar_vocabulary",
]

# notes/studies.md §4: 64 key and 64 value tokens plus SEP, K ~ U[1, 16], 16 queries.
MQAR_DEFAULTS = {"num_keys": 64, "num_values": 64, "max_pairs": 16, "num_queries": 16}


def mqar_vocabulary(num_keys: int, num_values: int) -> dict[str, int]:
  """{'key_start', 'value_start', 'sep', 'size'}: the id ranges of keys and values and SEP."""
  return dict(
    key_start=0, value_start=num_keys, sep=num_keys + num_values, size=num_keys + num_values + 1
  )


def mqar_length(num_pairs: int, num_queries: int) -> int:
  """Tokens of one example: K pairs, SEP and Q query-answer pairs (2K + 1 + 2Q)."""
  return 2 * num_pairs + 1 + 2 * num_queries


def _query_indices(rng: np.random.Generator, num_pairs: int, num_queries: int) -> np.ndarray:
  """Which pairs the Q queries ask: distinct when Q <= K, else rounds of permutations."""
  rounds = [rng.permutation(num_pairs) for _ in range(-(-num_queries // num_pairs))]
  return np.concatenate(rounds)[:num_queries]


def mqar_example(
  rng: np.random.Generator,
  *,
  num_pairs: int,
  num_queries: int,
  num_keys: int,
  num_values: int,
) -> tuple[np.ndarray, np.ndarray]:
  """One MQAR example (module docstring): (tokens int32[n], answer bool[n]), n = 2K + 1 + 2Q.

  `answer[j]` is True where `tokens[j]` is a queried value, i.e. where the target of
  position j - 1 is scored. Keys are distinct (Zoology: each key once per example) and so
  are values, so K may not exceed `num_keys` nor `num_values`.
  """
  if not 1 <= num_pairs <= min(num_keys, num_values):
    raise ValueError(
      f"num_pairs={num_pairs} must be in [1, min(num_keys={num_keys}, num_values={num_values})]"
    )
  if num_queries < 1:
    raise ValueError(f"num_queries={num_queries} must be >= 1")
  vocab = mqar_vocabulary(num_keys, num_values)
  keys_K = vocab["key_start"] + rng.choice(num_keys, size=num_pairs, replace=False)
  values_K = vocab["value_start"] + rng.choice(num_values, size=num_pairs, replace=False)
  asked_Q = _query_indices(rng, num_pairs, num_queries)
  context = np.stack([keys_K, values_K], axis=1).reshape(-1)
  queries = np.stack([keys_K[asked_Q], values_K[asked_Q]], axis=1).reshape(-1)
  tokens = np.concatenate([context, [vocab["sep"]], queries]).astype(np.int32)
  answer = np.zeros(tokens.size, bool)
  answer[2 * num_pairs + 2 :: 2] = True  # the a_j of "SEP q_1 a_1 q_2 a_2 ..."
  return tokens, answer


def mqar_batch(
  rng: np.random.Generator,
  *,
  rows: int,
  num_pairs: int,
  num_queries: int,
  num_keys: int,
  num_values: int,
) -> dict[str, np.ndarray]:
  """`rows` examples with exactly K = `num_pairs` pairs, as model inputs of T = n - 1 tokens.

  Returns dict(tokens [B, T], targets [B, T] (int32), weights [B, T] (float32, 1 on the
  answer targets)); every row has Q answers.
  """
  examples = [
    mqar_example(
      rng,
      num_pairs=num_pairs,
      num_queries=num_queries,
      num_keys=num_keys,
      num_values=num_values,
    )
    for _ in range(rows)
  ]
  tokens_Bn = np.stack([t for t, _ in examples])
  answer_Bn = np.stack([a for _, a in examples])
  return {
    "tokens": tokens_Bn[:, :-1],
    "targets": tokens_Bn[:, 1:],
    "weights": answer_Bn[:, 1:].astype(np.float32),
  }
