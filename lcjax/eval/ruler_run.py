"""RULER and LongBench on a checkpoint: an lcjax run's newest checkpoint or a model `init_from`
names.

`scripts/eval.py --config ... --workdir DIR --config.eval.tasks='("ruler",)'` and
`scripts/eval.py --hf PATH --workdir DIR` call `evaluate_tasks`, which loads the model once and
runs the RULER tasks of `eval.tasks` (`evaluate_run`, the evaluation itself is
`lcjax.eval.ruler.evaluate_ruler`) and, when `eval.tasks` names "longbench", LongBench on the
local files of `eval.longbench.path` (`evaluate_longbench_run`, the evaluation itself is
`lcjax.eval.longbench.evaluate_longbench`).
"""

from __future__ import annotations

import os

import numpy as np

from lcjax.data import build_tokenizer
from lcjax.eval.io import write_json
from lcjax.eval.longbench import EVAL_TASK as LONGBENCH_TASK
from lcjax.eval.longbench import chat_builder, evaluate_longbench, longbench_markdown
from lcjax.eval.ruler import evaluate_ruler, markdown, write_outputs
from lcjax.eval.ruler_score import greedy_generate
from lcjax.train.metrics import MetricsWriter, read_metrics
from lcjax.train.run_model import build_run_model, load_run_params, model_from_params

__all__ = [
  "evaluate_longbench_run",
  "evaluate_run",
  "evaluate_tasks",
  "load_eval_model",
  "longbench_generate_fn",
]


def load_eval_model(config, workdir: str):
  """(model, step, what): the newest checkpoint of the run in `workdir`; or, when `workdir`
  has no checkpoints and `config.init_from` is set, the model loaded from it (`--hf`)."""
  if config.init_from is not None and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    model, _ = build_run_model(config)
    return model, 0, config.init_from
  params, model_cfg, step = load_run_params(workdir, config=config)
  return model_from_params(params, model_cfg), step, f"{workdir}/checkpoints/{step}"


def _write_metrics(workdir: str, step: int, lines: dict) -> None:
  last = max(
    (m.get("step", 0) for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))), default=step
  )
  writer = MetricsWriter(workdir, resume_step=max(last, step), tensorboard=False)
  writer.write(step, lines)
  writer.close()


def evaluate_tasks(config, workdir: str, *, log=print) -> dict[str, dict]:
  """The tasks of `config.eval.tasks` on the model `config` names (`load_eval_model`).

  RULER task names and groups run through `evaluate_run`, "longbench" through
  `evaluate_longbench_run`; the model is loaded once. Returns {"ruler": result,
  "longbench": result} for the suites that ran.
  """
  tasks = tuple(config.eval.tasks)
  ruler_tasks = tuple(t for t in tasks if t != LONGBENCH_TASK)
  loaded = load_eval_model(config, workdir)
  out = {}
  if ruler_tasks:
    out["ruler"] = evaluate_run(config, workdir, log=log, tasks=ruler_tasks, loaded=loaded)
  if LONGBENCH_TASK in tasks:
    out["longbench"] = evaluate_longbench_run(config, workdir, log=log, loaded=loaded)
  return out


def evaluate_run(config, workdir: str, *, log=print, tasks=None, loaded=None) -> dict:
  """RULER on the model `config` names, writing outputs into `workdir`.

  The newest checkpoint of the run in `workdir`; or, when `workdir` has no checkpoints and
  `config.init_from` is set, the model loaded from it (a Hugging Face folder: `--hf`). The
  tokenizer is `config.data.tokenizer`. Also appends `eval/ruler@L` (the average at L) and
  `eval/ruler_effective_length` lines to WORKDIR/metrics.jsonl. `tasks` replaces
  `config.eval.tasks`; `loaded` is `load_eval_model`'s (model, step, what).
  """
  model, step, what = load_eval_model(config, workdir) if loaded is None else loaded
  tokenizer = build_tokenizer(config.data.tokenizer)
  ev, r = config.eval, config.eval.ruler
  if tasks is None:
    tasks = tuple(t for t in ev.tasks if t != LONGBENCH_TASK)
  log(f"RULER on {what}: tasks {tasks} at lengths {tuple(ev.lengths)}")
  result = evaluate_ruler(
    model,
    tokenizer,
    tasks=tasks,
    lengths=ev.lengths,
    samples=r.samples,
    seed=config.train.seed if r.seed is None else r.seed,
    haystack=r.haystack,
    qa_path=r.qa_path,
    chat_template=r.chat_template,
    tokens_to_generate=r.tokens_to_generate,
    depths=tuple(r.depths),
    scoring=tuple(r.scoring),
    batch_size=r.batch_size,
    threshold=r.threshold,
    log=log,
  )
  result["checkpoint"] = what
  os.makedirs(workdir, exist_ok=True)
  paths = write_outputs(result, workdir)
  log(markdown(result))
  log("wrote " + ", ".join(paths.values()))
  key = "score" if "generate" in result["scoring"] else "tf_score"
  lines = {f"eval/ruler@{n}": v for n, v in result[f"average_{key}"].items()}
  lines["eval/ruler_effective_length"] = result[f"effective_length_{key}"]
  _write_metrics(workdir, step, lines)
  return result


