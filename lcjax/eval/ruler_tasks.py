"""RULER task generators (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv:2404.06654; official code NVIDIA/RULER).

Every constant below is copied from the RULER repository, file by file:
- `TASKS` (task -> generator and its arguments): `scripts/synthetic.yaml`.
- `TASK_TEMPLATES` (template, answer prefix, tokens to generate):
  `scripts/data/synthetic/constants.py`; `MODEL_TEMPLATES`: `scripts/data/template.py`.
  As in `scripts/data/prepare.py`, the prompt is
  `MODEL_TEMPLATES[chat].format(task_template=template) + answer_prefix`.
- `NEEDLE`, `NOISE`, `DEPTHS` (`np.round(np.linspace(0, 100, 40))`), the key/value kinds
  (7-digit numbers, adjective-noun words from the `wonderwords` lists, uuid4s) and the
  singular rewrite of the template when one value is asked for: `scripts/data/synthetic/niah.py`.
- The variable-tracking chains, the in-context example built under a 500-token budget and
  `randomize_icl`: `scripts/data/synthetic/variable_tracking.py`.
- The numbered word lists with one few-shot example (10 common words x30 among others x3,
  or x6/x1 below 4K): `scripts/data/synthetic/common_words_extraction.py`.
- The Zipf(alpha=2) coded text over `vocab = (length - 50) // 50` random 6-letter words, the
  top word replaced by '...', answer = ranks 2-4: `scripts/data/synthetic/freq_words_extraction.py`.
- "Document {i}:\\n{document}" paragraphs around the gold one (same-article paragraphs first,
  then random others, then `random.Random(seed).shuffle`): `scripts/data/synthetic/qa.py`.

Budget search (`_largest_fitting`): the largest haystack size n such that tokens(prompt) +
tokens_to_generate <= length, as RULER's binary search finds it (niah.py `generate_samples`),
found per sample (RULER searches once, then steps down by `incremental` when a sample
overflows). Every prompt satisfies fits(n) and not fits(n + 1): it is within one haystack unit
of the target. The prompt counts the tokenizer's BOS, which the model reads.

Declared deviations (each sample's `haystack` field names its haystack):
- RULER's Paul Graham essays (niah_single_2/3, multikey_1, multivalue, multiquery) are replaced
  by lines of held-out files of the embedded corpus (`haystack="code"`: the validation split of
  `lcjax.data.stdlib_corpus`) or of a user text folder (`haystack=PATH`); a haystack unit is a
  line (RULER: a word, and needles go between nltk sentences), so needles go between lines.
- Random draws use one `random.Random` per sample, seeded by (seed, task, length, index), so
  samples do not depend on each other or on the search; RULER draws from one global stream.
  Keys are a uniform adjective and noun joined by '-' (RULER: a uniform choice over the sorted
  set of all 6.2M such pairs, which is the same distribution up to rare duplicate pairs).
- Noise and needle haystacks: a needle's line index is floor(u * n) for a uniform u drawn once
  per sample (RULER: random.sample(range(n), k), the same law except that two needles may share
  an index here), so one draw serves every haystack size n the search tries.
- fwe: RULER searches its Zipf word mass linearly in steps of length // 32 words; lcjax uses the
  search above (unit: one word of Zipf mass), so its prompts are not up to 20% short.
- `depths` (optional, NIAH): the first answer's needle at a grid depth, the gkamradt/LWM
  convention for heatmaps; RULER draws every needle's depth at random (the default here).
- `gold` (lcjax's, for teacher-forced scores only): NIAH " v." or " v1, v2, v3, and v4."
  (the query's joiner); vt and cwe the format of their in-context examples; fwe cwe's.
- cwe beyond the 8,166 wonderwords raises (RULER falls back to english_words.json, a 8.5 MB
  git-lfs file it downloads); this happens only past ~100K tokens of a BPE tokenizer.
- qa (RULER's qa_1, SQuAD) reads a local SQuAD-style JSONL file instead of squad.json.
"""

from __future__ import annotations

import functools
import random
import re
import string
import sys
import uuid
from collections.abc import Sequence

import numpy as np
from scipy.special import zeta

from lcjax.data.tokenizers import ByteTokenizer
from lcjax.eval.ruler_data import (
  DEPTHS,
  MODEL_TEMPLATES,
  NEEDLE,
  NOISE,
  TASK_TEMPLATES,
  TASKS,
  QAData,
  RulerError,
  RulerSample,
  TaskTooLong,
  TaskTooShort,
  _cwe_words,
  _key_parts,
  haystack_lines,
  load_qa_jsonl,
)

