"""Multi-stage runs: a config's `stages`, run in order as `WORKDIR/stage-<k>/`.

Progressive continual-pretraining recipes are chains of runs: LWM grows 32K → 1M with
a larger RoPE θ per stage (Liu et al. 2024, Table 1), Qwen2.5-1M 4K → 256K, ProLong
64K → 512K (Gao et al. 2024, keeping the optimizer state). A config writes them as

  c.stages = (
    {"data.seq_len": 512, "model.rope.rope_theta": 1e4, "train.steps": 100},
    {"data.seq_len": 2048, "model.rope.rope_theta": 1e5, "train.steps": 50,
     "train.carry_optimizer_state": True},
  )

Each stage is the config (without `stages`) plus that stage's dotted overrides, not the
previous stage's: a stage says everything in which it differs from the base config.
Stage k > 1 starts from stage k-1's final checkpoint (`init_from` = its run folder), so
its architecture is the checkpoint's; the stage's `model.*` values (RoPE θ, max
positions, remat) are passed as `model_overrides`: every model field the stage names or
that differs from stage k-1's, whole (the full `rope` dict). Stage 1 starts from the
config's own `init_from` when it has one (a Hugging Face folder), with the model fields
it names as `model_overrides` likewise. `train.carry_optimizer_state` also carries stage
k-1's optimizer state (AdamW moments and count) into the stage; its learning-rate
schedule restarts.

The stages are points of a sweep (`lcjax.sweep.runner`), so a finished stage is never
rerun (its `sweep_point.json`), an interrupted one resumes from its newest checkpoint,
and `WORKDIR/results.csv` / `results.md` gather every stage's final metrics. Two plots
span the stages: `plots/stages_loss.png` (training loss vs tokens seen, over all stages)
and `plots/stages_ppl.png` (perplexity vs length after each stage).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from lcjax.config import ConfigError, apply_overrides
from lcjax.sweep.points import Point, SweepSpec, plain
from lcjax.sweep.runner import run_sweep
from lcjax.train.metrics import read_metrics

__all__ = [
  "largest_stage",
  "plot_stage_losses",
  "run_stages",
  "stage_configs",
  "stage_name",
  "stages_spec",
]

_PPL_METRIC = "eval/ppl@{x}/trained"


def stage_name(k: int) -> str:
  """The run folder of stage k (1-based): 'stage-1', 'stage-2', ..."""
  return f"stage-{k}"


def _base(config) -> ml_collections.ConfigDict:
  base = config.copy_and_resolve_references()
  base.stages = ()
  return base


def _stage_dicts(config) -> list[dict[str, Any]]:
  stages = config.get("stages") or ()
  out = []
  for k, stage in enumerate(stages, 1):
    stage = stage.to_dict() if hasattr(stage, "to_dict") else stage
    if not isinstance(stage, Mapping):
      raise ConfigError(
        f"stages[{k - 1}] is {stage!r}; each stage is a dict of dotted overrides, e.g. "
        '{"data.seq_len": 2048, "train.steps": 100}'
      )
    bad = [key for key in stage if key == "stages" or key.startswith("stages.")]
    if bad or "init_from" in stage:
      raise ConfigError(
        f"stages[{k - 1}] sets {(bad or ['init_from'])[0]!r}; a stage starts from the previous "
        "stage's checkpoint (stage 1 from the config's init_from)"
      )
    out.append(dict(stage))
  return out


def _model_section(base, overrides: Mapping[str, Any]) -> dict[str, Any]:
  config = base.copy_and_resolve_references()
  config.lock()
  apply_overrides(config, {k: v for k, v in overrides.items() if k.startswith("model.")})
  return plain(config.model.to_dict())


def stages_spec(config) -> SweepSpec:
  """The stages of `config` as a sweep: points stage-1..N, each after the previous one."""
  stages = _stage_dicts(config)
  if not stages:
    raise ConfigError("config.stages is empty; a multi-stage run needs at least one stage")
  base = _base(config)
  points = []
  previous_model = None
  for k, stage in enumerate(stages, 1):
    overrides = {key: value for key, value in stage.items() if not key.startswith("model.")}
    model = _model_section(base, stage)
    named = {key.split(".")[1] for key in stage if key.startswith("model.")}
    if k == 1 and base.init_from is None:
      overrides.update({key: value for key, value in stage.items() if key.startswith("model.")})
    else:
      # From a checkpoint the model is the checkpoint's: changes go through model_overrides,
      # the whole value of each field the stage names or that differs from the last stage.
      changed = named if k == 1 else named | {f for f, v in model.items() if previous_model[f] != v}
      for field in sorted(changed):
        overrides[f"model_overrides.{field}"] = model[field]
    previous_model = model
    points.append(Point(stage_name(k), overrides, stage_name(k - 1) if k > 1 else None))
  return SweepSpec(
    spec="stages",
    points=tuple(points),
    metrics=("eval/*",),
    plots=(
      dict(
        file="stages_ppl.png",
        metric=_PPL_METRIC,
        title="perplexity vs length after each stage",
        xlabel="context length",
        ylabel="perplexity",
      ),
    ),
    base=base,
  )


def stage_configs(config) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, config) of every stage as a standalone run: the base config with the stage's
  overrides applied directly (its model fields included, no `init_from`, no carried
  optimizer state). What a pod check compiles, since a stage's step does not depend on
  the weights it starts from; and what a recipe's published numbers are checked on."""
  base = _base(config)
  base.init_from = None
  out = []
  for k, stage in enumerate(_stage_dicts(config), 1):
    stage_config = base.copy_and_resolve_references()
    stage_config.lock()
    apply_overrides(stage_config, {**stage, "train.carry_optimizer_state": False})
    out.append((stage_name(k), stage_config))
  if not out:
    raise ConfigError("config.stages is empty; a multi-stage run needs at least one stage")
  return out


