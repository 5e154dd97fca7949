"""Recall evaluations of the synthetic tasks: MQAR accuracy vs. pairs, token-passkey vs. length.

Both score teacher-forced argmax predictions of one forward pass (no decoding), on fresh
examples of `lcjax.data.synthetic`'s generators, so any `model(tokens[B, T]) -> logits`
works (Mamba-2, attention, hybrids).

- `mqar_accuracy(model, pairs=, rows=, ...)`: multi-query associative recall (Arora et al.
  2023, "Zoology", arXiv:2312.04927, §3; HazyResearch/zoology
  `zoology/data/associative_recall.py`): the fraction of queried values predicted exactly,
  at each number of key-value pairs K (the argmax over the whole vocabulary; chance is
  1/num_values once the model predicts values at all).
- `recall_capacity(pairs, accuracy, threshold)`: the largest K whose accuracy, and that of
  every smaller evaluated K, is >= threshold (0: none), the "capacity" of the state-capacity
  study (notes/studies.md §4): Zoology's recall-vs-state-size frontier, Chen et al. 2024
  ("Stuffed Mamba", arXiv:2410.07145) §6's capacity vs. state size N.
- `token_passkey_accuracy(model, lengths=, depths=, trials=, ...)`: the `token_passkey`
  task at any length; a trial is correct when every answer digit is (Chen et al. 2024, §6:
  the longest context with accurate passkey retrieval; `max_length_at` of it).
- `synthetic_evaluations(config, workdir, model, model_cfg)`: what `eval.mqar` and
  `eval.token_passkey` ask at the end of training (`lcjax.train.evaluate.final_evaluations`):
  eval/mqar.json, eval/token_passkey.json, plots/token_passkey_depth_length.png,
  plots/loss_curve.png and the metric lines `eval/mqar@{K}`, `eval/mqar_capacity`,
  `eval/token_passkey@{L}`, `eval/token_passkey_max_length`; for Mamba-2 models also
  `eval/d_state` (N, a results.csv column), `eval/mqar_capacity_vs_d_state@{N}` and
  `eval/token_passkey_max_length_vs_d_state@{N}`, so a sweep's line plot draws capacity
  against N (one marker per point).
- `validate_synthetic_evals(ev, data_config)`: their settings, checked before training.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.config import require
from lcjax.data.mqar import mqar_batch
from lcjax.data.synthetic import check_synthetic_options, token_passkey_example
from lcjax.eval.io import write_json
from lcjax.eval.passkey import max_length_at
from lcjax.eval.plots import plot_passkey_heatmap

__all__ = [
  "MQAR_THRESHOLD",
  "mqar_accuracy",
  "plot_loss_curve",
  "recall_capacity",
  "synthetic_evaluations",
  "token_passkey_accuracy",
  "validate_synthetic_evals",
]

MQAR_THRESHOLD = 0.8  # notes/studies.md §4: capacity = largest K with >= 80% value accuracy


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _hits(graphdef, state, tokens_BT, targets_BT):
  """(argmax == target) [B, T] of the model `graphdef` + `state` on `tokens_BT`."""
  logits_BTV = nnx.merge(graphdef, state)(tokens_BT)
  return jnp.argmax(logits_BTV, axis=-1) == targets_BT


def _scorer(model, batch_size: int | None):
  """tokens, targets [B, T] -> hits [B, T] (numpy), in chunks of `batch_size` rows."""
  graphdef, state = nnx.split(model)

  def score(tokens_BT: np.ndarray, targets_BT: np.ndarray) -> np.ndarray:
    rows = batch_size or tokens_BT.shape[0]
    out = []
    for b in range(0, tokens_BT.shape[0], rows):
      chunk = slice(b, b + rows)
      tokens, targets = tokens_BT[chunk], targets_BT[chunk]
      pad = rows - tokens.shape[0]  # a full last chunk: one compile per length
      if pad:
        tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)])
        targets = np.concatenate([targets, np.repeat(targets[-1:], pad, 0)])
      hits = _hits(graphdef, state, jnp.asarray(tokens), jnp.asarray(targets))
      out.append(np.asarray(hits)[: rows - pad])
    return np.concatenate(out)

  return score


def mqar_accuracy(
  model,
  *,
  pairs: Sequence[int],
  rows: int,
  num_queries: int,
  num_keys: int,
  num_values: int,
  seed: int = 0,
  batch_size: int | None = None,
) -> dict[str, Any]:
  """MQAR value accuracy at each number of pairs K (module docstring).

  Args:
    model: `model(tokens[B, T]) -> logits[B, T, V]`, trained on `data.synthetic.task=mqar`
      with the same `num_keys`, `num_values` (token ids) and `num_queries`.
    pairs: the K to evaluate (each <= min(num_keys, num_values)).
    rows: examples per K (each with `num_queries` scored values).
    seed: examples of K come from `default_rng([seed, K])`.
    batch_size: rows per forward pass (default: all rows of one K).

  Returns:
    dict(pairs, accuracy (fraction of values right per K), rows, num_queries, chance).
  """
  require(rows >= 1, f"rows={rows} must be a positive integer")
  score = _scorer(model, batch_size)
  accuracy = []
  for K in pairs:
    batch = mqar_batch(
      np.random.default_rng([int(seed), int(K)]),
      rows=rows,
      num_pairs=int(K),
      num_queries=num_queries,
      num_keys=num_keys,
      num_values=num_values,
    )
    hits_BT = score(batch["tokens"], batch["targets"])
    weights_BT = batch["weights"]
    accuracy.append(float((hits_BT * weights_BT).sum() / weights_BT.sum()))
  return dict(
    pairs=[int(K) for K in pairs],
    accuracy=accuracy,
    rows=int(rows),
    num_queries=int(num_queries),
    chance=1.0 / num_values,
  )


def recall_capacity(
  pairs: Sequence[int], accuracy: Sequence[float], threshold: float = MQAR_THRESHOLD
) -> int:
  """The largest K with accuracy >= threshold at every evaluated K' <= K (0: none)."""
  return max_length_at(pairs, accuracy, threshold)


