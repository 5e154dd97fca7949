"""End-of-training evaluations: perplexity vs. length per RoPE variant, and passkey.

Writes `WORKDIR/eval/ppl_vs_length.json`, `WORKDIR/eval/passkey.json`,
`WORKDIR/plots/ppl_vs_length.png`, `WORKDIR/plots/passkey_depth_length.png`,
`eval/...` lines in metrics.jsonl, and prints a table. RoPE variants
(`eval.rope_variants`, e.g. YaRN applied without training) reuse the trained
weights in a graph rebuilt with another `rope` dict: RoPE has no parameters.
"""

from __future__ import annotations

import os
from typing import Any

from lcjax import data as lcdata
from lcjax.eval import (
  passkey_accuracy,
  perplexity_vs_length,
  plot_passkey_heatmap,
  plot_ppl_vs_length,
  write_json,
)
from lcjax.train.metrics import MetricsWriter, read_metrics
from lcjax.train.run_model import load_run_params, model_from_params

__all__ = [
  "final_evaluations",
  "format_ppl_table",
  "load_trained",
  "evaluate_workdir",
]


def format_ppl_table(results: dict[str, list[dict]], train_len: int) -> str:
  """Rows: RoPE variants; columns: context length (× training length)."""
  lengths = [r["context_len"] for r in next(iter(results.values()))]
  head = f"{'rope':<16}" + "".join(f"{f'{L} ({L / train_len:g}x)':>16}" for L in lengths)
  lines = [head, "-" * len(head)]
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
    out["passkey"] = result
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
  """Restores the newest checkpoint in `workdir` and runs `final_evaluations` on it."""
  params, model_cfg, step = load_trained(config, workdir)
  print(f"evaluating {workdir}/checkpoints/{step}")
  return final_evaluations(config, workdir, params, model_cfg, step)
