"""End-of-training evaluations: perplexity vs. length per RoPE variant, passkey, state norms.

Writes `WORKDIR/eval/ppl_vs_length.json`, `WORKDIR/eval/passkey.json`,
`WORKDIR/plots/ppl_vs_length.png`, `WORKDIR/plots/passkey_depth_length.png`,
`eval/...` lines in metrics.jsonl, and prints a table. RoPE variants
(`eval.rope_variants`, e.g. YaRN applied without training) reuse the trained
weights in a graph rebuilt with another `rope` dict: RoPE has no parameters.
Passkey also logs `eval/passkey_max_length` (the longest length retrieved with accuracy
>= `eval.passkey.threshold`, Chen et al. 2024 §6); `eval.state_norms` (Mamba-2) writes
`WORKDIR/eval/state_norms.json`, `WORKDIR/plots/state_norms.png` and `eval/state_*` lines
(`lcjax.eval.state_capacity.state_norm_evaluation`); `eval.mqar` and `eval.token_passkey`
(synthetic-task recall) run `lcjax.eval.mqar.synthetic_evaluations`.
"""

from __future__ import annotations

import os
from typing import Any

from flax import nnx

from lcjax import data as lcdata
from lcjax.config import require
from lcjax.eval import (
  passkey_accuracy,
  perplexity_vs_length,
  plot_passkey_heatmap,
  plot_ppl_vs_length,
  write_json,
)
from lcjax.eval.mqar import synthetic_evaluations
from lcjax.eval.passkey import PASSKEY_THRESHOLD, max_length_at
from lcjax.eval.precision import bf16_rope_evaluation
from lcjax.eval.state_capacity import plot_state_norms, state_norm_evaluation
from lcjax.interop.native import write_model_config
from lcjax.train.metrics import MetricsWriter, read_metrics, write_run_config
from lcjax.train.run_model import build_run_model, load_run_params, model_from_params

__all__ = [
  "final_evaluations",
  "format_ppl_table",
  "load_trained",
  "evaluate_init",
  "evaluate_workdir",
]


def format_ppl_table(results: dict[str, list[dict]], train_len: int) -> str:
  """Rows: RoPE variants; columns: context length (× training length).

  The first line names the protocol (`lcjax.eval.perplexity`): numbers from the
  sliding and the truncated protocol are not comparable.
  """
  rows0 = next(iter(results.values()))
  lengths = [r["context_len"] for r in rows0]
  first = rows0[0]
  protocol = first.get("protocol", "sliding")
  if protocol == "truncated":
    how = f"one window of L tokens per document, {first['documents']} documents"
  else:
    strides = ", ".join(str(r["stride"]) for r in rows0)
    how = f"strided windows (stride {strides}), {first['documents']} documents"
  title = f"protocol: {protocol} ({how})"
  head = f"{'rope':<16}" + "".join(f"{f'{L} ({L / train_len:g}x)':>16}" for L in lengths)
  lines = [title, head, "-" * len(head)]
  for name, rows in results.items():
    lines.append(f"{name:<16}" + "".join(f"{r['ppl']:>16.3f}" for r in rows))
  return "\n".join(lines)