def token_passkey_accuracy(
  model,
  *,
  lengths: Sequence[int],
  depths: Sequence[float],
  trials: int,
  seed: int = 0,
  key_digits: int = 3,
  min_key_digits: int = 2,
  filler_vocab: int = 64,
  batch_size: int | None = None,
) -> dict[str, Any]:
  """`token_passkey` retrieval on a length × depth grid, teacher-forced argmax.

  Each trial is one `token_passkey_example` of `length` tokens (the model reads its first
  length - 1) with the needle at `depth`; it is correct when all its answer digits are.

  Returns:
    dict(accuracy=[len(lengths)][len(depths)], lengths, depths, trials, seed) as
    `lcjax.eval.passkey.passkey_accuracy` (so `plot_passkey_heatmap` draws it).
  """
  require(trials >= 1, f"trials={trials} must be a positive integer")
  score = _scorer(model, batch_size)
  lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
  accuracy = np.zeros((len(lengths), len(depths)))
  for i, length in enumerate(lengths):
    rng = np.random.default_rng([int(seed), length])
    examples = [
      token_passkey_example(
        rng,
        length=length,
        key_digits=key_digits,
        min_key_digits=min_key_digits,
        filler_vocab=filler_vocab,
        depth=depth,
      )
      for depth in depths
      for _ in range(trials)
    ]
    tokens_Bn = np.stack([t for t, _ in examples])
    answer_BT = np.stack([a for _, a in examples])[:, 1:]
    hits_BT = score(tokens_Bn[:, :-1], tokens_Bn[:, 1:])
    correct_B = np.all(hits_BT | ~answer_BT, axis=1)
    accuracy[i] = correct_B.reshape(len(depths), trials).mean(axis=1)
  return dict(
    accuracy=accuracy.tolist(), lengths=lengths, depths=depths, trials=int(trials), seed=seed
  )


def _task_options(data_config, task: str, field: str) -> dict[str, Any]:
  synthetic = data_config.get("synthetic")
  synthetic = synthetic.to_dict() if hasattr(synthetic, "to_dict") else dict(synthetic or {})
  options = check_synthetic_options(synthetic) or {}
  require(
    options.get("task") == task,
    f"{field} scores a model trained on data.synthetic.task={task!r} (its token ids), but "
    f"the task is {options.get('task')!r}; set data.synthetic.task={task!r} or {field}."
    "enabled=False",
  )
  return options


def validate_synthetic_evals(ev, data_config) -> None:
  """eval.mqar and eval.token_passkey settings (ConfigError: one sentence, field and fix)."""
  mq = ev.get("mqar")
  if mq is not None and mq.enabled:
    options = _task_options(data_config, "mqar", "eval.mqar")
    most = min(options["num_keys"], options["num_values"])
    pairs = tuple(mq.pairs)
    require(
      len(pairs) > 0 and all(isinstance(K, int) and 1 <= K <= most for K in pairs),
      f"eval.mqar.pairs={pairs} must be ints in [1, min(num_keys, num_values)={most}]",
    )
    require(mq.rows >= 1, f"eval.mqar.rows={mq.rows} must be a positive integer")
    require(
      0.0 <= mq.threshold <= 1.0,
      f"eval.mqar.threshold={mq.threshold} must be an accuracy in [0, 1], e.g. 0.8",
    )
  tp = ev.get("token_passkey")
  if tp is not None and tp.enabled:
    options = _task_options(data_config, "token_passkey", "eval.token_passkey")
    shortest = 2 * options["key_digits"] + 2
    lengths = tuple(tp.lengths)
    require(
      len(lengths) > 0 and all(isinstance(n, int) and n >= shortest for n in lengths),
      f"eval.token_passkey.lengths={lengths} must be ints >= {shortest} (the needle with "
      f"key_digits={options['key_digits']})",
    )
    require(
      len(tp.depths) > 0 and all(0.0 <= d <= 1.0 for d in tp.depths),
      f"eval.token_passkey.depths={tuple(tp.depths)} must be needle depths in [0, 1]",
    )
    require(tp.trials >= 1, f"eval.token_passkey.trials={tp.trials} must be a positive integer")
    require(
      0.0 <= tp.threshold <= 1.0,
      f"eval.token_passkey.threshold={tp.threshold} must be an accuracy in [0, 1], e.g. 0.9",
    )


