"""LongBench on local files (Bai et al. 2023, arXiv:2308.14508; THUDM/LongBench).

Reads LongBench-format JSONL (the rows of LongBench's data.zip: `context`, `input`,
`answers`, `all_classes`, `length`; other fields are ignored) from a local folder, builds
each dataset's prompt, truncates it in the middle, lets any model continue it greedily
through `generate_fn`, and scores the continuation as LongBench does. Nothing is downloaded.
`scripts/eval.py --config.eval.tasks='("longbench",)' --config.eval.longbench.path=DIR` runs it
on a checkpoint (`lcjax.eval.ruler_run.evaluate_longbench_run`, fields `eval.longbench.*`).

Sources (THUDM/LongBench, commit 2e00731):
- prompts `LongBench/config/dataset2prompt.json` and generation lengths
  `LongBench/config/dataset2maxlen.json`, copied verbatim (typos included:
  narrativeqa's "asconcisely");
- `LongBench/pred.py` `get_pred`: the prompt is tokenized with the tokenizer's BOS; when it
  is longer than `max_length` tokens, the first and the last `int(max_length / 2)` tokens are
  kept; chat templates (`build_chat`) are skipped for trec, triviaqa, samsum, lsht, lcc and
  repobench-p; decoding is greedy and stops at EOS;
- `LongBench/eval.py`: `dataset2metric`; for trec, triviaqa, samsum and lsht only the first
  line of the prediction (after leading newlines) is scored; a sample scores the max over
  its answers; a dataset scores round(100 * mean, 2); LongBench-E (`<name>_e.jsonl`) also
  reports the buckets length < 4000, < 8000 and the rest ("0-4k", "4-8k", "8k+").
- metrics: `lcjax.eval.text_metrics` (LongBench `metrics.py`, pltrdy rouge, fuzzywuzzy).

Deviations (all documented in `evaluate_longbench`): truncation cuts the token list
directly (pred.py decodes the two halves and re-tokenizes the text, which can shift a
token at the seam) unless `build_chat` is given, in which case pred.py's decode/re-encode
is followed; no model-specific chat template by default; samsum's `min_length` and its
extra stop token "\\n" are not applied (only the first line is scored anyway); an empty
LongBench-E bucket is None (eval.py gives NaN); `all_classes` is taken per row (eval.py
uses the last row's, identical in LongBench's files); Chinese metrics use jieba only when
it is installed (see `text_metrics.zh_segmenter`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from lcjax.config import ConfigError
from lcjax.eval import text_metrics as tm
from lcjax.eval.ruler_data import MODEL_TEMPLATES

__all__ = [
  "DATASET2PROMPT",
  "DATASET2MAXLEN",
  "DATASET2METRIC",
  "DATASETS",
  "LONGBENCH_E_DATASETS",
  "CATEGORIES",
  "resolve_dataset",
  "read_longbench_jsonl",
  "format_prompt",
  "truncate_middle",
  "encode_longbench_prompt",
  "score_predictions",
  "evaluate_longbench",
  "longbench_markdown",
  "EVAL_TASK",
  "LongBenchError",
  "chat_builder",
  "validate_longbench_config",
]

# LongBench/config/dataset2prompt.json (verbatim).
DATASET2PROMPT = {
  "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
  "qasper": 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',  # noqa: E501
  "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
  "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",  # noqa: E501
  "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
  "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
  "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
  "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",  # noqa: E501
  "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",  # noqa: E501
  "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",  # noqa: E501
  "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",  # noqa: E501
  "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",  # noqa: E501
  "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",  # noqa: E501
  "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
  "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
  "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
  "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",  # noqa: E501
  "passage_retrieval_en": 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',  # noqa: E501
  "passage_retrieval_zh": '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',  # noqa: E501
  "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
  "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# LongBench/config/dataset2maxlen.json: max_new_tokens per dataset.
DATASET2MAXLEN = {
  "narrativeqa": 128,
  "qasper": 128,
  "multifieldqa_en": 64,
  "multifieldqa_zh": 64,
  "hotpotqa": 32,
  "2wikimqa": 32,
  "musique": 32,
  "dureader": 128,
  "gov_report": 512,
  "qmsum": 512,
  "multi_news": 512,
  "vcsum": 512,
  "trec": 64,
  "triviaqa": 32,
  "samsum": 128,
  "lsht": 64,
  "passage_count": 32,
  "passage_retrieval_en": 32,
  "passage_retrieval_zh": 32,
  "lcc": 64,
  "repobench-p": 64,
}

# LongBench/eval.py dataset2metric, as (name, function).
DATASET2METRIC = {
  "narrativeqa": ("qa_f1", tm.qa_f1_score),
  "qasper": ("qa_f1", tm.qa_f1_score),
  "multifieldqa_en": ("qa_f1", tm.qa_f1_score),
  "multifieldqa_zh": ("qa_f1_zh", tm.qa_f1_zh_score),
  "hotpotqa": ("qa_f1", tm.qa_f1_score),
  "2wikimqa": ("qa_f1", tm.qa_f1_score),
  "musique": ("qa_f1", tm.qa_f1_score),
  "dureader": ("rouge_l_zh", tm.rouge_zh_score),
  "gov_report": ("rouge_l", tm.rouge_score),
  "qmsum": ("rouge_l", tm.rouge_score),
  "multi_news": ("rouge_l", tm.rouge_score),
  "vcsum": ("rouge_l_zh", tm.rouge_zh_score),
  "trec": ("classification", tm.classification_score),
  "triviaqa": ("qa_f1", tm.qa_f1_score),
  "samsum": ("rouge_l", tm.rouge_score),
  "lsht": ("classification", tm.classification_score),
  "passage_retrieval_en": ("retrieval", tm.retrieval_score),
  "passage_count": ("count", tm.count_score),
  "passage_retrieval_zh": ("retrieval_zh", tm.retrieval_zh_score),
  "lcc": ("code_sim", tm.code_sim_score),
  "repobench-p": ("code_sim", tm.code_sim_score),
}

DATASETS = tuple(DATASET2PROMPT)
# pred.py --e: the datasets LongBench-E has (files `<name>_e.jsonl`).
LONGBENCH_E_DATASETS = (
  "qasper",
  "multifieldqa_en",
  "hotpotqa",
  "2wikimqa",
  "gov_report",
  "multi_news",
  "trec",
  "triviaqa",
  "samsum",
  "passage_count",
  "passage_retrieval_en",
  "lcc",
  "repobench-p",
)
# LongBench/README.md task table.
CATEGORIES = {
  "Single-Doc QA": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
  "Multi-Doc QA": ("hotpotqa", "2wikimqa", "musique", "dureader"),
  "Summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
  "Few-shot Learning": ("trec", "triviaqa", "samsum", "lsht"),
  "Synthetic Tasks": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
  "Code Completion": ("lcc", "repobench-p"),
}
# pred.py: chat models "are better off without build prompts on these tasks".
NO_CHAT_DATASETS = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
# eval.py: only the first line of the prediction is scored.
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")
_ZH_SEGMENTED = ("multifieldqa_zh", "dureader", "vcsum")
_E_BUCKETS = ("0-4k", "4-8k", "8k+")


class LongBenchError(ValueError):
  """Bad LongBench input (dataset name, file, row, size); the message is one line."""


GenerateFn = Callable[[list[list[int]], int], Sequence[Sequence[int]]]
# The name `eval.tasks` uses for LongBench (scripts/eval.py; fields `eval.longbench.*`).
EVAL_TASK = "longbench"
ZH_SEGMENTERS = ("auto", "jieba", "char")


def _known_names() -> str:
  return ", ".join(DATASETS) + "; LongBench-E: " + ", ".join(f"{d}_e" for d in LONGBENCH_E_DATASETS)


def resolve_dataset(name: str) -> tuple[str, bool]:
  """(LongBench dataset, is LongBench-E) of a file name stem such as "qasper" or "qasper_e"."""
  if name in DATASET2PROMPT:
    return name, False
  if name.endswith("_e") and name[:-2] in LONGBENCH_E_DATASETS:
    return name[:-2], True
  raise LongBenchError(f"unknown LongBench dataset {name!r}; known: {_known_names()}")


def _check_row(row, where: str, base: str) -> dict:
  if not isinstance(row, dict):
    raise LongBenchError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
  for field in ("context", "input"):
    if not isinstance(row.get(field), str):
      raise LongBenchError(
        f"{where}: field {field!r} must be a string (got {row.get(field)!r:.40})"
      )
  answers = row.get("answers")
  if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
    raise LongBenchError(f"{where}: field 'answers' must be a non-empty list of strings")
  classes = row.get("all_classes")
  if classes is not None and not (
    isinstance(classes, list) and all(isinstance(c, str) for c in classes)
  ):
    raise LongBenchError(f"{where}: field 'all_classes' must be null or a list of strings")
  if classes is None and DATASET2METRIC[base][0] == "classification":
    raise LongBenchError(
      f"{where}: {base} is scored by classification; 'all_classes' must list them"
    )
  length = row.get("length")
  if isinstance(length, bool) or not isinstance(length, int) or length < 0:
    raise LongBenchError(
      f"{where}: field 'length' must be a non-negative integer (words, or characters for "
      f"Chinese), got {length!r}"
    )
  return dict(
    context=row["context"],
    input=row["input"],
    answers=list(answers),
    all_classes=classes,
    length=length,
  )


def read_longbench_jsonl(path: str | os.PathLike, dataset: str) -> list[dict]:
  """Rows of a LongBench JSONL file, checked; a bad row raises ValueError naming file:line.

  Blank lines are skipped. `dataset` (e.g. "hotpotqa" or "hotpotqa_e") decides which
  fields are needed: classification datasets need `all_classes`.
  """
  base, _ = resolve_dataset(dataset)
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LongBench file {path} does not exist; point path at the data folder")
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as err:
        raise LongBenchError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
      rows.append(_check_row(row, where, base))
  if not rows:
    raise LongBenchError(f"{path}: no rows; a LongBench file has one JSON object per line")
  return rows


def format_prompt(dataset: str, row: dict) -> str:
  """The dataset's LongBench prompt (dataset2prompt.json) filled with the row's fields."""
  base, _ = resolve_dataset(dataset)
  return DATASET2PROMPT[base].format(context=row["context"], input=row["input"])


def truncate_middle(ids: Sequence[int], max_len: int) -> list[int]:
  """pred.py: longer than max_len -> the first and the last int(max_len / 2) tokens."""
  if max_len < 2:
    raise LongBenchError(f"max_len={max_len} must be at least 2 (half of it is kept at each end)")
  ids = list(ids)
  if len(ids) <= max_len:
    return ids
  half = int(max_len / 2)
  return ids[:half] + ids[-half:]


def _bos(tokenizer, add_bos: bool) -> list[int]:
  bos_id = getattr(tokenizer, "bos_id", None)
  return [int(bos_id)] if add_bos and bos_id is not None else []


def encode_longbench_prompt(
  tokenizer,
  dataset: str,
  row: dict,
  max_len: int,
  *,
  add_bos: bool = True,
  build_chat: Callable[[str], str] | None = None,
) -> tuple[list[int], bool]:
  """(prompt token ids, whether it was truncated), as pred.py `get_pred` builds them.

  The prompt is BOS (when `add_bos` and the tokenizer has `bos_id`) + encode(text); longer
  than `max_len` tokens, it keeps its first and last int(max_len/2) tokens (the BOS counts,
  as in pred.py, where the HF tokenizer adds it). With `build_chat`, pred.py is followed
  exactly: the two halves are decoded (special tokens skipped), joined, wrapped by
  `build_chat` unless the dataset is in NO_CHAT_DATASETS, and encoded again with BOS.
  """
  base, _ = resolve_dataset(dataset)
  text = format_prompt(base, row)
  ids = _bos(tokenizer, add_bos) + [int(t) for t in tokenizer.encode(text)]
  truncated = len(ids) > max_len
  kept = truncate_middle(ids, max_len)
  if build_chat is None:
    return kept, truncated
  if truncated:
    half = int(max_len / 2)
    text = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
      ids[-half:], skip_special_tokens=True
    )
  if base not in NO_CHAT_DATASETS:
    text = build_chat(text)
  return _bos(tokenizer, add_bos) + [int(t) for t in tokenizer.encode(text)], truncated


def _bucket(length: int) -> str:
  return "0-4k" if length < 4000 else ("4-8k" if length < 8000 else "8k+")


def score_predictions(
  dataset: str,
  predictions: Sequence[str],
  answers: Sequence[Sequence[str]],
  all_classes: Sequence[Sequence[str] | None],
  lengths: Sequence[int] | None = None,
  *,
  segment: Callable[[str], list[str]] | None = None,
) -> dict:
  """eval.py `scorer` (and `scorer_e` for "<name>_e"): per-sample and dataset scores.

  Returns dict(score=round(100 * mean sample score, 2), samples=[max over answers per
  sample, in [0, 1]], metric=name) and, for LongBench-E, buckets={"0-4k", "4-8k", "8k+":
  round(100 * mean, 2), or None when the bucket is empty}. `segment` is the Chinese
  segmenter (`text_metrics.zh_segmenter`), used by multifieldqa_zh, dureader and vcsum.
  """
  base, is_e = resolve_dataset(dataset)
  if not (len(predictions) == len(answers) == len(all_classes)):
    raise LongBenchError("predictions, answers and all_classes must have one entry per sample")
  if not predictions:
    raise LongBenchError(f"{dataset}: no predictions to score")
  metric_name, metric = DATASET2METRIC[base]
  samples = []
  for prediction, ground_truths, classes in zip(predictions, answers, all_classes, strict=True):
    if base in FIRST_LINE_DATASETS:
      prediction = prediction.lstrip("\n").split("\n")[0]
    score = 0.0
    for ground_truth in ground_truths:
      score = max(score, metric(prediction, ground_truth, all_classes=classes, segment=segment))
    samples.append(float(score))
  out = dict(score=round(100 * float(np.mean(samples)), 2), samples=samples, metric=metric_name)
  if is_e:
    if lengths is None or len(lengths) != len(samples):
      raise LongBenchError(f"{dataset}: LongBench-E scoring needs one length per sample")
    groups = {key: [] for key in _E_BUCKETS}
    for score, length in zip(samples, lengths, strict=True):
      groups[_bucket(length)].append(score)
    out["buckets"] = {
      key: (round(100 * float(np.mean(v)), 2) if v else None) for key, v in groups.items()
    }
  return out


def _files(path: str, datasets: Sequence[str] | None) -> list[tuple[str, str]]:
  """(dataset name, file) pairs: `<path>/<name>.jsonl`, or `path` itself for one file."""
  if os.path.isfile(path):
    stem = os.path.basename(path).removesuffix(".jsonl")
    names = [stem] if datasets is None else list(datasets)
    if len(names) != 1:
      raise LongBenchError(f"path {path} is one file; name one dataset for it (got {names})")
    resolve_dataset(names[0])
    return [(names[0], path)]
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"LongBench path {path} does not exist; give a folder of <dataset>.jsonl files "
      "(LongBench's data.zip) or one .jsonl file"
    )
  if datasets is None:
    names = [*DATASETS, *(f"{d}_e" for d in LONGBENCH_E_DATASETS)]
    names = [n for n in names if os.path.isfile(os.path.join(path, f"{n}.jsonl"))]
    if not names:
      raise FileNotFoundError(f"{path} holds no <dataset>.jsonl file; known: {_known_names()}")
    return [(n, os.path.join(path, f"{n}.jsonl")) for n in names]
  pairs = []
  for name in datasets:
    resolve_dataset(name)
    file = os.path.join(path, f"{name}.jsonl")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"dataset {name}: {file} does not exist")
    pairs.append((name, file))
  return pairs


def _cut_at_eos(tokens: Sequence[int], eos_id: int | None) -> list[int]:
  tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
  if eos_id is not None and eos_id in tokens:
    return tokens[: tokens.index(eos_id)]
  return tokens


def evaluate_longbench(
  generate_fn: GenerateFn,
  tokenizer,
  path: str | os.PathLike,
  datasets: Sequence[str] | None = None,
  max_len: int = 3500,
  *,
  limit: int | None = None,
  batch_size: int = 1,
  add_bos: bool = True,
  build_chat: Callable[[str], str] | None = None,
  zh_segmenter: str | Callable[[str], list[str]] = "auto",
  keep_records: bool = True,
  log: Callable[[str], None] | None = print,
  progress_every_s: float = 30.0,
) -> dict:
  """Generates and scores LongBench datasets read from local JSONL files.

  Args:
    generate_fn: `generate_fn(prompts, max_new_tokens) -> continuations`: `prompts` is a
      list of token-id lists (lengths may differ); it returns, per prompt, the new tokens
      only (greedy, as LongBench). Tokens after the tokenizer's `eos_id` are dropped.
    tokenizer: `encode(str) -> ids` (no special tokens), `decode(ids,
      skip_special_tokens=True) -> str`, optional `bos_id` and `eos_id` (lcjax tokenizers).
    path: a folder of `<dataset>.jsonl` files (LongBench's data.zip layout; LongBench-E
      files are `<dataset>_e.jsonl`), or one such file.
    datasets: names such as "hotpotqa" or "qasper_e"; None: every known file in `path`.
    max_len: prompt budget in tokens (pred.py `max_length`, e.g. 3500 for a 4K model);
      longer prompts keep their first and last int(max_len/2) tokens.
    limit: score only the first `limit` rows of each file.
    batch_size: prompts per `generate_fn` call (sorted by length within a dataset).
    add_bos: prepend `tokenizer.bos_id`, counted in `max_len` (as pred.py's HF tokenizer).
    build_chat: optional chat template `text -> text` (pred.py `build_chat`), skipped for
      NO_CHAT_DATASETS; None scores the raw prompt (base models).
    zh_segmenter: Chinese word segmenter for multifieldqa_zh, dureader, vcsum: "auto"
      (jieba if installed, else characters), "jieba", "char" or a callable.
    keep_records: keep per-sample records (as pred.py's output lines, plus the score).
    log: progress lines ("longbench [i/n] name: k/N samples, x samples/s"); None: quiet.
    progress_every_s: seconds between progress lines within a dataset (0: every batch).

  Returns:
    dict(datasets={name: dict(score, n, metric, max_new_tokens, truncated, seconds,
    samples_per_s, [buckets for LongBench-E], [records])}, average (mean of the scores),
    categories (mean per LongBench category over the datasets run), max_len,
    zh_segmenter (label, or None when no dataset needs it)).
  """
  if batch_size < 1:
    raise LongBenchError(f"batch_size={batch_size} must be a positive integer")
  if limit is not None and limit < 1:
    raise LongBenchError(f"limit={limit} must be a positive integer or None")
  truncate_middle([], max_len)  # validates max_len before any file is read
  pairs = _files(os.fspath(path), datasets)
  loaded = [(name, read_longbench_jsonl(file, name)[:limit]) for name, file in pairs]
  bases = [resolve_dataset(name)[0] for name, _ in loaded]
  segment, segment_label = None, None
  if any(b in _ZH_SEGMENTED for b in bases):
    segment, segment_label = tm.zh_segmenter(zh_segmenter)
    if log is not None:
      log(f"longbench: Chinese metrics segment with {segment_label}")
  eos_id = getattr(tokenizer, "eos_id", None)
  results = {}
  for index, ((name, rows), base) in enumerate(zip(loaded, bases, strict=True), start=1):
    max_new = DATASET2MAXLEN[base]
    encoded = [
      encode_longbench_prompt(tokenizer, name, row, max_len, add_bos=add_bos, build_chat=build_chat)
      for row in rows
    ]
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i][0]))
    outputs: list[str | None] = [None] * len(rows)
    start = last_log = time.perf_counter()
    done = 0
    for b in range(0, len(order), batch_size):
      chunk = order[b : b + batch_size]
      new = list(generate_fn([encoded[i][0] for i in chunk], max_new))
      if len(new) != len(chunk):
        raise LongBenchError(
          f"generate_fn returned {len(new)} continuations for {len(chunk)} prompts; "
          "return one token list per prompt"
        )
      for i, tokens in zip(chunk, new, strict=True):
        outputs[i] = tokenizer.decode(_cut_at_eos(tokens, eos_id), skip_special_tokens=True)
      done += len(chunk)
      now = time.perf_counter()
      if log is not None and (now - last_log >= progress_every_s or done == len(rows)):
        rate = done / max(now - start, 1e-9)
        log(
          f"longbench [{index}/{len(loaded)}] {name}: {done}/{len(rows)} samples, "
          f"{rate:.2f} samples/s"
        )
        last_log = now
    seconds = time.perf_counter() - start
    scored = score_predictions(
      name,
      outputs,
      [r["answers"] for r in rows],
      [r["all_classes"] for r in rows],
      [r["length"] for r in rows],
      segment=segment,
    )
    entry = dict(
      score=scored["score"],
      n=len(rows),
      metric=scored["metric"],
      max_new_tokens=max_new,
      truncated=sum(t for _, t in encoded),
      seconds=round(seconds, 3),
      samples_per_s=round(len(rows) / max(seconds, 1e-9), 3),
    )
    if "buckets" in scored:
      entry["buckets"] = scored["buckets"]
    if keep_records:
      entry["records"] = [
        dict(
          pred=outputs[i],
          answers=row["answers"],
          all_classes=row["all_classes"],
          length=row["length"],
          prompt_tokens=len(encoded[i][0]),
          score=scored["samples"][i],
        )
        for i, row in enumerate(rows)
      ]
    results[name] = entry
    if log is not None:
      log(f"longbench [{index}/{len(loaded)}] {name}: {scored['metric']} {scored['score']:.2f}")
  scores = [r["score"] for r in results.values()]
  categories = {}
  for category, members in CATEGORIES.items():
    got = [r["score"] for n, r in results.items() if resolve_dataset(n)[0] in members]
    if got:
      categories[category] = round(float(np.mean(got)), 2)
  return dict(
    datasets=results,
    average=round(float(np.mean(scores)), 2),
    categories=categories,
    max_len=int(max_len),
    zh_segmenter=segment_label,
  )


def longbench_markdown(result: dict) -> str:
  """A table of `evaluate_longbench`'s result: dataset, metric, n, score (and E buckets)."""
  lines = [
    "| dataset | metric | n | truncated | score | 0-4k | 4-8k | 8k+ |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  fmt = lambda v: "" if v is None else f"{v:.2f}"
  for name, r in result["datasets"].items():
    buckets = r.get("buckets", {})
    cells = " | ".join(fmt(buckets.get(k)) for k in _E_BUCKETS)
    lines.append(
      f"| {name} | {r['metric']} | {r['n']} | {r['truncated']} | {r['score']:.2f} | {cells} |"
    )
  lines.append(f"| **average** | | | | {result['average']:.2f} | | | |")
  for category, value in result.get("categories", {}).items():
    lines.append(f"| {category} | | | | {value:.2f} | | | |")
  return "\n".join(lines) + "\n"


# --- scripts/eval.py: config -------------------------------------------------------------


def chat_builder(name: str) -> Callable[[str], str] | None:
  """`build_chat` of a chat template name: a key of RULER's `MODEL_TEMPLATES` (NVIDIA/RULER
  `scripts/data/template.py`, shared with `eval.ruler.chat_template`); "base": None (raw).

  LongBench's own pred.py `build_chat` has one format per model family; its Llama-2 one,
  "[INST]{prompt}[/INST]", is RULER's "meta-chat" without the two spaces.
  """
  if name not in MODEL_TEMPLATES:
    raise LongBenchError(
      f"chat template {name!r} is unknown; choose one of {', '.join(MODEL_TEMPLATES)}"
    )
  if name == "base":
    return None
  template = MODEL_TEMPLATES[name]
  return lambda text: template.format(task_template=text)


def validate_longbench_config(ev) -> None:
  """Raises ConfigError (one line naming the field) for bad eval.longbench fields.

  Checked only when `eval.tasks` names "longbench": the data path must exist, the dataset
  names must be LongBench's (with a file in the folder), and the sizes must be positive.
  """
  if EVAL_TASK not in tuple(ev.get("tasks") or ()):
    return
  lb = ev.longbench
  if not lb.path:
    raise ConfigError(
      "eval.longbench.path is not set; point it at a folder of LongBench <dataset>.jsonl files "
      "(LongBench's data.zip) or at one such file"
    )
  if not os.path.exists(lb.path):
    raise ConfigError(
      f"eval.longbench.path={lb.path!r} does not exist; point it at a folder of LongBench "
      "<dataset>.jsonl files (LongBench's data.zip) or at one such file"
    )
  try:
    _files(os.fspath(lb.path), tuple(lb.datasets) or None)
  except (LongBenchError, FileNotFoundError) as e:
    raise ConfigError(f"eval.longbench.datasets={tuple(lb.datasets)}: {e}") from None
  checks = [
    (lb.max_len >= 2, f"eval.longbench.max_len={lb.max_len} must be >= 2 (prompt tokens)"),
    (lb.batch_size >= 1, f"eval.longbench.batch_size={lb.batch_size} must be >= 1"),
    (
      lb.limit is None or lb.limit >= 1,
      f"eval.longbench.limit={lb.limit} must be >= 1 (rows per dataset) or None (all)",
    ),
    (
      lb.zh_segmenter in ZH_SEGMENTERS,
      f"eval.longbench.zh_segmenter={lb.zh_segmenter!r} must be one of {', '.join(ZH_SEGMENTERS)}",
    ),
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)
  try:
    chat_builder(lb.chat_template)
  except LongBenchError as e:
    raise ConfigError(f"eval.longbench.chat_template: {e}") from None
