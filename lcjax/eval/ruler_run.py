"""RULER on a checkpoint: an lcjax run's newest checkpoint or a model `init_from` names.

`scripts/eval.py --config ... --workdir DIR --config.eval.tasks='("ruler",)'` and
`scripts/eval.py --hf PATH --workdir DIR` call `evaluate_run`; the evaluation itself is
`lcjax.eval.ruler.evaluate_ruler`.
"""

from __future__ import annotations

import os

from lcjax.data import build_tokenizer
from lcjax.eval.ruler import evaluate_ruler, markdown, write_outputs
from lcjax.train.metrics import MetricsWriter, read_metrics
from lcjax.train.run_model import build_run_model, load_run_params, model_from_params

__all__ = ["evaluate_run"]


def evaluate_run(config, workdir: str, *, log=print) -> dict:
  """RULER on the model `config` names, writing outputs into `workdir`.

  The newest checkpoint of the run in `workdir`; or, when `workdir` has no checkpoints and
  `config.init_from` is set, the model loaded from it (a Hugging Face folder: `--hf`). The
  tokenizer is `config.data.tokenizer`. Also appends `eval/ruler@L` (the average at L) and
  `eval/ruler_effective_length` lines to WORKDIR/metrics.jsonl.
  """
  if config.init_from is not None and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    model, _ = build_run_model(config)
    step, what = 0, config.init_from
  else:
    params, model_cfg, step = load_run_params(workdir, config=config)
    model, what = model_from_params(params, model_cfg), f"{workdir}/checkpoints/{step}"
  tokenizer = build_tokenizer(config.data.tokenizer)
  ev, r = config.eval, config.eval.ruler
  log(f"RULER on {what}: tasks {tuple(ev.tasks)} at lengths {tuple(ev.lengths)}")
  result = evaluate_ruler(
    model,
    tokenizer,
    tasks=ev.tasks,
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
  last = max(
    (m.get("step", 0) for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))), default=step
  )
  writer = MetricsWriter(workdir, resume_step=max(last, step), tensorboard=False)
  writer.write(step, lines)
  writer.close()
  return result
