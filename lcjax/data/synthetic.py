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

Rows of the `train` split weigh as above; rows of any other split (the validation loss of
`lcjax.train.loop`) weigh the answer alone, so `eval/loss` is the task's answer loss.

Determinism and resume: row `i` of a process is a pure function of (seed, split, process index,
i) (`np.random.default_rng`), so the iterator state is the row count (plus the counters of
`lcjax.data.packing.COUNTER_KEYS`) and a restored iterator gives the identical next rows.
Processes draw different rows. A new task (e.g. MQAR) is a row function in `_ROW_FUNCTIONS`
with its options in `SYNTHETIC_OPTIONS` and `_TASK_OPTIONS`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lcjax.config import ConfigError, check_kind_options
from lcjax.data.packing import COUNTER_KEYS, make_positions_np
from lcjax.eval.passkey import make_passkey_prompt, shortest_passkey_prompt

__all__ = [
  "SYNTHETIC_OPTIONS",
  "SYNTHETIC_TASKS",
  "SyntheticRows",
  "check_synthetic_options",
  "passkey_row",
]

SYNTHETIC_TASKS = ("passkey",)

# Every option of every task and its type (`default_data_config()` declares each one unset, so
# the command line can set it: `--config.data.synthetic.task=passkey`).
SYNTHETIC_OPTIONS = {"task": str, "key_digits": int, "lm_weight": float}
_TASK_OPTIONS = {"passkey": ("task", "key_digits", "lm_weight")}
_DEFAULTS = {"passkey": {"key_digits": 5, "lm_weight": 0.0}}


def _is_int(value: Any) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


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
  if task == "passkey":
    digits = out["key_digits"]
    if not _is_int(digits) or not 1 <= digits <= 18:
      raise ConfigError(f"data.synthetic.key_digits must be an int in [1, 18], got {digits!r}")
    weight = out["lm_weight"]
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
      raise ConfigError(f"data.synthetic.lm_weight must be a number >= 0, got {weight!r}")
    if not math.isfinite(weight):
      raise ConfigError(f"data.synthetic.lm_weight must be finite, got {weight!r}")
    out.update(key_digits=int(digits), lm_weight=float(weight))
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


_ROW_FUNCTIONS: dict[str, Callable[..., dict[str, np.ndarray]]] = {"passkey": passkey_row}
_MIN_LENGTHS: dict[str, Callable[[Any, Mapping[str, Any]], int]] = {"passkey": _passkey_min_len}


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
    shortest = _MIN_LENGTHS[self._task](tokenizer, options)
    if seq_len < shortest:
      raise ConfigError(
        f"data.seq_len={seq_len} is below the {shortest} tokens of the shortest "
        f"{self._task} row (no filler); raise data.seq_len"
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
    return _ROW_FUNCTIONS[self._task](
      self._tokenizer,
      rng,
      seq_len=self._seq_len,
      position_scheme=self._position_scheme,
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