__all__ = ["make_samples", "task_group"]


# --- generators: each draws a sample's random content once and renders any haystack size ------


def _number(rng: random.Random) -> str:
  return str(rng.randint(10**6, 10**7 - 1))  # niah.py generate_random_number(num_digits=7)


def _random(rng: random.Random, kind: str) -> str:
  """niah.py `generate_random`: 7-digit number, adjective-noun word, or uuid4."""
  if kind == "numbers":
    return _number(rng)
  if kind == "words":
    adjs, nouns = _key_parts()
    return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
  if kind == "uuids":
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
  raise RulerError(f"needle kind {kind!r} is unknown")


def _full_template(group: str, chat: str) -> str:
  """prepare.py: the model template around the task template, then the answer prefix."""
  if chat not in MODEL_TEMPLATES:
    raise RulerError(
      f"eval.ruler.chat_template={chat!r} is unknown; choose one of {', '.join(MODEL_TEMPLATES)}"
    )
  t = TASK_TEMPLATES[group]
  return MODEL_TEMPLATES[chat].format(task_template=t["template"]) + t["answer_prefix"]


def _split_prefix(text: str, group: str) -> tuple[str, str]:
  """(input, answer_prefix): RULER finds the prefix by the rfind of its first 10 characters."""
  i = text.rfind(TASK_TEMPLATES[group]["answer_prefix"][:10])
  return text[:i], text[i:]


def _insert_by_index(units: list[str], items: Sequence[str], fractions: Sequence[float]):
  """niah.py (noise/needle haystacks): insert at sorted-descending indexes; returns depths %."""
  num = len(units)
  indexes = [min(num, int(f * num)) for f in fractions]
  out = list(units)
  for index, item in sorted(zip(indexes, items, strict=True), key=lambda p: -p[0]):
    out.insert(index, item)
  return out, [100.0 * i / max(num, 1) for i in indexes]


def _insert_by_depth(lines: list[str], items: Sequence[str], depths: Sequence[int]):
  """niah.py (essay haystack): item k goes before line int(len(lines) * depth_k / 100)."""
  positions = [int(len(lines) * d / 100) for d in depths]
  order = sorted(range(len(items)), key=lambda k: (positions[k], k))
  out, last = [], 0
  for k in order:
    out += lines[last : positions[k]]
    out.append(items[k])
    last = positions[k]
  return out + lines[last:]


def _niah(rng, args, *, seed, chat, length, lines, depth):
  """scripts/data/synthetic/niah.py `generate_input_output` for one sample."""
  num_k = max(args["num_needle_k"], args["num_needle_q"])
  kv, kk, haystack = args["type_needle_v"], args["type_needle_k"], args["type_haystack"]
  keys, values, needles, owner = [], [], [], []
  for k in range(num_k):
    keys.append(_random(rng, kk))
    values.append([])
    for j in range(args["num_needle_v"]):
      values[-1].append(_random(rng, kv))
      needles.append(NEEDLE.format(type_needle_v=kv, key=keys[-1], value=values[-1][-1]))
      owner.append((k, j))
  order = list(range(len(needles)))
  random.Random(seed).shuffle(order)  # niah.py: random.Random(args.random_seed).shuffle(needles)
  needles, owner = [needles[i] for i in order], [owner[i] for i in order]
  indices = rng.sample(range(num_k), args["num_needle_q"])
  queries = [keys[i] for i in indices]
  answers = [a for i in indices for a in values[i]]
  answer_needles = [owner.index((i, j)) for i in indices for j in range(len(values[i]))]
  first = answer_needles[0]
  query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
  template, type_v = _full_template("niah", chat), kv
  if args["num_needle_q"] * args["num_needle_v"] == 1:
    template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
    template, type_v = template.replace("answers", "answer"), kv[:-1]  # remove "s"
  if haystack == "essay":
    if depth is None:  # sorted(random.sample(DEPTHS, len(needles))), in needle order
      needle_depths = sorted(rng.sample(DEPTHS, len(needles)))
    else:
      needle_depths = rng.sample([d for d in DEPTHS if d != depth], len(needles) - 1)
      needle_depths.insert(first, depth)
  else:  # random.sample(range(num_haystack), ...) as fractions of any haystack size
    fractions = [rng.random() for _ in needles]
    if depth is not None:
      fractions[first] = depth / 100
  distractor_rng = random.Random(rng.getrandbits(64))
  distractors: list[str] = []

  def render(num: int):
    if haystack == "essay":
      units = [lines[i % len(lines)] for i in range(num)]
      context = "\n".join(_insert_by_depth(units, needles, needle_depths))
      depths = [float(d) for d in needle_depths]
    else:
      if haystack == "noise":
        units = [NOISE] * num
      else:  # type_haystack="needle": every line a needle with random key and value
        while len(distractors) < num:
          key, value = _random(distractor_rng, kk), _random(distractor_rng, kv)
          distractors.append(NEEDLE.format(type_needle_v=kv, key=key, value=value))
        units = distractors[:num]
      sentences, depths = _insert_by_index(units, needles, fractions)
      context = "\n".join(sentences)
    text = template.format(type_needle_v=type_v, context=context, query=query)
    return text, [depths[k] for k in answer_needles], 0

  said = answers[0] if len(answers) == 1 else ", ".join(answers[:-1]) + ", and " + answers[-1]
  incremental = 500 if haystack == "essay" else (25 if length >= 4096 else 5)
  return render, answers, [f" {said}."], [answers], incremental


