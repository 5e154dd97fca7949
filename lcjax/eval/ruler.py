"""RULER evaluation on any lcjax model: task grid, scores, tables, heatmaps, checkpoints.

    from lcjax.eval import ruler
    result = ruler.evaluate_ruler(model, tokenizer, tasks=("niah",), lengths=(1024, 2048))
    ruler.write_outputs(result, workdir)   # eval/ruler.json, eval/ruler.md, plots/niah_*.png

`scripts/eval.py --config.eval.tasks='("ruler",)' --config.eval.lengths='(4096,8192)'` runs
`lcjax.eval.ruler_run.evaluate_run` on a run's newest checkpoint (or, with `--hf PATH`, on a
Hugging Face folder with its own tokenizer). Tasks and their provenance are in
`lcjax.eval.ruler_tasks`; scorers in `lcjax.eval.ruler_score`. Outputs:
- `eval/ruler.json`: per task and length the score (0-100), n and scorer (RULER's
  string_match_all/part over greedy generations), the teacher-forced scores (greedy_em_*,
  mean per-token log-likelihood), every sample's depth, needle position and scores.
- `eval/ruler.md`: RULER's table, tasks × lengths with the average per length and the
  effective length: the longest length whose average, and every shorter length's, is at least
  `threshold` (RULER's 85.6, Llama-2-7B at 4K; NVIDIA/RULER README).
- `plots/niah_<task>.png` (niah_ prefix not doubled: `plots/niah_single_1.png`): depth × length.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from lcjax.config import ConfigError
from lcjax.eval.io import write_json
from lcjax.eval.longbench import EVAL_TASK as LONGBENCH_TASK
from lcjax.eval.niah_plots import default_depth_rows, depth_length_grid, plot_niah_heatmap
from lcjax.eval.ruler_data import (
  MODEL_TEMPLATES,
  TASKS,
  RulerError,
  TaskTooLong,
  TaskTooShort,
  haystack_lines,
)
from lcjax.eval.ruler_score import (
  GENERATION_SCORERS,
  TEACHER_FORCED_SCORERS,
  cut_at_eos,
  gold_tokens,
  greedy_generate,
  item_score,
  leading_matches,
  mean_or_nan,
  model_forward,
  postprocess_pred,
  score_generations,
  teacher_forced,
)
from lcjax.eval.ruler_tasks import make_samples, task_group

__all__ = [
  "EFFECTIVE_THRESHOLD",
  "SCORING",
  "TASK_GROUPS",
  "effective_length",
  "evaluate_ruler",
  "format_table",
  "markdown",
  "resolve_tasks",
  "validate_ruler_config",
  "write_outputs",
]

EFFECTIVE_THRESHOLD = 85.6  # NVIDIA/RULER README: Llama-2-7B's average at 4K
SCORING = ("generate", "teacher_forced")
# Names eval.tasks may use for several tasks (RULER's categories, arXiv:2404.06654 §3).
TASK_GROUPS: dict[str, tuple[str, ...]] = {
  "ruler": tuple(TASKS),
  "niah": tuple(t for t in TASKS if t.startswith("niah_")),
  "retrieval": tuple(t for t in TASKS if t.startswith("niah_")),
  "multi_hop": ("vt",),
  "aggregation": ("cwe", "fwe"),
}


def resolve_tasks(names: Sequence[str], *, qa_path: str | None, log=print) -> list[str]:
  """Task names of `names` (task names or `TASK_GROUPS`), in RULER's order, each once.

  qa without `qa_path` is dropped with a notice. Unknown names raise one-line RulerError.
  """
  chosen: set[str] = set()
  for name in names:
    if name in TASK_GROUPS:
      chosen.update(TASK_GROUPS[name])
    elif name in TASKS:
      chosen.add(name)
    else:
      raise RulerError(
        f"unknown eval task {name!r}; choose task names ({', '.join(TASKS)}) or groups "
        f"({', '.join(TASK_GROUPS)})"
      )
  if "qa" in chosen and not qa_path:
    chosen.discard("qa")
    log("notice: qa skipped: it reads a local SQuAD-style JSONL file; set eval.ruler.qa_path")
  return [t for t in TASKS if t in chosen]


def effective_length(
  lengths: Sequence[int], averages: Sequence[float], threshold: float = EFFECTIVE_THRESHOLD
) -> int:
  """The longest length L with average >= threshold at L and every shorter length (0: none)."""
  best = 0
  for length, avg in sorted(zip(lengths, averages, strict=True)):
    if not (avg >= threshold):  # NaN (no task evaluated) ends it too
      break
    best = int(length)
  return best


def _sample_scores(model, tokenizer, samples, *, scoring, batch_size, forward) -> list[dict]:
  """Per sample: the generation and teacher-forced scores (see lcjax.eval.ruler_score)."""
  group = task_group(samples[0].task)
  scorer = GENERATION_SCORERS[group]
  records = [dict(s.record(), depth=s.depth) for s in samples]
  length = samples[0].length
  golds = [gold_tokens(tokenizer, s) for s in samples] if "teacher_forced" in scoring else None
  first_gold = None
  if golds is not None:
    rows = [(s.prompt_ids, g) for s, gs in zip(samples, golds, strict=True) for g, _ in gs]
    results = iter(teacher_forced(forward, rows, batch_size=batch_size, length=length))
    budget = samples[0].tokens_to_generate
    for rec, gs in zip(records, golds, strict=True):
      got = [next(results) for _ in gs]
      # Tokens past the answer budget are never generated: they count as misses.
      hits = [h & (np.arange(h.size) < budget) for _, h in got]
      rec["tf_score"] = item_score(scorer, hits, [m for _, m in gs])
      rec["tf_em"] = bool(max(np.all(h) for h in hits))
      rec["tf_leading_matches"] = leading_matches(hits[0])
      rec["tf_logprob"] = float(max(lp.sum() for lp, _ in got))
      rec["tf_gold_tokens"] = int(gs[0][0].size)
    first_gold = [gs[0][0] for gs in golds]
  if "generate" in scoring:
    gen = samples[0].tokens_to_generate
    new = greedy_generate(
      model,
      [s.prompt_ids for s in samples],
      max_new_tokens=gen,
      batch_size=batch_size,
      bucket=length - gen,
      pad_id=getattr(tokenizer, "pad_id", 0),
    )
    for i, (rec, s, new_N) in enumerate(zip(records, samples, new, strict=True)):
      text = tokenizer.decode(cut_at_eos(new_N, getattr(tokenizer, "eos_id", None)))
      rec["prediction"] = postprocess_pred(text)
      rec["score"] = score_generations(scorer, [text], [s.answers])
      if first_gold is not None:
        g = first_gold[i][: new_N.size]
        rec["gen_leading_matches"] = leading_matches(new_N[: g.size] == g)
        rec["gen_em"] = bool(
          first_gold[i].size <= new_N.size and np.array_equal(new_N[: g.size], g)
        )
  return records


def evaluate_ruler(
  model,
  tokenizer,
  *,
  tasks: Sequence[str],
  lengths: Sequence[int],
  samples: int = 20,
  seed: int = 0,
  haystack: str = "code",
  qa_path: str | None = None,
  chat_template: str = "base",
  tokens_to_generate: int = 0,
  depths: Sequence[float] = (),
  scoring: Sequence[str] = SCORING,
  batch_size: int = 8,
  threshold: float = EFFECTIVE_THRESHOLD,
  forward: Callable | None = None,
  log: Callable[[str], None] = print,
) -> dict:
  """Scores `model` on RULER `tasks` × `lengths`; returns the result dict `write_outputs` reads.

  Args:
    model: an lcjax model (KV-cache decoding for "generate"); may be None when `scoring` is
      only "teacher_forced" and `forward` is given.
    tokenizer: an lcjax tokenizer (byte or hf).
    tasks: task names or groups (`resolve_tasks`).
    lengths: target lengths in tokens (prompt + answer budget).
    samples: prompts per task and length (RULER: 500).
    seed, haystack, qa_path, chat_template, tokens_to_generate, depths: `make_samples`.
    scoring: "generate" (RULER's scores) and/or "teacher_forced".
    batch_size: rows per compiled call.
    threshold: score threshold of the effective length.
    forward: the teacher-forced `Forward` (default `model_forward(model)`).
    log: progress lines (task i/n, samples per second).

  A (task, length) whose template does not fit the length, or that needs more words than the
  word lists hold, is recorded as skipped with the reason (printed); if every cell is skipped
  the one-line RulerError of the first is raised.
  """
  scoring = tuple(scoring)
  if not scoring or any(s not in SCORING for s in scoring):
    raise RulerError(f"scoring={scoring!r}: choose one or both of {', '.join(SCORING)}")
  names = resolve_tasks(tasks, qa_path=qa_path, log=log)
  if not names:
    raise RulerError("no RULER task to evaluate; set eval.tasks (e.g. ('ruler',))")
  lengths = sorted(int(n) for n in lengths)
  if not lengths:
    raise RulerError("no lengths to evaluate at; set eval.lengths, e.g. (4096, 8192)")
  if model is None and "generate" in scoring:
    raise RulerError("scoring 'generate' decodes with a model: pass one, or score teacher_forced")
  if forward is None and "teacher_forced" in scoring:
    forward = model_forward(model)
  label = (
    haystack_lines(haystack)[1]
    if any(TASKS[t][1].get("type_haystack") == "essay" for t in names)
    else None
  )
  cells: dict[str, dict[str, dict]] = {t: {} for t in names}
  records: list[dict] = []
  errors: list[RulerError] = []
  total = len(names) * len(lengths)
  for i, (task, length) in enumerate(((t, n) for t in names for n in lengths), 1):
    scorer = GENERATION_SCORERS[task_group(task)]
    start = time.perf_counter()
    try:
      made = make_samples(
        task,
        tokenizer,
        length,
        samples,
        seed=seed,
        haystack=haystack,
        qa_path=qa_path,
        chat_template=chat_template,
        tokens_to_generate=tokens_to_generate or None,
        depths=list(depths) or None,
      )
    except (TaskTooShort, TaskTooLong) as e:
      errors.append(e)
      cells[task][str(length)] = dict(skipped=str(e), n=0, scorer=scorer)
      log(f"task {i}/{total}: {task} @ {length}: skipped: {e}")
      continue
    recs = _sample_scores(
      model, tokenizer, made, scoring=scoring, batch_size=batch_size, forward=forward
    )
    records += recs
    cell = dict(n=len(recs), scorer=scorer, prompt_tokens=[r["prompt_tokens"] for r in recs])
    if "generate" in scoring:
      cell["score"] = score_generations(
        scorer, [r["prediction"] for r in recs], [s.answers for s in made]
      )
    if "teacher_forced" in scoring:
      cell["tf_score"] = round(mean_or_nan([r["tf_score"] for r in recs]), 2)
      cell["tf_scorer"] = TEACHER_FORCED_SCORERS[scorer]
      tokens = sum(r["tf_gold_tokens"] for r in recs)
      cell["tf_logprob_per_token"] = sum(r["tf_logprob"] for r in recs) / max(tokens, 1)
    cells[task][str(length)] = cell
    rate = len(recs) / max(time.perf_counter() - start, 1e-9)
    shown = f"{cell['score']:.1f}" if "score" in cell else f"{cell['tf_score']:.1f} (tf)"
    log(f"task {i}/{total}: {task} @ {length}: {shown} ({len(recs)} samples, {rate:.2f}/s)")
  if len(errors) == total:
    raise errors[0]
  result = dict(
    tasks=names,
    lengths=lengths,
    samples=samples,
    seed=seed,
    scoring=list(scoring),
    chat_template=chat_template,
    tokens_to_generate=tokens_to_generate or "RULER's per task",
    haystack=label,
    threshold=threshold,
    depths=list(depths),
    results=cells,
    records=records,
  )
  for key, mode in (("score", "generate"), ("tf_score", "teacher_forced")):
    if mode not in scoring:
      continue
    avg = [
      mean_or_nan([cells[t][str(n)][key] for t in names if key in cells[t][str(n)]])
      for n in lengths
    ]
    result[f"average_{key}"] = {str(n): a for n, a in zip(lengths, avg, strict=True)}
    result[f"effective_length_{key}"] = effective_length(lengths, avg, threshold)
  return result


def format_table(result: dict, key: str = "score", *, digits: int = 1) -> str:
  """A RULER-style markdown table: tasks × lengths and the average row, then for scores
  (`score`, `tf_score`) the effective length; other keys (`tf_logprob_per_token`) just a table."""
  lengths = result["lengths"]
  cells = result["results"]
  lines = ["| task | " + " | ".join(str(n) for n in lengths) + " |"]
  lines.append("|---" * (len(lengths) + 1) + "|")
  for task in result["tasks"]:
    row = [
      "—" if key not in cells[task][str(n)] else f"{cells[task][str(n)][key]:.{digits}f}"
      for n in lengths
    ]
    lines.append(f"| {task} | " + " | ".join(row) + " |")
  avg = [
    mean_or_nan([cells[t][str(n)][key] for t in result["tasks"] if key in cells[t][str(n)]])
    for n in lengths
  ]
  shown = ["—" if math.isnan(a) else f"**{a:.{digits}f}**" for a in avg]
  lines.append("| **average** | " + " | ".join(shown) + " |")
  if f"effective_length_{key}" not in result:
    return "\n".join(lines)
  eff, thr = result[f"effective_length_{key}"], result["threshold"]
  if eff:
    why = f"**{eff}**"
  else:
    first = lengths[0]
    why = "none: " + (
      f"no task fits {first} tokens" if math.isnan(avg[0]) else f"{avg[0]:.1f} at {first}"
    )
  lines += ["", f"Effective length (longest length averaging >= {thr}, and every shorter): {why}"]
  return "\n".join(lines)


def markdown(result: dict) -> str:
  """eval/ruler.md: the settings, the generation and teacher-forced tables, skipped cells."""
  parts = [
    "# RULER",
    "",
    f"{result['samples']} samples per task and length, seed {result['seed']}, chat template "
    f"`{result['chat_template']}`. Scores are 0-100.",
  ]
  if result.get("haystack"):
    parts.append(
      f"Essay haystack replaced (a declared deviation from RULER): {result['haystack']}."
    )
  if "generate" in result["scoring"]:
    parts += ["", "## Greedy generation (RULER's string_match_all; qa string_match_part)", ""]
    parts.append(format_table(result, "score"))
  if "teacher_forced" in result["scoring"]:
    parts += [
      "",
      "## Teacher-forced greedy-equivalent exact match (greedy_em_all; qa greedy_em_part)",
      "",
      format_table(result, "tf_score"),
      "",
      "## Teacher-forced log-likelihood of the gold answer (nats per token; uniform: -ln V)",
      "",
      format_table(result, "tf_logprob_per_token", digits=3),
    ]
  skipped = [
    f"- {t} @ {n}: {c['skipped']}"
    for t in result["tasks"]
    for n, c in result["results"][t].items()
    if "skipped" in c
  ]
  if skipped:
    parts += ["", "Skipped cells (—):", *skipped]
  return "\n".join(parts) + "\n"


def write_outputs(result: dict, workdir: str, *, depth_bins: int = 5) -> dict[str, str]:
  """Writes eval/ruler.json, eval/ruler.md and plots/niah_<task>.png; returns the paths."""
  paths = {
    "json": write_json(os.path.join(workdir, "eval", "ruler.json"), result),
    "md": os.path.join(workdir, "eval", "ruler.md"),
  }
  with open(paths["md"], "w") as f:
    f.write(markdown(result))
  rows = list(result["depths"]) or default_depth_rows(depth_bins)
  key = "score" if "generate" in result["scoring"] else "tf_score"
  for task in result["tasks"]:
    recs = [r for r in result["records"] if r["task"] == task]
    if not any(r.get("depth") is not None for r in recs):
      continue  # cwe, fwe: no needle
    mean_DL, _ = depth_length_grid(recs, result["lengths"], rows, key=key)
    name = task.removeprefix("niah_")
    paths[task] = plot_niah_heatmap(
      mean_DL,
      result["lengths"],
      rows,
      os.path.join(workdir, "plots", f"niah_{name}.png"),
      title=f"RULER {task} ({'greedy' if key == 'score' else 'teacher-forced'})",
    )
  return paths


# --- config and checkpoints --------------------------------------------------------------------


def validate_ruler_config(ev) -> None:
  """Raises ConfigError (one line naming the field) for bad eval.tasks/lengths/ruler fields."""
  tasks = [t for t in ev.get("tasks") or () if t != LONGBENCH_TASK]  # lcjax.eval.longbench
  if not tasks:
    return
  r = ev.ruler
  try:
    resolve_tasks(tasks, qa_path=r.qa_path, log=lambda _: None)
  except RulerError as e:
    raise ConfigError(f"eval.tasks: {e}, or {LONGBENCH_TASK!r} (eval.longbench.*)") from None
  if not ev.lengths or any(int(n) < 1 for n in ev.lengths):
    raise ConfigError(
      f"eval.lengths={tuple(ev.lengths)} must be positive token counts, e.g. (4096, 8192)"
    )
  checks = [
    (r.samples >= 1, f"eval.ruler.samples={r.samples} must be >= 1"),
    (r.batch_size >= 1, f"eval.ruler.batch_size={r.batch_size} must be >= 1"),
    (0 <= r.threshold <= 100, f"eval.ruler.threshold={r.threshold} must be a score in [0, 100]"),
    (r.tokens_to_generate >= 0, "eval.ruler.tokens_to_generate must be >= 0 (0: RULER's)"),
    (
      bool(r.scoring) and all(s in SCORING for s in r.scoring),
      f"eval.ruler.scoring={tuple(r.scoring)} must name some of {SCORING}",
    ),
    (
      r.chat_template in MODEL_TEMPLATES,
      f"eval.ruler.chat_template={r.chat_template!r} is unknown; choose one of "
      + ", ".join(MODEL_TEMPLATES),
    ),
    (
      all(0 <= d <= 100 for d in r.depths),
      f"eval.ruler.depths={tuple(r.depths)} must be percents in [0, 100]",
    ),
    (
      r.haystack == "code" or os.path.isdir(r.haystack),
      f"eval.ruler.haystack={r.haystack!r} must be 'code' or a folder of .txt/.md files",
    ),
    (
      r.qa_path is None or os.path.isfile(r.qa_path),
      f"eval.ruler.qa_path={r.qa_path!r} is not a file; point it at a SQuAD-style JSONL",
    ),
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)
