"""State statistics and the state-capacity / state-collapse study for Mamba-2.

Chen et al. 2024, "Stuffed Mamba: State Collapse and State Capacity of RNN-Based
Long-Context Modeling" (arXiv:2410.07145): past the training length a Mamba-2 state
"collapses" — a few channels explode — (§4), and the longest context at which a
passkey is still retrieved grows exponentially with the state size (§6). The SSD layer
is Dao & Gu 2024 ("Transformers are SSMs"); the mitigations are `lcjax.ssm.mitigations`.

- `state_norm_statistics(model, tokens_BT, every=)`: per-layer statistics of the SSM
  state h_t over positions (the largest |h| entry, the mean per-head norm, and the
  largest |h| per (head, state) channel): collapse shows as a few exploding channels.
- `run_state_capacity_study(config, workdir)`: trains a grid of tiny Mamba-2 models
  on passkey retrieval, evaluates accuracy from 0.5× to 16× the training length, and
  writes eval/state_capacity.json, a printed table and plots (configs/mamba2_state_capacity.py).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.data.tokenizers import build_tokenizer
from lcjax.eval.io import write_json
from lcjax.eval.passkey import make_passkey_prompt, passkey_accuracy, shortest_passkey_prompt
from lcjax.models import mamba2_config
from lcjax.ssm.mitigations import ssd_states, window_state_difference
from lcjax.ssm.ssd import log_decay
from lcjax.train.config import base_config
from lcjax.train.run_model import abstract_setup, build_run_model, model_from_params, run_train_step
from lcjax.train.step import init_state, make_eval_step

__all__ = [
  "state_norm_statistics",
  "passkey_training_batch",
  "train_passkey_model",
  "with_mitigations",
  "max_length_at",
  "run_state_capacity_study",
  "format_table",
  "plot_state_capacity",
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


# ---------------------------------------------------------------------------------------------
# The state-capacity study (Chen et al. 2024, §6: passkey capacity vs state size).


def passkey_training_batch(
  tokenizer, rng, *, batch: int, length: int, key_digits: int = 5, lm_weight: float = 0.0
):
  """Passkey rows of `length` tokens: prompt (`make_passkey_prompt`) + " " + key.

  The needle depth is uniform in [0, 1] and the key uniform over `key_digits`-digit
  integers. Returns (tokens_BT int32, targets_BT int32, weights_BT float32) with weight 1
  on the targets that are answer digits and `lm_weight` on every other real token
  (0: loss on the answer only; a small value adds a language-modelling signal).
  """
  low, high = 10 ** (key_digits - 1), 10**key_digits
  answer_len = key_digits + 1  # " " + digits
  rows = []
  for _ in range(batch):
    key = int(rng.integers(low, high))
    prompt_P, answer = make_passkey_prompt(
      tokenizer, length_tokens=length - answer_len, depth=float(rng.uniform()), key=key
    )
    answer_A = np.asarray(tokenizer.encode(" " + answer), np.int32)
    rows.append(np.concatenate([np.asarray(prompt_P, np.int32), answer_A]))
  T = max(r.size for r in rows)
  tokens_BT = np.zeros((batch, T + 1), np.int32)
  weights_BT = np.zeros((batch, T), np.float32)
  for b, row in enumerate(rows):
    tokens_BT[b, : row.size] = row
    weights_BT[b, : row.size - 1] = lm_weight
    weights_BT[b, row.size - key_digits - 1 : row.size - 1] = 1.0  # predicts the digits
  return tokens_BT[:, :-1], tokens_BT[:, 1:], weights_BT


def with_mitigations(model, model_cfg, **knobs):
  """The trained `model`'s weights under `model_cfg` with mitigation knobs overridden.

  Knobs are mamba2_config fields: decay_scale / input_scale (M1, Chen et al. 2024
  §5.1), state_norm_max (M2, §5.2), state_window (M3, §5.3). Weights are shared.
  """
  cfg = model_cfg.copy_and_resolve_references()
  cfg.update(knobs)
  return model_from_params(nnx.state(model, nnx.Param), cfg)


def _passkey_run_config(model_cfg, *, length: int, steps: int, batch_size: int, lr: float,
                        warmup: int, seed: int):  # fmt: skip
  """The run config of one grid point: lcjax's trainer settings, the study's numbers.

  AdamW (b2 0.999, weight decay 0.01 on matrices) with linear warm-up and cosine decay
  to 0, gradient clipping at 1: `lcjax.train`'s optimizer and step, not a copy.
  """
  config = base_config()
  config.model = model_cfg
  config.data.seq_len = length
  config.train.update(
    steps=max(steps, warmup + 1),
    batch_size=batch_size,
    lr=lr,
    warmup_steps=max(1, warmup),
    schedule="cosine",
    min_lr_ratio=0.0,
    b2=0.999,
    weight_decay=0.01,
    grad_clip_norm=1.0,
    loss_chunk=length,
    seed=seed,
  )
  return config


def train_passkey_model(model_cfg, tokenizer, *, length: int, steps: int, batch_size: int,
                        lr: float, warmup: int, seed: int, log_every: int = 0,
                        lm_weight: float = 0.0):  # fmt: skip
  """Trains a model on passkey rows of `length` tokens through `lcjax.train`'s step.

  Loss weight 1 on the answer digits and `lm_weight` on every other token. Returns
  (model, dict(losses=[(step, answer loss)], seconds)), the answer loss being the mean
  NLL of the answer digits alone (`lcjax.train.step.make_eval_step` on answer weights).
  """
  config = _passkey_run_config(
    model_cfg, length=length, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
    seed=seed,
  )  # fmt: skip
  model, _ = build_run_model(config)
  setup = abstract_setup(config, model_cfg)
  train_step = run_train_step(config, setup)
  answer_loss = make_eval_step(setup.graphdef, loss_chunk=length)
  state = init_state(model, setup.tx, seed)

  def as_batch(tokens_BT, targets_BT, weights_BT):
    B, T = tokens_BT.shape
    return dict(
      tokens=tokens_BT,
      targets=targets_BT,
      loss_weights=weights_BT,
      segment_ids=np.ones((B, T), np.int32),
      positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
    )

  rng = np.random.default_rng(seed)
  losses, start = [], time.perf_counter()
  for i in range(1, steps + 1):
    batch = as_batch(
      *passkey_training_batch(tokenizer, rng, batch=batch_size, length=length, lm_weight=lm_weight)
    )
    state, _ = train_step(state, batch)
    if i == steps or (log_every and i % log_every == 0):
      answer = dict(batch, loss_weights=(batch["loss_weights"] == 1.0).astype(np.float32))
      nll, weight = answer_loss(state["params"], answer)
      losses.append((i, float(nll) / max(float(weight), 1.0)))
      if log_every:
        print(f"    step {i:5d} loss {losses[-1][1]:.4f}", flush=True)
  trained = model_from_params(state["params"], model_cfg)
  return trained, dict(losses=losses, seconds=time.perf_counter() - start)


def max_length_at(lengths, accuracy, threshold: float = 0.9) -> int:
  """The longest evaluated length L with accuracy ≥ threshold at every length ≤ L (0: none)."""
  best = 0
  for length, acc in sorted(zip(lengths, accuracy, strict=True)):
    if acc < threshold:
      break
    best = length
  return int(best)


def _stats_summary(stats: dict) -> dict:
  return dict(
    positions=stats["positions"].tolist(),
    max_abs=stats["max_abs"].tolist(),
    mean_norm=stats["mean_norm"].tolist(),
    max_norm=stats["max_norm"].tolist(),
  )


def run_state_capacity_study(config, workdir: str) -> dict:
  """Trains the (d_state × train length) grid, evaluates passkey and state norms, writes outputs.

  Chen et al. 2024, "Stuffed Mamba", §6 (state capacity: the longest passkey context
  grows exponentially with the state size) and §4 (state collapse past the training
  length), with the mitigations of §5 (`lcjax.ssm.mitigations`) applied training-free
  to the largest-state model of each training length. `config` is
  configs/mamba2_state_capacity.py's `get_config()`. Writes WORKDIR/eval/state_capacity.json
  and WORKDIR/plots/state_capacity_{accuracy,max_length,state_norms}.png; prints the
  table; returns the JSON dict.
  """
  study = config.study
  tokenizer = build_tokenizer(dict(kind="byte"))
  results, mitigations = [], []
  shortest = shortest_passkey_prompt(tokenizer)
  for train_length in study.train_lengths:
    lengths = [int(round(m * train_length)) for m in study.eval_multipliers]
    dropped = [n for n in lengths if n < shortest]
    if dropped:
      print(f"eval lengths {dropped} are below the shortest passkey prompt ({shortest}); dropped")
    lengths = [n for n in lengths if n >= shortest]
    for d_state in study.d_states:
      model_cfg = mamba2_config(**{**config.model.to_dict(), "d_state": int(d_state)})
      print(f"d_state={d_state} train_length={train_length}: training", flush=True)
      model, log = train_passkey_model(
        model_cfg, tokenizer, length=train_length, steps=study.steps,
        batch_size=study.batch_size, lr=study.lr, warmup=study.warmup_steps, seed=study.seed,
        log_every=study.log_every, lm_weight=study.lm_weight,
      )  # fmt: skip
      acc = passkey_accuracy(
        model, tokenizer, lengths=lengths, depths=study.depths, trials=study.trials,
        seed=study.seed + 1,
      )  # fmt: skip
      per_length = [float(np.mean(row)) for row in acc["accuracy"]]
      prompt_P, _ = make_passkey_prompt(tokenizer, length_tokens=max(lengths), depth=0.5, key=12345)
      every = max(1, train_length // study.stats_per_train_length)
      stats = state_norm_statistics(model, prompt_P[None], every=every)
      row = dict(
        d_state=int(d_state),
        train_length=int(train_length),
        lengths=lengths,
        accuracy=per_length,
        accuracy_by_depth=acc["accuracy"],
        max_length_90=max_length_at(lengths, per_length, 0.9),
        final_loss=log["losses"][-1][1],
        train_seconds=log["seconds"],
        state_norms=_stats_summary(stats),
      )
      results.append(row)
      print(
        f"  loss {row['final_loss']:.3f} ({log['seconds']:.0f}s)  accuracy "
        + " ".join(f"{n}:{a:.2f}" for n, a in zip(lengths, per_length, strict=True))
        + f"  max length >=90%: {row['max_length_90']}",
        flush=True,
      )
      if d_state == max(study.d_states):
        mitigations.append(
          _mitigation_run(model, model_cfg, tokenizer, prompt_P, row, study, every)
        )
  out = dict(
    study=config.study.to_dict(),
    model={k: v for k, v in config.model.to_dict().items() if k != "d_state"},
    results=results,
    mitigations=mitigations,
  )
  write_json(os.path.join(workdir, "eval", "state_capacity.json"), out)
  print(format_table(results), flush=True)
  if study.plots:
    plot_state_capacity(out, os.path.join(workdir, "plots"))
  return out


def _mitigation_run(model, model_cfg, tokenizer, prompt_P, row, study, every) -> dict:
  """State norms (and passkey accuracy for M1/M2) of one trained model under each mitigation."""
  T = row["train_length"]
  within = np.asarray(row["state_norms"]["positions"]) <= T
  # M2's cap: the largest per-head state norm seen within the training length.
  cap = float(np.max(np.asarray(row["state_norms"]["max_norm"])[:, within]))
  variants = dict(
    none={},
    m1_forget_more=dict(decay_scale=float(study.m1_decay_scale)),
    m1_remember_less=dict(input_scale=float(study.m1_input_scale)),
    m2_state_norm=dict(state_norm_max=cap),
    m3_window=dict(state_window=int(T)),
  )
  out = dict(d_state=row["d_state"], train_length=T, knobs=variants, state_norms={}, accuracy={})
  for name, knobs in variants.items():
    mitigated = with_mitigations(model, model_cfg, **knobs)
    out["state_norms"][name] = _stats_summary(
      state_norm_statistics(mitigated, prompt_P[None], every=every)
    )
    if study.mitigation_accuracy and name != "m3_window" and name != "none":
      acc = passkey_accuracy(
        mitigated, tokenizer, lengths=row["lengths"], depths=study.depths,
        trials=study.trials, seed=study.seed + 1,
      )  # fmt: skip
      out["accuracy"][name] = [float(np.mean(r)) for r in acc["accuracy"]]
  out["accuracy"]["none"] = row["accuracy"]
  return out


def format_table(results) -> str:
  """The study table: one row per (train length, d_state), accuracy per evaluated length."""
  lines = []
  for T in sorted({r["train_length"] for r in results}):
    rows = [r for r in results if r["train_length"] == T]
    head = "  ".join(f"{n:>6d}" for n in rows[0]["lengths"])
    lines.append(f"train length {T}: passkey accuracy by eval length (tokens)")
    lines.append(f"{'d_state':>7}  {head}  {'max@90%':>7}  {'loss':>6}  {'|h|max@end':>10}")
    for r in sorted(rows, key=lambda r: r["d_state"]):
      accs = "  ".join(f"{a:6.2f}" for a in r["accuracy"])
      hmax = max(layer[-1] for layer in r["state_norms"]["max_abs"])
      lines.append(
        f"{r['d_state']:>7}  {accs}  {r['max_length_90']:>7}  {r['final_loss']:6.3f}  {hmax:10.3g}"
      )
  return "\n".join(lines)


def plot_state_capacity(out: dict, plots_dir: str) -> list[str]:
  """Accuracy vs length per d_state; max length at ≥90% vs d_state (log); state norms."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(plots_dir, exist_ok=True)
  results, paths = out["results"], []
  train_lengths = sorted({r["train_length"] for r in results})

  fig, axes = plt.subplots(
    1, len(train_lengths), figsize=(5 * len(train_lengths), 4), squeeze=False
  )
  for ax, T in zip(axes[0], train_lengths, strict=True):
    for r in sorted((r for r in results if r["train_length"] == T), key=lambda r: r["d_state"]):
      ax.plot(r["lengths"], r["accuracy"], marker="o", label=f"N={r['d_state']}")
    ax.axvline(T, color="gray", ls=":", lw=1)
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="passkey accuracy",
           title=f"trained at {T}", ylim=(-0.02, 1.02))  # fmt: skip
    ax.legend(fontsize=8)
  paths.append(os.path.join(plots_dir, "state_capacity_accuracy.png"))
  fig.tight_layout()
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5, 4))
  for T in train_lengths:
    rows = sorted((r for r in results if r["train_length"] == T), key=lambda r: r["d_state"])
    ax.plot([r["d_state"] for r in rows], [max(r["max_length_90"], 1) for r in rows],
            marker="o", label=f"trained at {T}")  # fmt: skip
  ax.set(xscale="log", yscale="log", xlabel="state size N (d_state)",
         ylabel="max length with ≥90% accuracy")  # fmt: skip
  ax.legend(fontsize=8)
  paths.append(os.path.join(plots_dir, "state_capacity_max_length.png"))
  fig.tight_layout()
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  mit = out["mitigations"]
  fig, axes = plt.subplots(1, max(1, len(mit)), figsize=(5 * max(1, len(mit)), 4), squeeze=False)
  for ax, m in zip(axes[0], mit, strict=False):
    for name, s in m["state_norms"].items():
      ax.plot(s["positions"], np.max(np.asarray(s["max_abs"]), axis=0), label=name)
    ax.axvline(m["train_length"], color="gray", ls=":", lw=1)
    ax.set(yscale="log", xlabel="position (tokens)", ylabel="max |h| over layers and channels",
           title=f"N={m['d_state']}, trained at {m['train_length']}")  # fmt: skip
    ax.legend(fontsize=8)
  paths.append(os.path.join(plots_dir, "state_capacity_state_norms.png"))
  fig.tight_layout()
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  return paths