def _vt_chains(rng, num_chains, num_hops, is_icl):
  """variable_tracking.py `generate_chains`."""
  k = 5 if not is_icl else 3
  num_hops = num_hops if not is_icl else min(10, num_hops)
  total = (num_hops + 1) * num_chains
  names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range(total)]
  while len(set(names)) < total:
    names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
  vars_ret, chains = [], []
  for i in range(0, len(names), num_hops + 1):
    this = names[i : i + num_hops + 1]
    vars_ret.append(this)
    value = "12345" if is_icl else str(rng.randint(10000, 99998))  # np.random.randint(10000, 99999)
    chain = [f"VAR {this[0]} = {value}"]
    chain += [f"VAR {this[j + 1]} = VAR {this[j]} " for j in range(num_hops)]
    chains.append(chain)
  return vars_ret, chains


def _vt_render(chains, fractions, num, template, num_hops):
  """variable_tracking.py `generate_input_output`, noise haystack; chain order is kept."""
  sentences = [NOISE] * num
  depths = []
  for chain, chain_fractions in zip(chains, fractions, strict=True):
    positions = sorted(min(len(sentences), int(f * len(sentences))) for f in chain_fractions)
    for j, pos in enumerate(positions):
      sentences.insert(pos + j, chain[j])
      depths.append(100.0 * pos / max(num, 1))
  context = "\n".join(sentences).replace(". \n", ".\n")
  value = chains[0][0].split("=")[-1].strip()
  return template.format(context=context, query=value, num_v=num_hops + 1), depths


@functools.lru_cache(maxsize=64)
def _vt_icl(tokenizer, num_chains: int, num_hops: int, seed: int, length: int) -> str:
  """variable_tracking.py `main`: one in-context example within 500 tokens, outputs appended.

  As there, the example uses 3-letter names, the value 12345 and the task template without
  the model template; `randomize_icl` renames it per sample.
  """
  rng = random.Random(f"ruler-icl:{seed}:{length}")
  vars_, chains = _vt_chains(rng, num_chains, num_hops, True)
  fractions = [[rng.random() for _ in c] for c in chains]
  t = TASK_TEMPLATES["variable_tracking"]
  hops = min(10, num_hops)
  template = t["template"] + t["answer_prefix"]
  render = lambda n: _vt_render(chains, fractions, n, template, hops)[0]  # noqa: E731
  n = _largest_fitting(lambda n: _encode(tokenizer, render(n)).size, 500, 5, start=None) or 1
  return render(n) + " " + " ".join(vars_[0]) + "\n"


def _vt(rng, args, *, chat, length, icl):
  num_hops = args["num_hops"]
  vars_, chains = _vt_chains(rng, args["num_chains"], num_hops, False)
  fractions = [[rng.random() for _ in c] for c in chains]
  example = icl  # randomize_icl: new names for the example's variables and a new value
  for item in example.strip().split()[-num_hops - 1 :]:
    example = example.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
  example = example.replace("12345", str(rng.randint(10000, 99998)))
  template = _full_template("variable_tracking", chat)
  cut = TASK_TEMPLATES["variable_tracking"]["template"][:20]

  def render(num: int):
    text, depths = _vt_render(chains, fractions, num, template, num_hops)
    at = text.index(cut)  # the example goes between the model template and the input
    return text[:at] + example + "\n" + text[at:], depths, at + len(example) + 1

  answers = list(vars_[0])
  return render, answers, [" " + " ".join(answers)], [answers], 10 if length >= 4096 else 5


