"""RULER's constants, sample record, word lists, haystacks and QA data (NVIDIA/RULER).

Copied verbatim, with the file each comes from: `TASKS` from `scripts/synthetic.yaml`;
`TASK_TEMPLATES` from `scripts/data/synthetic/constants.py`; `MODEL_TEMPLATES` from
`scripts/data/template.py`; `NEEDLE`, `NOISE` and `DEPTHS` from
`scripts/data/synthetic/niah.py`. Key words come from the `wonderwords` package lists, as in
niah.py and common_words_extraction.py. The generators are in `lcjax.eval.ruler_tasks`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
import random

import numpy as np

from lcjax.data.readers import validation_mask
from lcjax.data.stdlib_corpus import stdlib_files, stdlib_root

__all__ = [
  "DEPTHS",
  "MODEL_TEMPLATES",
  "NEEDLE",
  "NOISE",
  "TASKS",
  "TASK_TEMPLATES",
  "QAData",
  "RulerError",
  "RulerSample",
  "TaskTooLong",
  "TaskTooShort",
  "haystack_lines",
  "load_qa_jsonl",
]


class RulerError(ValueError):
  """Bad RULER input (task, length, data file); the message is one line naming the fix."""


class TaskTooShort(RulerError):
  """The template, needles and answer budget alone exceed the requested length."""


class TaskTooLong(RulerError):
  """The length needs more distinct words than the shipped word lists hold (cwe)."""


def _niah_args(haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> dict:
  return dict(
    type_haystack=haystack,
    type_needle_k=key,
    type_needle_v=value,
    num_needle_k=k,
    num_needle_v=v,
    num_needle_q=q,
  )


# scripts/synthetic.yaml (qa_2, HotpotQA, is not generated: qa takes one local SQuAD-style file).
TASKS: dict[str, tuple[str, dict]] = {
  "niah_single_1": ("niah", _niah_args("noise", "words", "numbers")),
  "niah_single_2": ("niah", _niah_args("essay", "words", "numbers")),
  "niah_single_3": ("niah", _niah_args("essay", "words", "uuids")),
  "niah_multikey_1": ("niah", _niah_args("essay", "words", "numbers", k=4)),
  "niah_multikey_2": ("niah", _niah_args("needle", "words", "numbers")),
  "niah_multikey_3": ("niah", _niah_args("needle", "uuids", "uuids")),
  "niah_multivalue": ("niah", _niah_args("essay", "words", "numbers", v=4)),
  "niah_multiquery": ("niah", _niah_args("essay", "words", "numbers", q=4)),
  "vt": ("variable_tracking", dict(type_haystack="noise", num_chains=1, num_hops=4)),
  "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
  "fwe": ("freq_words_extraction", dict(alpha=2.0)),
  "qa": ("qa", dict(dataset="squad")),
}

# scripts/data/synthetic/constants.py
TASK_TEMPLATES: dict[str, dict] = {
  "niah": {
    "tokens_to_generate": 128,
    "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?",  # noqa: E501
    "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",  # noqa: E501
  },
  "variable_tracking": {
    "tokens_to_generate": 30,
    "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",  # noqa: E501
    "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: ",  # noqa: E501
  },
  "common_words_extraction": {
    "tokens_to_generate": 120,
    "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",  # noqa: E501
    "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
  },
  "freq_words_extraction": {
    "tokens_to_generate": 50,
    "template": "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",  # noqa: E501
    "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",  # noqa: E501
  },
  "qa": {
    "tokens_to_generate": 32,
    "template": "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",  # noqa: E501
    "answer_prefix": " Answer:",
  },
}

# scripts/data/template.py
MODEL_TEMPLATES: dict[str, str] = {
  "base": "{task_template}",
  "meta-chat": "[INST] {task_template} [/INST]",
  "vicuna-chat": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: {task_template} ASSISTANT:",  # noqa: E501
  "lwm-chat": "You are a helpful assistant. USER: {task_template} ASSISTANT: ",
  "command-r-chat": "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>{task_template}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",  # noqa: E501
  "chatglm-chat": "[gMASK]sop<|user|> \n {task_template}<|assistant|> \n ",
  "RWKV": "User: hi\n\nAssistant: Hi. I am your assistant and I will provide expert full response in full details. Please feel free to ask any question and I will always answer it\n\nUser: {task_template}\n\nAssistant:",  # noqa: E501
  "Phi3": "<|user|>\n{task_template}<|end|>\n<|assistant|>\n",
  "meta-llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task_template}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",  # noqa: E501
  "jamba": "<|startoftext|><|bom|><|system|> <|eom|><|bom|><|user|> {task_template}<|eom|><|bom|><|assistant|>",  # noqa: E501
  "nemotron5-instruct": "<SPECIAL_10>System\n\n<SPECIAL_11>User\n{task_template}\n<SPECIAL_11>Assistant\n",  # noqa: E501
}

# scripts/data/synthetic/niah.py
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]


@dataclasses.dataclass
class RulerSample:
  """One prompt. `prompt` is everything the model reads (input + answer prefix).

  `answers`: RULER's references (`outputs`); `gold`: the continuations teacher-forced scoring
  scores (one; for qa one per distinct reference); `gold_items`: per continuation, the answers it
  contains in order (the items string_match_all averages over); `depths`: percent depth of the
  needle holding each answer (empty for cwe/fwe); `needle_positions`: token index in
  `prompt_ids` of each answer's first occurrence (RULER's `token_position_answer`).
  """

  task: str
  length: int
  index: int
  prompt: str
  answer_prefix: str
  answers: list[str]
  gold: list[str]
  gold_items: list[list[str]]
  prompt_ids: np.ndarray
  depths: list[float]
  needle_positions: list[int]
  haystack_units: int
  tokens_to_generate: int
  haystack: str

  @property
  def depth(self) -> float | None:
    """The depth of the first answer's needle (the heatmap row), None without needles."""
    return self.depths[0] if self.depths else None

  def record(self) -> dict:
    """A JSON-able summary (no prompt text)."""
    return dict(
      task=self.task,
      length=self.length,
      index=self.index,
      prompt_tokens=int(self.prompt_ids.size),
      answers=list(self.answers),
      depths=list(self.depths),
      needle_positions=list(self.needle_positions),
      haystack_units=self.haystack_units,
      haystack=self.haystack,
    )


