"""Synthetic task rows: generated rows with task loss weights, trained on by `lcjax.train` as is.

`data.synthetic.task` names a generator of `SYNTHETIC_TASKS`; with it set, `make_train_iterator`
yields that task's rows instead of packing `data.source` (which is then not read for training;
`make_eval_documents` still reads it). Every row is one example of `data.seq_len` tokens with the
packer's keys (`lcjax.data.packing.ROW_KEYS`): segment id 1 on the example, 0 on padding at the
end, positions from `data.position_scheme`, and loss weights that say what the task trains.

Tasks and their options (`SYNTHETIC_OPTIONS` lists them all; None means unset):

- `passkey`: passkey retrieval rows (Mohtashami & Jaggi 2023, Landmark Attention; the 5-digit
  variant of Chen et al. 2024, "Stuffed Mamba", arXiv:2410.07145, §6): the prompt of
  `lcjax.eval.passkey.make_passkey_prompt` (what `eval.passkey` asks, BOS included), then
  " " + the key. The needle depth is uniform in [0, 1] and the key uniform over the
  `key_digits`-digit integers (default 5). Loss weight 1 on the targets that are the key's
  digits and `lm_weight` (default 0.0) on every other target of the row.

- `mqar`: multi-query associative recall (Arora et al. 2023, "Zoology", arXiv:2312.04927;
  `lcjax.data.mqar`, re-exported here as `lcjax.data.synthetic.mqar`): K key-value pairs over
  `num_keys` key and `num_values` value tokens (default 64 each), SEP, then `num_queries`
  (default 16) queries `k v`; K uniform in [1, `max_pairs`] (default 16) per row; loss weight 1
  on the queried values, 0 elsewhere. One example per row, padded (segment 0) to `seq_len`,
  which must hold the longest example (2·max_pairs + 2·num_queries tokens of input).
- `token_passkey`: passkey retrieval a tiny model can learn (notes/studies.md §4): single-token
  digits, a key of `min_key_digits`..`key_digits` digits (default 2..3, uniform per example),
  uniform random filler over `filler_vocab` tokens (default 64) and a length curriculum:
  `filler ... MARK d_1 .. d_D filler ... MARK d_1 .. d_D`, needle depth uniform, loss weight 1 on
  the answer digits. One MARK token opens the needle and asks the question, as Landmark's
  "The pass key is" does in both places (`lcjax.eval.passkey`). Example length grows linearly
  from `seq_len`/4 (`min_length_fraction`, default 0.25) at row 0 to `seq_len` + 1 at row
  `curriculum_rows` (default 0: no curriculum);
  each row packs as many examples of the current length as fit, each its own segment (the
  Mamba-2 state and the attention mask reset at segment starts). `token_passkey_example` builds
  one example; `lcjax.eval.mqar.token_passkey_accuracy` evaluates at any length.

Rows of the `train` split weigh as above; rows of any other split (the validation loss of
`lcjax.train.loop`) weigh the answer alone, so `eval/loss` is the task's answer loss, and
`token_passkey` validation rows are full length (no curriculum).

Determinism and resume: row `i` of a process is a pure function of (seed, split, process index,
i) (`np.random.default_rng`), so the iterator state is the row count (plus the counters of
`lcjax.data.packing.COUNTER_KEYS`) and a restored iterator gives the identical next rows.
Processes draw different rows. A new task is a row function in `_ROW_FUNCTIONS` with its
options in `SYNTHETIC_OPTIONS`, `_TASK_OPTIONS` and `_DEFAULTS`, checked in `_CHECKS`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

import lcjax.data.mqar as mqar  # re-exported: lcjax.data.synthetic.mqar
from lcjax.config import ConfigError, check_kind_options
from lcjax.data.mqar import MQAR_DEFAULTS, mqar_example, mqar_length, mqar_vocabulary
from lcjax.data.packing import COUNTER_KEYS, make_positions_np
from lcjax.eval.passkey import make_passkey_prompt, shortest_passkey_prompt

__all__ = [
  "SYNTHETIC_OPTIONS",
  "SYNTHETIC_TASKS",
  "TOKEN_PASSKEY_DEFAULTS",
  "SyntheticRows",
  "check_synthetic_options",
  "mqar",
  "mqar_row",
  "passkey_row",
  "token_passkey_example",
  "token_passkey_length",
  "token_passkey_row",
  "token_passkey_vocabulary",
]

SYNTHETIC_TASKS = ("passkey", "mqar", "token_passkey")

# Every option of every task and its type (`default_data_config()` declares each one unset, so
# the command line can set it: `--config.data.synthetic.task=passkey`).
SYNTHETIC_OPTIONS = {
  "task": str,
  "key_digits": int,
  "lm_weight": float,
  "num_keys": int,
  "num_values": int,
  "max_pairs": int,
  "num_queries": int,
  "min_key_digits": int,
  "filler_vocab": int,
  "curriculum_rows": int,
  "min_length_fraction": float,
}
TOKEN_PASSKEY_DEFAULTS = {
  "key_digits": 3,
  "min_key_digits": 2,
  "filler_vocab": 64,
  "curriculum_rows": 0,
  "min_length_fraction": 0.25,
}
_DEFAULTS = {
  "passkey": {"key_digits": 5, "lm_weight": 0.0},
  "mqar": dict(MQAR_DEFAULTS),
  "token_passkey": dict(TOKEN_PASSKEY_DEFAULTS),
}
_TASK_OPTIONS = {task: ("task", *defaults) for task, defaults in _DEFAULTS.items()}
_SPECIAL_IDS = 256  # task ids stay below the byte tokenizer's pad/bos/eos (256, 257, 258)


def _is_int(value: Any) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_int(out: dict, key: str, low: int, high: int | None = None) -> None:
  value = out[key]
  if not _is_int(value) or value < low or (high is not None and value > high):
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ConfigError(f"data.synthetic.{key} must be an int {bound}, got {value!r}")
  out[key] = int(value)


def _check_passkey(out: dict) -> None:
  _check_int(out, "key_digits", 1, 18)
  weight = out["lm_weight"]
  if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
    raise ConfigError(f"data.synthetic.lm_weight must be a number >= 0, got {weight!r}")
  if not math.isfinite(weight):
    raise ConfigError(f"data.synthetic.lm_weight must be finite, got {weight!r}")
  out["lm_weight"] = float(weight)


def _check_mqar(out: dict) -> None:
  for key in ("num_keys", "num_values", "max_pairs", "num_queries"):
    _check_int(out, key, 1)
  size = mqar_vocabulary(out["num_keys"], out["num_values"])["size"]
  if size > _SPECIAL_IDS:
    raise ConfigError(
      f"data.synthetic.num_keys + num_values = {size - 1} leaves no id for SEP below "
      f"{_SPECIAL_IDS}; lower num_keys or num_values (their sum must be <= {_SPECIAL_IDS - 1})"
    )
  most = min(out["num_keys"], out["num_values"])
  if out["max_pairs"] > most:
    raise ConfigError(
      f"data.synthetic.max_pairs={out['max_pairs']} exceeds min(num_keys, num_values)={most} "
      "(keys and values are distinct within a row); lower max_pairs"
    )


def _check_token_passkey(out: dict) -> None:
  _check_int(out, "key_digits", 1, 18)
  _check_int(out, "min_key_digits", 1, out["key_digits"])
  _check_int(out, "filler_vocab", 1, _SPECIAL_IDS - token_passkey_vocabulary(1)["filler_start"])
  _check_int(out, "curriculum_rows", 0)
  fraction = out["min_length_fraction"]
  if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
    raise ConfigError(
      f"data.synthetic.min_length_fraction must be a number in (0, 1], got {fraction!r}"
    )
  out["min_length_fraction"] = float(fraction)


_CHECKS: dict[str, Callable[[dict], None]] = {
  "passkey": _check_passkey,
  "mqar": _check_mqar,
  "token_passkey": _check_token_passkey,
}


def check_synthetic_options(options: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """The task's options with its defaults (None when `task` is unset); ConfigError if bad.

  `options` are those `data.synthetic` sets (None-valued ones dropped).
  """
  options = {k: v for k, v in (options or {}).items() if v is not None}
  task = options.get("task")
  if task is None:
    if options:
      raise ConfigError(
        f"data.synthetic.{sorted(options)[0]} is set but data.synthetic.task is not; set "
        f"task to one of {', '.join(SYNTHETIC_TASKS)} or unset the option"
      )
    return None
  if task not in SYNTHETIC_TASKS:
    raise ConfigError(
      f"data.synthetic.task={task!r} is unknown; choose one of {', '.join(SYNTHETIC_TASKS)}"
    )
  check_kind_options(
    options,
    field="data.synthetic",
    kind=task,
    allowed_by_kind=_TASK_OPTIONS,
    known=SYNTHETIC_OPTIONS,
    what="synthetic task",
  )
  out = {**_DEFAULTS[task], **options}
  _CHECKS[task](out)
  return out


def _row_arrays(
  row: np.ndarray,
  answer_weights: np.ndarray,
  lm_weight: float,
  seq_len: int,
  pad_id: int,
  position_scheme: str,
) -> dict[str, np.ndarray]:
  """One example's `[n]` tokens (n <= T + 1) as a packer row of T tokens.

  `answer_weights[j]` is the weight of predicting `row[j]` from its prefix (index 0 unused):
  the task's answer tokens weigh 1, and every other target `lm_weight`.
  """
  n = row.size
  tokens_T = np.full(seq_len, pad_id, np.int32)
  targets_T = np.full(seq_len, pad_id, np.int32)
  segment_ids_T = np.zeros(seq_len, np.int32)
  weights_T = np.zeros(seq_len, np.float32)
  tokens_T[: min(n, seq_len)] = row[:seq_len]
  segment_ids_T[: min(n, seq_len)] = 1
  targets_T[: n - 1] = row[1:]
  weights_T[: n - 1] = np.where(answer_weights[1:] > 0, answer_weights[1:], lm_weight)
  return {
    "tokens": tokens_T,
    "targets": targets_T,
    "segment_ids": segment_ids_T,
    "positions": make_positions_np(segment_ids_T, position_scheme),
    "loss_weights": weights_T,
  }


def passkey_row(
  tokenizer,
  rng: np.random.Generator,
  *,
  seq_len: int,
  key_digits: int = 5,
  lm_weight: float = 0.0,
  position_scheme: str = "global",
) -> dict[str, np.ndarray]:
  """One passkey row of `seq_len` tokens: prompt + " " + key, weight 1 on the key's digits.

  The prompt (`make_passkey_prompt`, the format `eval.passkey` asks) is the longest that
  leaves room for the answer in T + 1 tokens (exactly T + 1 with a byte tokenizer; other
  tokenizers may leave padding at the end). Needle depth uniform in [0, 1], key uniform
  over the `key_digits`-digit integers; every other target weighs `lm_weight`.
  """
  key = int(rng.integers(10 ** (key_digits - 1), 10**key_digits))
  depth = float(rng.uniform())
  space_S = np.asarray(tokenizer.encode(" "), np.int32).reshape(-1)
  digits_A = np.asarray(tokenizer.encode(str(key)), np.int32).reshape(-1)
  prompt_P, _ = make_passkey_prompt(
    tokenizer, length_tokens=seq_len + 1 - space_S.size - digits_A.size, depth=depth, key=key
  )
  row = np.concatenate([prompt_P, space_S, digits_A]).astype(np.int32)
  answer = np.zeros(row.size, np.float32)
  answer[row.size - digits_A.size :] = 1.0
  return _row_arrays(row, answer, lm_weight, seq_len, tokenizer.pad_id, position_scheme)


def _passkey_min_len(tokenizer, options: Mapping[str, Any]) -> int:
  """The shortest `data.seq_len` a passkey row fits in (prompt without filler + answer)."""
  digits = options["key_digits"]
  answer = len(tokenizer.encode(" ")) + len(tokenizer.encode(str(10 ** (digits - 1))))
  return shortest_passkey_prompt(tokenizer, key_digits=digits) + answer - 1


def mqar_row(
  tokenizer,
  rng: np.random.Generator,
  *,
  seq_len: int,
  num_keys: int = MQAR_DEFAULTS["num_keys"],
  num_values: int = MQAR_DEFAULTS["num_values"],
  max_pairs: int = MQAR_DEFAULTS["max_pairs"],
  num_queries: int = MQAR_DEFAULTS["num_queries"],
  position_scheme: str = "global",
) -> dict[str, np.ndarray]:
  """One MQAR row (`lcjax.data.mqar`): K ~ U[1, max_pairs] pairs, SEP, `num_queries` queries.

  Loss weight 1 on the queried values' targets, 0 elsewhere (Zoology's -100 labels);
  padding (segment 0) after the example.
  """
  num_pairs = int(rng.integers(1, max_pairs + 1))
  tokens, answer = mqar_example(
    rng,
    num_pairs=num_pairs,
    num_queries=num_queries,
    num_keys=num_keys,
    num_values=num_values,
  )
  return _row_arrays(
    tokens, answer.astype(np.float32), 0.0, seq_len, tokenizer.pad_id, position_scheme
  )


def _mqar_min_len(tokenizer, options: Mapping[str, Any]) -> int:
  del tokenizer
  return mqar_length(options["max_pairs"], options["num_queries"]) - 1


def token_passkey_vocabulary(filler_vocab: int) -> dict[str, int]:
  """Ids of `token_passkey`: digits 0..9, MARK 10, filler 11..11+filler_vocab-1."""
  return dict(digit_start=0, mark=10, filler_start=11, size=11 + filler_vocab)


def token_passkey_example(
  rng: np.random.Generator,
  *,
  length: int,
  key_digits: int = TOKEN_PASSKEY_DEFAULTS["key_digits"],
  min_key_digits: int = TOKEN_PASSKEY_DEFAULTS["min_key_digits"],
  filler_vocab: int = TOKEN_PASSKEY_DEFAULTS["filler_vocab"],
  depth: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """One passkey example of `length` tokens: (tokens int32[length], answer bool[length]).

  `filler MARK d_1..d_D filler MARK d_1..d_D`: D uniform in [min_key_digits, key_digits],
  digits uniform (single tokens), filler uniform over `filler_vocab` ids, and round(depth·F)
  of the F filler tokens before the needle (depth uniform in [0, 1] when None). `answer`
  marks the D digits after the second MARK (the scored targets).
  """
  num_digits = int(rng.integers(min_key_digits, key_digits + 1))
  filler = length - 2 * num_digits - 2
  if filler < 0:
    raise ValueError(f"length={length} is below the {2 * num_digits + 2} tokens of the needle")
  vocab = token_passkey_vocabulary(filler_vocab)
  depth = float(rng.uniform()) if depth is None else float(depth)
  before = round(depth * filler)
  digits_D = vocab["digit_start"] + rng.integers(0, 10, size=num_digits)
  filler_F = vocab["filler_start"] + rng.integers(0, filler_vocab, size=filler)
  tokens = np.concatenate(
    [
      filler_F[:before],
      [vocab["mark"]],
      digits_D,
      filler_F[before:],
      [vocab["mark"]],
      digits_D,
    ]
  ).astype(np.int32)
  answer = np.zeros(length, bool)
  answer[length - num_digits :] = True
  return tokens, answer


def token_passkey_length(index: int, seq_len: int, options: Mapping[str, Any]) -> int:
  """The example length of training row `index`: the T/4 -> T curriculum (T + 1 tokens at T).

  Linear from max(ceil(min_length_fraction·(T + 1)), the needle) at row 0 to T + 1 at row
  `curriculum_rows` and after (always T + 1 when curriculum_rows is 0).
  """
  full = seq_len + 1
  rows = options["curriculum_rows"]
  if rows <= 0 or index >= rows:
    return full
  low = max(math.ceil(options["min_length_fraction"] * full), 2 * options["key_digits"] + 2)
  return min(full, low + (full - low) * int(index) // rows)


def token_passkey_row(
  tokenizer,
  rng: np.random.Generator,
  *,
  seq_len: int,
  index: int = 0,
  key_digits: int = TOKEN_PASSKEY_DEFAULTS["key_digits"],
  min_key_digits: int = TOKEN_PASSKEY_DEFAULTS["min_key_digits"],
  filler_vocab: int = TOKEN_PASSKEY_DEFAULTS["filler_vocab"],
  curriculum_rows: int = TOKEN_PASSKEY_DEFAULTS["curriculum_rows"],
  min_length_fraction: float = TOKEN_PASSKEY_DEFAULTS["min_length_fraction"],
  position_scheme: str = "global",
) -> dict[str, np.ndarray]:
  """Row `index` of `token_passkey`: as many examples of the curriculum length as fit.

  Each example of n tokens fills n - 1 positions (inputs; targets shifted by one) as its
  own segment 1, 2, ...; loss weight 1 on each example's answer digits; padding at the end.
  """
  options = dict(
    curriculum_rows=curriculum_rows, min_length_fraction=min_length_fraction, key_digits=key_digits
  )
  length = token_passkey_length(index, seq_len, options)
  tokens_T = np.full(seq_len, tokenizer.pad_id, np.int32)
  targets_T = np.full(seq_len, tokenizer.pad_id, np.int32)
  segment_ids_T = np.zeros(seq_len, np.int32)
  weights_T = np.zeros(seq_len, np.float32)
  for i in range(seq_len // (length - 1)):
    tokens, answer = token_passkey_example(
      rng,
      length=length,
      key_digits=key_digits,
      min_key_digits=min_key_digits,
      filler_vocab=filler_vocab,
    )
    span = slice(i * (length - 1), (i + 1) * (length - 1))
    tokens_T[span], targets_T[span] = tokens[:-1], tokens[1:]
    segment_ids_T[span] = i + 1
    weights_T[span] = answer[1:]
  return {
    "tokens": tokens_T,
    "targets": targets_T,
    "segment_ids": segment_ids_T,
    "positions": make_positions_np(segment_ids_T, position_scheme),
    "loss_weights": weights_T,
  }


def _token_passkey_min_len(tokenizer, options: Mapping[str, Any]) -> int:
  del tokenizer
  return 2 * options["key_digits"] + 1


_ROW_FUNCTIONS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
  "passkey": passkey_row,
  "mqar": mqar_row,
  "token_passkey": token_passkey_row,
}
_MIN_LENGTHS: dict[str, Callable[[Any, Mapping[str, Any]], int]] = {
  "passkey": _passkey_min_len,
  "mqar": _mqar_min_len,
  "token_passkey": _token_passkey_min_len,
}
_MIN_WHAT = {
  "passkey": "the shortest passkey row (no filler)",
  "mqar": "the longest mqar row (max_pairs pairs, SEP, num_queries queries)",
  "token_passkey": "the shortest token_passkey row (the needle alone)",
}
_INDEXED_TASKS = ("token_passkey",)  # row functions that read the row index (a curriculum)


class SyntheticRows:
  """The checkpointable stream of one task's rows (`__next__`, `get_state`, `set_state`).

  Args:
    options: `check_synthetic_options`'s output (task and its options).
    tokenizer: has `encode`, `pad_id` (and `bos_id`, which prompts start with).
    seq_len, position_scheme: as in `data`.
    seed, split, process_index: row `i` draws from `default_rng([seed, crc32(split),
      process_index, i])`; rows of a split other than `train` weigh only the answer.
  """

  def __init__(
    self,
    options: Mapping[str, Any],
    tokenizer,
    *,
    seq_len: int,
    seed: int,
    split: str = "train",
    process_index: int = 0,
    position_scheme: str = "global",
  ):
    self._task = options["task"]
    self._kwargs = {k: v for k, v in options.items() if k != "task"}
    if split != "train" and "lm_weight" in self._kwargs:
      self._kwargs["lm_weight"] = 0.0
    if split != "train" and "curriculum_rows" in self._kwargs:
      self._kwargs["curriculum_rows"] = 0  # validation rows are full length
    shortest = _MIN_LENGTHS[self._task](tokenizer, options)
    if seq_len < shortest:
      raise ConfigError(
        f"data.seq_len={seq_len} is below the {shortest} tokens of {_MIN_WHAT[self._task]}; "
        "raise data.seq_len"
      )
    self._tokenizer = tokenizer
    self._seq_len = int(seq_len)
    self._position_scheme = position_scheme
    self._seed = [int(seed), zlib.crc32(split.encode()), int(process_index)]
    self._index = 0
    self._counters = dict.fromkeys(COUNTER_KEYS, 0)

  def row(self, index: int) -> dict[str, np.ndarray]:
    """Row `index` of this stream (random access; `__next__` is `row(i)` for i = 0, 1, ...)."""
    rng = np.random.default_rng([*self._seed, int(index)])
    indexed = {"index": int(index)} if self._task in _INDEXED_TASKS else {}
    return _ROW_FUNCTIONS[self._task](
      self._tokenizer,
      rng,
      seq_len=self._seq_len,
      position_scheme=self._position_scheme,
      **indexed,
      **self._kwargs,
    )

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.row(self._index)
    self._index += 1
    self._counters["documents"] += 1
    self._counters["rows"] += 1
    self._counters["tokens"] += int(np.count_nonzero(out["segment_ids"]))
    return out

  def get_state(self) -> dict[str, Any]:
    return {"task": self._task, "row": self._index, "counters": dict(self._counters)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if state.get("task") != self._task:
      raise ConfigError(
        f"the saved data state holds {state.get('task')!r} rows, not {self._task!r}; restore "
        "with the data.synthetic.task it was saved with"
      )
    self._index = int(state["row"])
    self._counters = {key: int(state["counters"][key]) for key in COUNTER_KEYS}