def _cwe_example(rng, words, num_words, common_repeats, uncommon_repeats, common_nums, seed):
  """common_words_extraction.py `get_example`."""
  if num_words > len(words):
    raise TaskTooLong(
      f"cwe needs {num_words} distinct words at this length, more than the {len(words)} "
      "wonderwords (RULER falls back to its english_words.json); evaluate cwe at shorter lengths"
    )
  full = rng.sample(words, num_words)
  common, uncommon = full[:common_nums], full[common_nums:]
  word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
  random.Random(seed).shuffle(word_list)
  return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list)), common


def _numbered(words: Sequence[str]) -> str:
  return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe(rng, args, *, seed, chat, length):
  """common_words_extraction.py `generate_input_output` (one few-shot example)."""
  words = _cwe_words(seed)
  num_cw = args["num_cw"]
  template = _full_template("common_words_extraction", chat)
  small = length < 4096
  shot_words, shot_reps = (20, (3, 1)) if small else (40, (10, 3))
  shot_ctx, shot_ans = _cwe_example(rng, words, shot_words, *shot_reps, num_cw, seed)
  shot = template.format(num_cw=num_cw, context=shot_ctx, query="") + " " + _numbered(shot_ans)
  perm = rng.sample(words, len(words))  # random.sample(words, num_words) for every num_words
  reps = (6, 1) if small else (args["freq_cw"], args["freq_ucw"])

  def render(num: int):
    if num > len(words):
      _cwe_example(rng, words, num, 1, 1, num_cw, seed)  # raises TaskTooLong
    word_list = perm[:num_cw] * reps[0] + perm[num_cw:num] * reps[1]
    random.Random(seed).shuffle(word_list)
    text = shot + "\n" + template.format(num_cw=num_cw, context=_numbered(word_list), query="")
    return text, [], len(shot) + 1

  answers = perm[:num_cw]
  return render, answers, [" " + _numbered(answers)], [answers], 10


def _fwe(rng, args, *, seed, chat, length, tokens_to_generate):
  """freq_words_extraction.py `generate_input_output` (coded_wordlen 6, vocab (L - gen) // 50)."""
  vocab_size = max(4, (length - tokens_to_generate) // 50)
  vocab = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(vocab_size)]
  while len(set(vocab)) < vocab_size:
    vocab.append("".join(rng.choices(string.ascii_lowercase, k=6)))
  vocab = sorted(set(vocab))
  random.Random(seed).shuffle(vocab)
  vocab[0] = "..."  # treat the top ranked as noise
  alpha = args["alpha"]
  weight_K = np.arange(1, len(vocab) + 1, dtype=np.float64) ** -alpha / zeta(alpha)
  template = _full_template("freq_words_extraction", chat)

  def render(num: int):
    counts_K = (num * weight_K).astype(int)
    sampled = [w for w, c in zip(vocab, counts_K, strict=True) for _ in range(c)]
    random.Random(seed).shuffle(sampled)
    return template.format(context=" ".join(sampled), query=""), [], 0

  answers = vocab[1:4]
  return render, answers, [" " + _numbered(answers)], [answers], 10


def _qa(rng, *, seed, chat, index, qa: QAData):
  """qa.py `generate_input_output` (DOCUMENT_PROMPT "Document {i}:\\n{document}")."""
  item = qa.qas[index % len(qa.qas)]
  curr, more, docs = item["context"], item["more_context"], qa.docs
  more_perm = rng.sample(more, len(more))
  rest = [i for i in range(len(docs)) if i not in curr + more]
  rest_perm = rng.sample(rest, len(rest))
  template = _full_template("qa", chat)

  def render(num: int):
    if num < len(docs):
      if num - len(curr) > len(more):
        ids = curr + more + rest_perm[: max(0, num - len(curr) - len(more))]
      else:
        ids = curr + more_perm[: num - len(curr)]
    else:  # repeat DOCS as many times as needed and slice to num_docs
      ids = [i % len(docs) for i in range(num)]
    random.Random(seed).shuffle(ids)
    at = ids.index(curr[0]) if curr[0] in ids else 0
    context = "\n\n".join(f"Document {i + 1}:\n{docs[d]}" for i, d in enumerate(ids))
    return template.format(context=context, query=item["query"]), [100.0 * at / len(ids)], 0

  answers = list(item["outputs"])
  golds = list(dict.fromkeys(" " + a for a in answers))
  return render, answers, golds, [[g[1:]] for g in golds], 10


