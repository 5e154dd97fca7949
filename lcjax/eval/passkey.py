"""Passkey retrieval (Mohtashami & Jaggi 2023, Landmark Attention, `llama/run_test.py`).

The prompt is the Landmark format, parts joined by newlines:

  There is an important info hidden inside a lot of irrelevant text. Find it and
  memorize them. I will quiz you about the important information there.
  <filler prefix>
  The pass key is {KEY}. Remember it. {KEY} is the pass key.
  <filler suffix>
  What is the pass key? The pass key is

As in Landmark, the filler ("The grass is green. The sky is blue. ...") is the
repeated garbage string cut to a number of characters, and the suffix restarts at
the beginning of the garbage string. Unlike Landmark, whose needle sits at a
random split, the prefix holds round(depth * n) of the n filler characters, so
accuracy can be reported on a depth × length grid (as in NIAH figures). The
filler size n is the largest that keeps the prompt (BOS included when the
tokenizer has `bos_id`) within `length_tokens`. Keys have a fixed number of
digits (the 5-digit variant of Stuffed Mamba) so prompts of one length have
equal token counts with a byte tokenizer and batch into one `generate` call.

The model continues the prompt greedily with its KV cache; as in Landmark, the
answer is the first integer in the decoded continuation, and a trial is correct
when it equals the key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from lcjax.models.generate import generate

__all__ = [
  "encode_prompt",
  "make_passkey_prompt",
  "passkey_prompt_text",
  "shortest_passkey_prompt",
  "passkey_accuracy",
  "first_integer",
  "max_length_at",
  "PASSKEY_THRESHOLD",
  "TASK",
  "GARBAGE",
  "NEEDLE",
  "QUESTION",
]

TASK = (
  "There is an important info hidden inside a lot of irrelevant text. "
  "Find it and memorize them. I will quiz you about the important information there."
)
GARBAGE = (
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
PASSKEY_THRESHOLD = 0.9  # accuracy that counts as retrieved (max_length_at, eval.passkey)


def _filler(num_chars: int) -> str:
  """The first num_chars characters of the garbage sentences repeated (Landmark)."""
  repeats = num_chars // (len(GARBAGE) + 1) + 1
  return " ".join([GARBAGE] * repeats)[:num_chars]


def passkey_prompt_text(num_filler: int, depth: float, key: int) -> str:
  """The prompt text: task, `num_filler` filler characters with the needle at `depth`, question."""
  prefix_chars = round(depth * num_filler)
  parts = [
    TASK,
    _filler(prefix_chars),
    NEEDLE.format(key=key),
    _filler(num_filler - prefix_chars),
    QUESTION,
  ]
  return "\n".join(parts)


def encode_prompt(tokenizer, text: str) -> np.ndarray:
  """int32 token ids of `text`, after the tokenizer's bos when it has one."""
  ids = np.asarray(tokenizer.encode(text), np.int32)
  bos_id = getattr(tokenizer, "bos_id", None)
  if bos_id is not None:
    ids = np.concatenate([np.array([bos_id], np.int32), ids])
  return ids


def shortest_passkey_prompt(tokenizer, *, key_digits: int = 5) -> int:
  """Tokens of a passkey prompt without filler: no shorter prompt can be asked for."""
  return encode_prompt(tokenizer, passkey_prompt_text(0, 0.5, 10 ** (key_digits - 1))).size