# --- LongBench -----------------------------------------------------------------------------


def _prompt_bucket(longest: int, max_len: int) -> int:
  """Padded prompt length: the next power of two from 256, capped at max_len (prompts are
  truncated to it), so a dataset compiles at most ~log2(max_len / 128) prompt shapes."""
  size = 256
  while size < longest:
    size *= 2
  return max(min(size, max_len), longest)


def longbench_generate_fn(model, *, batch_size: int, max_len: int, pad_id: int = 0):
  """`generate_fn(prompts, max_new_tokens)` of `evaluate_longbench` for an lcjax model.

  Greedy decoding with the KV cache, on prompts of unequal lengths in one batch
  (`lcjax.eval.ruler_score.greedy_generate`, equal to `lcjax.models.generate` row by row);
  every call runs `batch_size` rows (a short last batch repeats its last prompt) and pads
  the prompts to `_prompt_bucket`, so shapes repeat across batches and datasets.
  """

  def generate_fn(prompts, max_new_tokens):
    arrays = [np.asarray(p, np.int32) for p in prompts]
    bucket = _prompt_bucket(max(a.size for a in arrays), max_len)
    return greedy_generate(
      model,
      arrays,
      max_new_tokens=max_new_tokens,
      batch_size=batch_size,
      bucket=bucket,
      pad_id=pad_id,
    )

  return generate_fn


def evaluate_longbench_run(config, workdir: str, *, log=print, loaded=None) -> dict:
  """LongBench (`eval.longbench.*`) on the model `config` names, greedy, into `workdir`.

  Writes WORKDIR/eval/longbench.json (the result of `evaluate_longbench` with every sample's
  prediction, plus the checkpoint and settings) and WORKDIR/eval/longbench.md (the table),
  and appends `eval/longbench_<dataset>` and `eval/longbench_average` lines to
  WORKDIR/metrics.jsonl. `loaded` is `load_eval_model`'s (model, step, what).
  """
  model, step, what = load_eval_model(config, workdir) if loaded is None else loaded
  tokenizer = build_tokenizer(config.data.tokenizer)
  lb = config.eval.longbench
  datasets = tuple(lb.datasets) or None
  log(
    f"LongBench on {what}: {lb.path}, datasets {datasets or 'all in the folder'}, "
    f"max_len {lb.max_len}"
  )
  generate_fn = longbench_generate_fn(
    model, batch_size=lb.batch_size, max_len=lb.max_len, pad_id=getattr(tokenizer, "pad_id", 0)
  )
  result = evaluate_longbench(
    generate_fn,
    tokenizer,
    lb.path,
    datasets,
    lb.max_len,
    limit=lb.limit,
    batch_size=lb.batch_size,
    build_chat=chat_builder(lb.chat_template),
    zh_segmenter=lb.zh_segmenter,
    log=log,
  )
  result.update(
    checkpoint=what,
    path=os.path.abspath(lb.path),
    chat_template=lb.chat_template,
    limit=lb.limit,
    decoding="greedy",
  )
  os.makedirs(workdir, exist_ok=True)
  json_path = write_json(os.path.join(workdir, "eval", "longbench.json"), result)
  md_path = os.path.join(workdir, "eval", "longbench.md")
  table = longbench_markdown(result)
  settings = (
    f"Checkpoint `{what}`, data `{result['path']}`, greedy decoding, prompts of at most "
    f"{lb.max_len} tokens (middle truncated), chat template `{lb.chat_template}`"
    + (f", first {lb.limit} rows per dataset" if lb.limit else "")
    + (f", Chinese segmented by {result['zh_segmenter']}" if result["zh_segmenter"] else "")
    + ". Scores are 0-100 (LongBench's eval.py)."
  )
  with open(md_path, "w") as f:
    f.write(f"# LongBench\n\n{settings}\n\n{table}")
  log(table)
  log(f"wrote {json_path}, {md_path}")
  lines = {f"eval/longbench_{name}": r["score"] for name, r in result["datasets"].items()}
  lines["eval/longbench_average"] = result["average"]
  _write_metrics(workdir, step, lines)
  return result