# --- budget search and sample assembly ----------------------------------------------------------


def _largest_fitting(count, budget: int, incremental: int, *, start: int | None) -> int | None:
  """The haystack size n >= 1 with count(n) <= budget < count(n + 1), or None if count(1) > budget.

  RULER (niah.py `generate_samples`) bisects between `incremental` units and 3x the size that
  `incremental` units extrapolate to. Encoding a 16K-token prompt costs milliseconds, so lcjax
  takes secant steps from `start` (the previous sample's size) or from `incremental`, using the
  tokens per unit measured so far, then brackets and bisects: the same largest fitting size
  in ~4 encodings instead of ~12. The result keeps fits(n) and not fits(n + 1).
  """
  fits = lambda n: count(n) <= budget  # noqa: E731
  if not fits(1):
    return None
  n, base = max(1, start or incremental), count(1)
  for _ in range(6):
    per_unit = (count(n) - base) / (n - 1) if n > 1 else 1.0
    guess = min(max(1, n + int((budget - count(n)) // max(per_unit, 1e-9))), 4 * n + 64)
    if guess == n:
      break
    n = guess
  if fits(n):
    lo, step = n, 1
    while fits(lo + step):
      lo, step = lo + step, 2 * step
      if lo > 10**9:
        raise RulerError("the haystack never fills the length: the tokenizer encodes no text")
    hi = lo + step
  else:
    hi, step = n, 1
    while hi - step > 1 and not fits(hi - step):
      hi, step = hi - step, 2 * step
    lo = max(1, hi - step)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo


def _encode(tokenizer, text: str) -> np.ndarray:
  """BOS (when the tokenizer has one) + tokens of `text`: what the model reads."""
  ids = np.asarray(tokenizer.encode(text), np.int32)
  bos = getattr(tokenizer, "bos_id", None)
  return ids if bos is None else np.concatenate([np.array([bos], np.int32), ids])


def _token_index(tokenizer, ids: np.ndarray, text: str, at: int) -> int:
  """The index in `ids` (BOS first when the tokenizer has one) of the token that holds
  character `at` of `text`: RULER's count of the tokens of text[:at], less the last one when
  the prompt's tokens merged it with the answer (a BPE's leading space)."""
  off = 1 if getattr(tokenizer, "bos_id", None) is not None else 0
  if isinstance(tokenizer, ByteTokenizer):
    return off + len(text[:at].encode("utf-8", errors="surrogatepass"))
  k = off + int(np.asarray(tokenizer.encode(text[:at])).size)
  while k > off and len(tokenizer.decode(ids[off:k])) > at:
    k -= 1
  return k


def _positions(tokenizer, text, ids, answers: Sequence[str], start: int, whole_word: bool):
  """Per answer, the token index of its first occurrence at or after `start` (-1: absent).

  RULER's `token_position_answer` counts the tokens of the text before the answer, which is
  one more than this when a BPE merges the space before the answer into its first token.
  """
  out = []
  for a in answers:
    if whole_word:
      m = re.compile(r"(?<![\w-])" + re.escape(a) + r"(?![\w-])").search(text, start)
      at = -1 if m is None else m.start()
    else:
      at = text.find(a, start)
    out.append(-1 if at < 0 else _token_index(tokenizer, ids, text, at))
  return out


def make_samples(
  task: str,
  tokenizer,
  length: int,
  num_samples: int,
  *,
  seed: int = 0,
  haystack: str = "code",
  qa_path: str | None = None,
  chat_template: str = "base",
  tokens_to_generate: int | None = None,
  depths: Sequence[float] | None = None,
  units: int | None = None,
) -> list[RulerSample]:
  """`num_samples` prompts of `task` whose tokens plus the answer budget fit `length`.

  Args:
    task: a key of `TASKS`.
    tokenizer: an lcjax tokenizer (`encode`, `decode`, optional `bos_id`, prepended).
    length: target length in tokens: tokens(prompt) + tokens_to_generate <= length, and one
      more haystack unit would exceed it.
    num_samples: prompts to make; sample i depends only on (seed, task, length, i).
    seed: the random seed (RULER's `random_seed`).
    haystack: "code" or a text folder (replaces RULER's essays; see the module docstring).
    qa_path: the SQuAD-style JSONL file (task "qa" only).
    chat_template: a key of `MODEL_TEMPLATES` ("base": the raw task template).
    tokens_to_generate: the answer budget (None or 0: RULER's per task).
    depths: NIAH only: the first answer's needle goes at depths[i % len(depths)] percent
      instead of RULER's random depth (the gkamradt/LWM grid); the other needles stay random.
    units: use this haystack size instead of searching (tests check that units + 1 overflows).

  Raises:
    RulerError (one line): an unknown task, a missing or malformed qa file, a length too
    short for the template (`TaskTooShort`) or too long for the word lists (`TaskTooLong`).
  """
  if task not in TASKS:
    raise RulerError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
  group, args = TASKS[task]
  gen = tokens_to_generate or TASK_TEMPLATES[group]["tokens_to_generate"]
  lines, label = None, "noise (RULER's repeated sentences)"
  if group == "niah" and args["type_haystack"] == "essay":
    lines, label = haystack_lines(haystack)
  elif group == "niah" and args["type_haystack"] == "needle":
    label = "needles (every line a distractor needle)"
  qa = None
  if group == "qa":
    if not qa_path:
      raise RulerError("task qa needs a SQuAD-style JSONL file: set eval.ruler.qa_path")
    qa = load_qa_jsonl(qa_path)
    label = f"qa documents of {qa_path}"
  elif group in ("common_words_extraction", "freq_words_extraction"):
    label = "word list"
  icl = None
  if group == "variable_tracking":
    icl = _vt_icl(tokenizer, args["num_chains"], args["num_hops"], seed, length)
  samples, previous = [], None
  for index in range(num_samples):
    rng = random.Random(f"ruler:{seed}:{task}:{length}:{index}")
    if group == "niah":
      depth = depths[index % len(depths)] if depths else None
      made = _niah(
        rng, args, seed=seed, chat=chat_template, length=length, lines=lines, depth=depth
      )
    elif group == "variable_tracking":
      made = _vt(rng, args, chat=chat_template, length=length, icl=icl)
    elif group == "common_words_extraction":
      made = _cwe(rng, args, seed=seed, chat=chat_template, length=length)
    elif group == "freq_words_extraction":
      made = _fwe(rng, args, seed=seed, chat=chat_template, length=length, tokens_to_generate=gen)
    else:
      made = _qa(rng, seed=seed, chat=chat_template, index=index, qa=qa)
    render, answers, gold, gold_items, incremental = made
    cache: dict[int, tuple] = {}
    too_long: list[TaskTooLong] = []

    def count(n: int, render=render, cache=cache, too_long=too_long) -> int:
      if n not in cache:
        try:
          text, dep, start = render(n)
        except TaskTooLong as e:  # more words than the lists hold: does not fit
          too_long.append(e)
          return sys.maxsize
        cache[n] = (text, dep, start, _encode(tokenizer, text))
      return cache[n][3].size + gen

    n = units if units is not None else _largest_fitting(count, length, incremental, start=previous)
    if n is None:
      raise TaskTooShort(
        f"{task} does not fit length={length}: with one haystack unit its prompt has "
        f"{count(1) - gen} tokens, plus {gen} to generate; evaluate it at a longer length"
      )
    if too_long and count(n + 1) == sys.maxsize:
      raise too_long[-1]
    count(n)
    text, dep, start, ids = cache[n]
    previous = n
    _, prefix = _split_prefix(text, group)
    whole = group in ("common_words_extraction", "freq_words_extraction")
    samples.append(
      RulerSample(
        task=task,
        length=length,
        index=index,
        prompt=text,
        answer_prefix=prefix,
        answers=list(answers),
        gold=list(gold),
        gold_items=[list(g) for g in gold_items],
        prompt_ids=ids,
        depths=list(dep),
        needle_positions=_positions(tokenizer, text, ids, answers, start, whole),
        haystack_units=n,
        tokens_to_generate=gen,
        haystack=label,
      )
    )
  return samples


def task_group(task: str) -> str:
  """RULER's generator of `task`: niah, variable_tracking, common_words_extraction, ..."""
  if task not in TASKS:
    raise RulerError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
  return TASKS[task][0]