def make_passkey_prompt(
  tokenizer, *, length_tokens: int, depth: float, key: int
) -> tuple[np.ndarray, str]:
  """A Landmark passkey prompt of at most `length_tokens` tokens.

  Args:
    tokenizer: has `encode(str) -> int array` (and optionally `bos_id`, prepended).
    length_tokens: target prompt length; the filler is the largest that fits, so
      the prompt is within one filler sentence of the target (exact for a
      byte-level tokenizer).
    depth: fraction of the filler placed before the needle, in [0, 1].
    key: the pass key (a non-negative integer).

  Returns:
    (prompt_ids int32 [P], answer): P <= length_tokens and answer = str(key).
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth={depth} must be in [0, 1] (the needle's position in the filler)")
  if key < 0:
    raise ValueError(f"key={key} must be a non-negative integer")
  shortest = encode_prompt(tokenizer, passkey_prompt_text(0, depth, key)).size
  if shortest > length_tokens:
    raise ValueError(
      f"length_tokens={length_tokens} is below the {shortest} tokens of a passkey prompt "
      "without filler; ask for a longer prompt"
    )
  fits = lambda num_filler: (
    encode_prompt(tokenizer, passkey_prompt_text(num_filler, depth, key)).size <= length_tokens
  )
  # Largest filler size whose prompt fits (token counts grow with the filler):
  # double an upper bound until it overflows, then bisect.
  lo, hi = 0, max(1, length_tokens)
  while fits(hi):
    if hi > 1000 * length_tokens:
      raise ValueError("the tokenizer gives no tokens for the filler text; check its encode()")
    lo, hi = hi, 2 * hi
  hi -= 1
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid - 1
  return encode_prompt(tokenizer, passkey_prompt_text(lo, depth, key)), str(key)


_INTEGER = re.compile(r"\d+")


def first_integer(text: str) -> int | None:
  """The first run of digits in `text` as an int (Landmark's scoring), or None."""
  match = _INTEGER.search(text)
  return None if match is None else int(match.group())


def max_length_at(
  lengths: Sequence[int], accuracy: Sequence[float], threshold: float = PASSKEY_THRESHOLD
) -> int:
  """The longest length L with accuracy >= threshold at every evaluated length <= L (0: none).

  The state capacity of Chen et al. 2024 ("Stuffed Mamba", arXiv:2410.07145, §6): the
  longest context at which the passkey is still retrieved.
  """
  best = 0
  for length, acc in sorted(zip(lengths, accuracy, strict=True)):
    if acc < threshold:
      break
    best = length
  return int(best)


def passkey_accuracy(
  model,
  tokenizer,
  *,
  lengths: Sequence[int],
  depths: Sequence[float],
  trials: int,
  seed: int,
  key_digits: int = 5,
  batch_size: int | None = None,
) -> dict:
  """Passkey retrieval accuracy on a length × depth grid, greedy decoding.

  Args:
    model: a model `generate` accepts (`init_cache` and `decode`, e.g. DecoderLM).
    tokenizer: `encode(str)`, `decode(ids) -> str`, optional `bos_id`.
    lengths: prompt lengths in tokens.
    depths: needle depths in [0, 1] (0: right after the task line).
    trials: prompts per (length, depth) cell, each with its own random key.
    seed: seeds the keys (numpy default_rng), so a grid is reproducible.
    key_digits: keys are uniform over the integers with exactly this many digits.
    batch_size: rows per `generate` call; default all prompts of one length.
      The last batch of a length is padded by repeating a row (one compile).

  Returns:
    dict(accuracy=[len(lengths)][len(depths)] fractions correct, lengths, depths,
    trials, seed, key_digits, records=[one dict per trial: length, depth, trial,
    key, prompt_tokens, output, prediction, correct]).
  """
  if not (hasattr(model, "init_cache") and hasattr(model, "decode")):
    raise TypeError(
      f"{type(model).__name__} has no init_cache/decode; passkey decoding needs a KV-cache model"
    )
  if trials < 1 or key_digits < 1:
    raise ValueError(f"trials={trials} and key_digits={key_digits} must be at least 1")
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be a positive integer")
  lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
  rng = np.random.default_rng(seed)
  low, high = 10 ** (key_digits - 1), 10**key_digits
  # The answer plus a leading space and a couple of tokens of slack.
  max_new_tokens = key_digits + 3
  correct = np.zeros((len(lengths), len(depths)))
  records = []
  for i, length in enumerate(lengths):
    cells = []
    for j, depth in enumerate(depths):
      for trial in range(trials):
        key = int(rng.integers(low, high))
        prompt_P, answer = make_passkey_prompt(
          tokenizer, length_tokens=length, depth=depth, key=key
        )
        cells.append((j, depth, trial, key, answer, prompt_P))
    # Prompts of one length batch together when their token counts agree.
    by_size: dict[int, list] = {}
    for cell in cells:
      by_size.setdefault(cell[-1].size, []).append(cell)
    for size, group in by_size.items():
      rows = batch_size or len(group)
      for b in range(0, len(group), rows):
        chunk = group[b : b + rows]
        prompts_BP = np.stack([c[-1] for c in chunk] + [chunk[-1][-1]] * (rows - len(chunk)))
        out_BN = np.asarray(generate(model, prompts_BP, max_new_tokens=max_new_tokens))
        for (j, depth, trial, key, answer, _), new_N in zip(chunk, out_BN[:, size:], strict=False):
          output = tokenizer.decode(new_N)
          prediction = first_integer(output)
          ok = prediction is not None and str(prediction) == answer
          correct[i, j] += ok
          records.append(
            dict(
              length=length,
              depth=depth,
              trial=trial,
              key=key,
              prompt_tokens=size,
              output=output,
              prediction=prediction,
              correct=bool(ok),
            )
          )
  return dict(
    accuracy=(correct / trials).tolist(),
    lengths=lengths,
    depths=depths,
    trials=trials,
    seed=seed,
    key_digits=key_digits,
    records=records,
  )