def largest_stage(config) -> tuple[str, ml_collections.ConfigDict]:
  """(name, config) of the stage with the most tokens per step (the last of equals)."""
  best = None
  for name, stage_config in stage_configs(config):
    tokens = stage_config.train.batch_size * stage_config.data.seq_len
    if best is None or tokens >= best[0]:
      best = (tokens, name, stage_config)
  return best[1], best[2]


def run_stages(config, workdir: str, out=None) -> dict[str, Any]:
  """Runs the unfinished stages of `config` in `workdir`, then gathers and plots them."""
  spec = stages_spec(config)
  result = run_sweep(spec, workdir, out=out)
  plot_stage_losses(workdir, [p.name for p in spec.points])
  return result


def plot_stage_losses(workdir: str, names: list[str]) -> str | None:
  """plots/stages_loss.png: training loss vs cumulative tokens, one colour per stage."""
  import matplotlib  # noqa: PLC0415 - only multi-stage runs plot this

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(7, 4.5))
  seen = 0.0
  drawn = 0
  for name in names:
    path = os.path.join(workdir, name, "metrics.jsonl")
    if not os.path.exists(path):
      continue
    rows = [r for r in read_metrics(path) if "loss" in r and "step" in r]
    if not rows:
      continue
    tokens_per_step = _tokens_per_step(os.path.join(workdir, name))
    xs = [seen + r["step"] * tokens_per_step for r in rows]
    ax.plot(xs, [r["loss"] for r in rows], label=name)
    seen = xs[-1]
    drawn += 1
  if not drawn:
    plt.close(fig)
    return None
  ax.set_xlabel("tokens seen (all stages)")
  ax.set_ylabel("training loss")
  ax.set_title("training loss across stages")
  ax.legend()
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  path = os.path.join(workdir, "plots", "stages_loss.png")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def _tokens_per_step(run_dir: str) -> float:
  """Rows x sequence length of a run, from its config.json."""
  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  return float(config["train"]["batch_size"] * config["data"]["seq_len"])