# --- word lists, haystacks, QA data ------------------------------------------------------------


@functools.cache
def _wonderwords(name: str) -> tuple[str, ...]:
  """A `wonderwords` asset list, read as RULER's `_get_words_from_text_file` reads it."""
  try:
    text = importlib.resources.files("wonderwords.assets").joinpath(name).read_text()
  except ModuleNotFoundError:
    raise RulerError(
      "RULER's key and word lists come from the wonderwords package; pip install wonderwords"
    ) from None
  return tuple(line.rstrip() for line in text.splitlines(keepends=True))


@functools.cache
def _key_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Sorted unique adjectives and nouns: keys are f"{adj}-{noun}" (niah.py `words`)."""
  return tuple(sorted(set(_wonderwords("adjectivelist.txt")))), tuple(
    sorted(set(_wonderwords("nounlist.txt")))
  )


@functools.cache
def _cwe_words(seed: int) -> tuple[str, ...]:
  """common_words_extraction.py: sorted(set(nouns + adjs + verbs)), Random(seed)-shuffled."""
  words = sorted(
    set(
      _wonderwords("nounlist.txt")
      + _wonderwords("adjectivelist.txt")
      + _wonderwords("verblist.txt")
    )
  )
  random.Random(seed).shuffle(words)
  return tuple(words)


@functools.lru_cache(maxsize=8)
def haystack_lines(haystack: str = "code") -> tuple[tuple[str, ...], str]:
  """(lines, label) of the essay replacement: held-out corpus files or a user text folder.

  "code": the validation split (2%, `lcjax.data.readers.validation_mask`) of the embedded
  standard-library corpus, files in sorted order, lines without their newline. A folder: its
  `.txt`/`.md` files (recursively, sorted), read as UTF-8.
  """
  if haystack == "code":
    root = stdlib_root()
    paths = [p for p in stdlib_files(root) if validation_mask(p, np.zeros(1, np.int64), 0.02)[0]]
    label = (
      f"code: {len(paths)} held-out files of the Python standard library (lcjax.data.stdlib_corpus)"  # noqa: E501
    )
    files = [os.path.join(root, p) for p in paths]
  else:
    if not os.path.isdir(haystack):
      raise RulerError(
        f"eval.ruler.haystack={haystack!r} is neither 'code' nor a folder; point it at a folder "
        "of .txt/.md files"
      )
    files = sorted(
      os.path.join(d, n)
      for d, _, names in os.walk(haystack)
      for n in names
      if n.endswith((".txt", ".md"))
    )
    if not files:
      raise RulerError(f"eval.ruler.haystack={haystack!r} holds no .txt or .md files; add some")
    label = f"text: {len(files)} files of {haystack}"
  lines: list[str] = []
  for path in files:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8", errors="replace")
    lines += text.splitlines()
  if not any(line.strip() for line in lines):
    raise RulerError(f"the haystack {haystack!r} has no text; use another eval.ruler.haystack")
  return tuple(lines), label


@dataclasses.dataclass(frozen=True)
class QAData:
  """qa.py `read_squad`: QAS (query, outputs, context doc, same-article docs) and sorted DOCS."""

  qas: tuple[dict, ...]
  docs: tuple[str, ...]
  path: str


@functools.lru_cache(maxsize=4)
def load_qa_jsonl(path: str) -> QAData:
  """Reads a SQuAD-style JSONL file: one question a line.

  Fields: `context` (str), `question` (str), `answers` (a list of str, or SQuAD's
  {"text": [...], ...}); optional `title` (paragraphs sharing it are the same article, which
  RULER adds first as distractors) and `is_impossible` (true rows are skipped, as RULER does).
  """
  if not os.path.isfile(path):
    raise RulerError(f"eval.ruler.qa_path={path!r} is not a file; point it at a SQuAD-style JSONL")
  rows = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise RulerError(
          f"{where}: not a JSON object ({e.msg}); write one JSON object a line"
        ) from None  # noqa: E501
      if not isinstance(row, dict):
        raise RulerError(f"{where}: not a JSON object; write one JSON object a line")
      answers = row.get("answers")
      if isinstance(answers, dict):
        answers = answers.get("text")
      if isinstance(answers, str):
        answers = [answers]
      ok = (
        isinstance(row.get("context"), str)
        and isinstance(row.get("question"), str)
        and isinstance(answers, list)
        and all(isinstance(a, str) for a in answers)
      )
      if not ok:
        raise RulerError(
          f"{where}: a qa row needs 'context' (str), 'question' (str) and 'answers' "
          '(list of str or {"text": [...]}); fix the row'
        )
      if row.get("is_impossible") or not answers:
        continue
      rows.append((row.get("title", f"#{line_no}"), row["context"], row["question"], answers))
  if not rows:
    raise RulerError(f"{path} has no answerable questions; add rows with non-empty 'answers'")
  docs = tuple(sorted({r[1] for r in rows}))
  doc_id = {d: i for i, d in enumerate(docs)}
  by_title: dict[str, list[int]] = {}
  for title, context, _, _ in rows:
    ids = by_title.setdefault(title, [])
    if doc_id[context] not in ids:
      ids.append(doc_id[context])
  qas = tuple(
    dict(
      query=question,
      outputs=list(answers),
      context=[doc_id[context]],
      more_context=[i for i in by_title[title] if i != doc_id[context]],
    )
    for title, context, question, answers in rows
  )
  return QAData(qas, docs, path)