def _read_jsonl(path: str) -> list[dict]:
  """The complete lines of a metrics.jsonl (as `lcjax.train.metrics.read_metrics`)."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # a torn last line of a killed run
        continue
  return rows


def plot_loss_curve(metrics_path: str, path: str) -> str | None:
  """Training loss and validation answer loss (`eval/loss`) vs. step from a metrics.jsonl."""
  train, val = [], []
  for row in _read_jsonl(metrics_path):
    if "loss" in row:
      train.append((row["step"], row["loss"]))
    if "eval/loss" in row:
      val.append((row["step"], row["eval/loss"]))
  if not train and not val:
    return None
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - plotting only
  from matplotlib.figure import Figure  # noqa: PLC0415

  fig = Figure(figsize=(6, 4))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for points, label in ((train, "training loss (task targets)"), (val, "validation answer loss")):
    if points:
      ax.plot(*zip(*points, strict=True), marker=".", label=label)
  ax.set(xlabel="step", ylabel="loss", yscale="log", title="loss curve")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  return path


def synthetic_evaluations(
  config, workdir: str, model, model_cfg: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, float]]:
  """Runs `eval.mqar` / `eval.token_passkey` on `model`; returns (results, metric lines).

  Writes eval/mqar.json, eval/token_passkey.json, plots/token_passkey_depth_length.png and,
  when the run folder has a metrics.jsonl, plots/loss_curve.png.
  """
  ev = config.eval
  out: dict[str, Any] = {}
  lines: dict[str, float] = {}
  d_state = model_cfg.get("d_state") if model_cfg.get("family") == "mamba2" else None
  if d_state is not None:
    lines["eval/d_state"] = float(d_state)
  mq = ev.get("mqar")
  if mq is not None and mq.enabled:
    options = _task_options(config.data, "mqar", "eval.mqar")
    result = mqar_accuracy(
      model,
      pairs=list(mq.pairs),
      rows=mq.rows,
      num_queries=options["num_queries"],
      num_keys=options["num_keys"],
      num_values=options["num_values"],
      seed=config.train.seed,
    )
    result["threshold"] = float(mq.threshold)
    result["capacity"] = recall_capacity(result["pairs"], result["accuracy"], mq.threshold)
    write_json(os.path.join(workdir, "eval", "mqar.json"), result)
    for K, acc in zip(result["pairs"], result["accuracy"], strict=True):
      lines[f"eval/mqar@{K}"] = acc
    lines["eval/mqar_capacity"] = float(result["capacity"])
    if d_state is not None:
      lines[f"eval/mqar_capacity_vs_d_state@{d_state}"] = float(result["capacity"])
    pairs_acc = zip(result["pairs"], result["accuracy"], strict=True)
    table = "  ".join(f"K={K}: {a:.3f}" for K, a in pairs_acc)
    print(f"MQAR value accuracy: {table}; capacity (>= {mq.threshold:g}): {result['capacity']}")
    out["mqar"] = result
  tp = ev.get("token_passkey")
  if tp is not None and tp.enabled:
    options = _task_options(config.data, "token_passkey", "eval.token_passkey")
    result = token_passkey_accuracy(
      model,
      lengths=list(tp.lengths),
      depths=list(tp.depths),
      trials=tp.trials,
      seed=config.train.seed,
      key_digits=options["key_digits"],
      min_key_digits=options["min_key_digits"],
      filler_vocab=options["filler_vocab"],
    )
    mean = [sum(row) / len(row) for row in result["accuracy"]]
    result["max_length"] = max_length_at(result["lengths"], mean, tp.threshold)
    write_json(os.path.join(workdir, "eval", "token_passkey.json"), result)
    plot_passkey_heatmap(
      result["accuracy"],
      result["lengths"],
      result["depths"],
      os.path.join(workdir, "plots", "token_passkey_depth_length.png"),
    )
    for length, acc in zip(result["lengths"], mean, strict=True):
      lines[f"eval/token_passkey@{length}"] = acc
    lines["eval/token_passkey_max_length"] = float(result["max_length"])
    if d_state is not None:
      lines[f"eval/token_passkey_max_length_vs_d_state@{d_state}"] = float(result["max_length"])
    out["token_passkey"] = result
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if out and os.path.exists(metrics_path):
    plot_loss_curve(metrics_path, os.path.join(workdir, "plots", "loss_curve.png"))
  return out, lines
