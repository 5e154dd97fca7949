"""SSM-state statistics of Mamba-2 models: the state-collapse side of the state-capacity study.

Chen et al. 2024, "Stuffed Mamba: State Collapse and State Capacity of RNN-Based
Long-Context Modeling" (arXiv:2410.07145): past the training length a Mamba-2 state
"collapses" — a few channels explode — (§4), and the longest context at which a
passkey is still retrieved grows exponentially with the state size (§6). The SSD layer
is Dao & Gu 2024 ("Transformers are SSMs"); the mitigations are `lcjax.ssm.mitigations`.

- `state_norm_statistics(model, tokens_BT, every=)`: per-layer statistics of the SSM
  state h_t over positions (the largest |h| entry, the mean per-head norm, and the
  largest |h| per (head, state) channel): collapse shows as a few exploding channels.
- `state_norm_evaluation(model, tokenizer, length=, every=, train_length=)`: those
  statistics over a passkey prompt of `length` tokens, as `eval/state_norms.json` and
  metric lines; `final_evaluations` runs it when `eval.state_norms.enabled`.
- `plot_state_norms`: largest |h| per layer vs. position.

The study itself (tiny Mamba-2 models trained on passkey rows over a grid of state sizes
N and training lengths T, evaluated at multiples of T, with the mitigations) is the sweep
config configs/mamba2_state_capacity.py, run by scripts/sweep.py.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.data.synthetic import check_synthetic_options, token_passkey_example
from lcjax.eval.passkey import make_passkey_prompt
from lcjax.ssm.mitigations import ssd_states, window_state_difference
from lcjax.ssm.ssd import log_decay

__all__ = [
  "plot_state_norms",
  "state_norm_evaluation",
  "state_norm_prompt",
  "state_norm_statistics",
]


def _layer_state_stats(mixer, x_BTD, every: int):
  """Statistics of the states of one Mamba2Mixer on its input, every `every` positions."""
  inputs = mixer.ssd_inputs(x_BTD)
  A_H, xs_BTHP = mixer.scan_inputs(inputs["x_BTHP"], inputs["A_H"])
  dt_BTH, B_BTGN, C_BTGN = inputs["dt_BTH"], inputs["B_BTGN"], inputs["C_BTGN"]
  _, h_BTHPN = ssd_states(xs_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, state_norm_max=mixer.state_norm_max)
  if mixer.state_window:  # M3: the state the outputs read is the windowed one
    a_BTH = log_decay(dt_BTH, A_H, None, h_BTHPN.dtype)
    h_BTHPN = window_state_difference(h_BTHPN, a_BTH, mixer.state_window)
  h_BKHPN = h_BTHPN[:, every - 1 :: every]
  abs_BKHPN = jnp.abs(h_BKHPN)
  norm_BKH = jnp.sqrt(jnp.sum(jnp.square(h_BKHPN), axis=(3, 4)))
  return dict(
    max_abs=jnp.max(abs_BKHPN, axis=(0, 2, 3, 4)),
    mean_norm=jnp.mean(norm_BKH, axis=(0, 2)),
    max_norm=jnp.max(norm_BKH, axis=(0, 2)),
    channel_max_abs=jnp.max(abs_BKHPN, axis=(0, 3)),  # [K, H, N]
  )


def state_norm_statistics(model, tokens_BT, *, every: int = 16) -> dict:
  """Per-layer SSM-state statistics of a Mamba2LM over positions (Chen et al. 2024, §4).

  Runs the model on `tokens_BT` layer by layer, recomputing each mixer's states step by
  step (`ssd_states`, memory T·H·P·N per row) with the model's mitigations applied: M1
  scales, M2 normalization, and for M3 the windowed state h_t − (∏α)·h_{t−r}.

  Args:
    model: a Mamba2LM (or a model whose `layers` are Mamba2Blocks).
    tokens_BT: int token ids [B, T] (one document per row).
    every: k; statistics at positions k−1, 2k−1, ... (0-based).

  Returns:
    dict(positions [K] (1-based token counts), max_abs [L, K] (largest |h| entry over
    the batch, heads and channels), mean_norm [L, K] and max_norm [L, K] (mean and
    largest per-head Frobenius norm),
    channel_max_abs [L, K, H, N] (largest |h| over the batch and head dim per channel)),
    numpy float arrays; exploding channels show as max_abs ≫ mean_norm growing with k.
  """
  if every < 1:
    raise ValueError(f"every={every} must be a positive integer")
  tokens_BT = jnp.asarray(tokens_BT)
  T = tokens_BT.shape[1]
  if T < every:
    raise ValueError(f"the sequence has {T} tokens, fewer than every={every}")

  @jax.jit
  def run(tokens_BT):
    x_BTD = model.embed_tokens(tokens_BT)
    stats = []
    for layer in model.layers:
      stats.append(
        _layer_state_stats(layer.mixer, layer.norm(x_BTD).astype(layer.mixer.dtype), every)
      )
      x_BTD, _ = layer(x_BTD)
    return {k: jnp.stack([s[k] for s in stats]) for k in stats[0]}

  out = {k: np.asarray(v, np.float64) for k, v in run(tokens_BT).items()}
  out["positions"] = np.arange(every, T + 1, every)
  return out


def _doubling_windows(positions, start: int) -> dict[int, list[int]]:
  """{p: indices of the sampled positions in (p/2, p]} for p = start, 2·start, ... <= the last.

  The first window is (0, start]; windows without a sampled position are left out.
  """
  positions = np.asarray(positions)
  out, p = {}, int(start)
  while p >= 1 and p <= positions[-1]:
    low = 0 if p == start else p // 2
    (inside,) = np.nonzero((positions > low) & (positions <= p))
    if inside.size:
      out[p] = inside.tolist()
    p *= 2
  return out


def state_norm_prompt(tokenizer, length: int, *, data_config=None, key: int = 12345):
  """The prompt the state norms are measured on: what the model was trained to read.

  A `token_passkey` example (needle at depth 0.5, seed `key`) when `data_config` trains on
  `data.synthetic.task="token_passkey"`, else the text passkey prompt of
  `make_passkey_prompt` (needle at depth 0.5, pass key `key`); int32 [length] at most.
  """
  synthetic = data_config.get("synthetic") if data_config is not None else None
  synthetic = synthetic.to_dict() if hasattr(synthetic, "to_dict") else dict(synthetic or {})
  options = check_synthetic_options(synthetic)
  if options is not None and options["task"] == "token_passkey":
    tokens, _ = token_passkey_example(
      np.random.default_rng(key),
      length=length,
      key_digits=options["key_digits"],
      min_key_digits=options["min_key_digits"],
      filler_vocab=options["filler_vocab"],
      depth=0.5,
    )
    return tokens
  prompt_P, _ = make_passkey_prompt(tokenizer, length_tokens=length, depth=0.5, key=key)
  return prompt_P


def state_norm_evaluation(
  model,
  tokenizer,
  *,
  length: int,
  every: int,
  train_length: int,
  key: int = 12345,
  data_config=None,
) -> tuple[dict, dict[str, float]]:
  """State statistics over a passkey prompt of `length` tokens, as JSON and metric lines.

  Chen et al. 2024, "Stuffed Mamba" §4: past the training length a few state channels
  explode. The prompt is `state_norm_prompt` (needle at depth 0.5): a `token_passkey`
  example for models trained on that task (`data_config`), else `make_passkey_prompt`,
  what the study's models read; `every` and the returned positions as in
  `state_norm_statistics`.

  Returns:
    (summary, lines): summary = dict(length, every, train_length, positions, max_abs,
    mean_norm, max_norm) with [L][K] lists; lines = `eval/state_norm_max` (the largest
    per-head norm ‖h‖ over layers, heads and positions: what M2's `state_norm_max`
    caps), `eval/state_abs_max` (the largest |h| entry), and `eval/state_norm_max@{p}`,
    the largest per-head norm at positions in (p/2, p] for p = train_length × 2^k
    (the first: positions <= train_length), so growth past the training length shows.
  """
  prompt_P = state_norm_prompt(tokenizer, length, data_config=data_config, key=key)
  stats = state_norm_statistics(model, prompt_P[None], every=every)
  positions = stats["positions"]
  summary = dict(
    length=int(length),
    every=int(every),
    train_length=int(train_length),
    positions=positions.tolist(),
    max_abs=stats["max_abs"].tolist(),
    mean_norm=stats["mean_norm"].tolist(),
    max_norm=stats["max_norm"].tolist(),
  )
  max_norm_K = stats["max_norm"].max(axis=0)
  lines = {
    "eval/state_norm_max": float(max_norm_K.max()),
    "eval/state_abs_max": float(stats["max_abs"].max()),
  }
  for p, inside in _doubling_windows(positions, train_length).items():
    lines[f"eval/state_norm_max@{p}"] = float(max_norm_K[inside].max())
  return summary, lines


def plot_state_norms(summary: dict, path: str) -> str:
  """Largest |h| entry and largest per-head norm per layer vs. position (log y)."""
  import matplotlib  # noqa: PLC0415 - plotting only

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6, 4))
  x = summary["positions"]
  for i, (abs_K, norm_K) in enumerate(zip(summary["max_abs"], summary["max_norm"], strict=True)):
    ax.plot(x, abs_K, label=f"layer {i} max |h|")
    ax.plot(x, norm_K, ls="--", label=f"layer {i} max head ‖h‖")
  ax.axvline(summary["train_length"], color="gray", ls=":", lw=1)
  ax.set(yscale="log", xlabel="position (tokens)", ylabel="state size",
         title="SSM state vs. position (dotted: training length)")  # fmt: skip
  ax.legend(fontsize=7)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