def final_evaluations(config, workdir, params, model_cfg, step) -> dict[str, Any]:
  """Runs the configured evaluations on `params`; returns what it wrote."""
  out: dict[str, Any] = {}
  ev = config.eval
  lines: dict[str, float] = {}
  if ev.ppl_lengths:
    docs = lcdata.make_eval_documents(config.data, split="validation", max_documents=None)
    variants = {"trained": None}
    if "rope" in model_cfg:  # RoPE variants apply to attention families only
      variants.update({k: dict(v) for k, v in ev.rope_variants.items()})
    results = {}
    for name, rope in variants.items():
      model = model_from_params(params, model_cfg, rope)
      results[name] = perplexity_vs_length(
        model,
        docs,
        list(ev.ppl_lengths),
        stride_fraction=ev.ppl_stride_fraction,
        max_documents=ev.ppl_max_documents,
        max_tokens_per_document=ev.get("ppl_max_tokens_per_document"),
        protocol=ev.ppl_protocol,
      )
      for row in results[name]:
        lines[f"eval/ppl@{row['context_len']}/{name}"] = row["ppl"]
    write_json(os.path.join(workdir, "eval", "ppl_vs_length.json"), results)
    plot_ppl_vs_length(
      results, os.path.join(workdir, "plots", "ppl_vs_length.png"), train_len=config.data.seq_len
    )
    table = format_ppl_table(results, config.data.seq_len)
    print(f"perplexity vs. context length (trained at {config.data.seq_len}):\n{table}")
    out["ppl_vs_length"] = results
  if ev.passkey.enabled:
    tokenizer = lcdata.build_tokenizer(config.data.tokenizer)
    model = model_from_params(params, model_cfg, None)
    result = passkey_accuracy(
      model,
      tokenizer,
      lengths=list(ev.passkey.lengths),
      depths=list(ev.passkey.depths),
      trials=ev.passkey.trials,
      seed=config.train.seed,
    )
    write_json(os.path.join(workdir, "eval", "passkey.json"), result)
    plot_passkey_heatmap(
      result["accuracy"],
      result["lengths"],
      result["depths"],
      os.path.join(workdir, "plots", "passkey_depth_length.png"),
    )
    for i, length in enumerate(result["lengths"]):
      lines[f"eval/passkey@{length}"] = sum(result["accuracy"][i]) / len(result["depths"])
    lines["eval/passkey_max_length"] = max_length_at(
      result["lengths"],
      [lines[f"eval/passkey@{n}"] for n in result["lengths"]],
      ev.passkey.get("threshold", PASSKEY_THRESHOLD),
    )
    out["passkey"] = result
  if any(ev.get(task) is not None and ev[task].enabled for task in ("mqar", "token_passkey")):
    results, recall_lines = synthetic_evaluations(
      config, workdir, model_from_params(params, model_cfg, None), model_cfg
    )
    out.update(results)
    lines.update(recall_lines)
  if ev.get("state_norms") is not None and ev.state_norms.enabled:
    summary, state_lines = state_norm_evaluation(
      model_from_params(params, model_cfg, None),
      lcdata.build_tokenizer(config.data.tokenizer),
      length=ev.state_norms.length,
      every=ev.state_norms.every,
      train_length=config.data.seq_len,
      data_config=config.data,
    )
    write_json(os.path.join(workdir, "eval", "state_norms.json"), summary)
    plot_state_norms(summary, os.path.join(workdir, "plots", "state_norms.png"))
    lines.update(state_lines)
    out["state_norms"] = summary
  if ev.get("bf16_rope") is not None and ev.bf16_rope.enabled:  # configs/bf16_rope.py
    out["bf16_rope"], bf16_lines = bf16_rope_evaluation(
      ev.bf16_rope, params, model_cfg, config.data, workdir, model_from_params=model_from_params
    )
    lines.update(bf16_lines)
  if lines:
    last = max(
      (r.get("step", 0) for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))), default=step
    )
    writer = MetricsWriter(workdir, resume_step=max(last, step), tensorboard=False)
    writer.write(step, lines)
    writer.close()
  return out


def load_trained(config, workdir: str, *, step: int | None = None):
  """(params, model_config, step) of the newest complete checkpoint in `workdir` (or `step`).

  The attention settings come from `config` (e.g. evaluate with another impl).
  """
  return load_run_params(workdir, step=step, config=config)


def evaluate_workdir(config, workdir: str) -> dict[str, Any]:
  """Restores the newest checkpoint in `workdir` and runs `final_evaluations` on it.

  A `workdir` without checkpoints and a config with `init_from` evaluates the model
  the config builds from it (`evaluate_init`: e.g. a checkpoint under another RoPE).
  """
  if config.init_from is not None and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return evaluate_init(config, workdir)
  params, model_cfg, step = load_trained(config, workdir)
  print(f"evaluating {workdir}/checkpoints/{step}")
  return final_evaluations(config, workdir, params, model_cfg, step)


def evaluate_init(config, workdir: str) -> dict[str, Any]:
  """Evaluates, untrained, the model `config` builds (`init_from` + `model_overrides`).

  Writes the run folder's config.json and model_config.json beside the evaluations, so
  the folder says which model it measured (an eval-only sweep point).
  """
  require(config.init_from is not None, "evaluating without training needs init_from")
  model, model_cfg = build_run_model(config)
  os.makedirs(workdir, exist_ok=True)
  write_run_config(config, workdir)
  write_model_config(model_cfg, workdir)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  print(f"evaluating {config.init_from} (with model_overrides) in {workdir}")
  return final_evaluations(config, workdir, params, model_cfg, 0)
