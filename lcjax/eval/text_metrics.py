"""LongBench's answer metrics, transcribed in standard-library Python.

Each function scores one prediction against one ground truth and returns a float in [0, 1],
with LongBench's name and signature (`fn(prediction, ground_truth, **kwargs)`), following
THUDM/LongBench `LongBench/metrics.py` (commit 2e00731) line for line, quirks included
(e.g. `classification_score` removes from the list it iterates over, as the original does).

The two metrics LongBench takes from packages are written here from their sources:

- ROUGE-L (`rouge_score`) is pltrdy's `rouge` 1.0.1 (`Rouge().get_scores([p], [g], avg=True)
  ["rouge-l"]["f"]`; pltrdy/rouge `rouge/rouge.py`, `rouge/rouge_score.py`
  `rouge_l_summary_level`): the summary-level union-LCS of Lin 2004 (ROUGE working note
  v1.3.1, §3.2) with that package's choices — sentences are the pieces between ".",
  words are split on " ", word counts are counts of *distinct* words (`exclusive=True`),
  the union LCS is the number of distinct words in the union of the LCS word sets (one
  LCS per reference/candidate sentence pair, backtracked with the package's tie rule),
  and F = 2PR / (P + R + 1e-8) (beta = 1). Empty inputs score 0, as LongBench's
  `except: return 0.0`.
  Deviation: the package backtracks recursively, so a sentence pair whose backtrack is
  longer than Python's recursion limit (about 1000 steps, e.g. a 1000-word candidate
  sentence) raises RecursionError, which LongBench turns into 0.0; here the LCS is
  backtracked in a loop and such pairs get their true score.
- Code edit similarity (`code_sim_score`) uses fuzzywuzzy 0.18.0 `fuzz.ratio` on its
  pure-Python path (seatgeek/fuzzywuzzy `fuzzywuzzy/fuzz.py`, `utils.py`):
  `int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))`, 100 for equal strings,
  0 when one is empty. (With python-Levenshtein installed fuzzywuzzy switches to
  Levenshtein's ratio; LongBench's requirements.txt does not install it.)

Chinese metrics (`qa_f1_zh_score`, `rouge_zh_score`) segment text with jieba in LongBench.
They take a `segment` callable; `zh_segmenter("auto")` is jieba when it is installed and
otherwise one token per character (a deviation: jieba is not an lcjax dependency), and
says which it chose.
"""

from __future__ import annotations

import difflib
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = [
  "normalize_answer",
  "normalize_zh_answer",
  "f1_score",
  "qa_f1_score",
  "qa_f1_zh_score",
  "rouge_l",
  "rouge_score",
  "rouge_zh_score",
  "classification_score",
  "retrieval_score",
  "retrieval_zh_score",
  "count_score",
  "fuzz_ratio",
  "code_sim_score",
  "char_segment",
  "zh_segmenter",
]

_CN_PUNCTUATION = (
  "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟"
  "〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCTUATION = frozenset(string.punctuation)
_ALL_PUNCTUATION = frozenset(string.punctuation + _CN_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_DIGITS = re.compile(r"\d+")


def normalize_answer(s: str) -> str:
  """Lower case, drop ASCII punctuation, the articles a/an/the and extra whitespace (SQuAD)."""
  s = s.lower()
  s = "".join(ch for ch in s if ch not in _EN_PUNCTUATION)
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
  """Lower case, drop ASCII and Chinese punctuation and all whitespace."""
  s = s.lower()
  s = "".join(ch for ch in s if ch not in _ALL_PUNCTUATION)
  return "".join(s.split())


def f1_score(prediction: Sequence, ground_truth: Sequence, **kwargs) -> float:
  """Token-multiset F1 between two token lists (0 when they share no token)."""
  common = Counter(prediction) & Counter(ground_truth)
  num_same = sum(common.values())
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(prediction)
  recall = 1.0 * num_same / len(ground_truth)
  return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
  """F1 over whitespace tokens after `normalize_answer` (English QA datasets)."""
  return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def char_segment(text: str) -> list[str]:
  """One token per character: the fallback Chinese segmenter when jieba is absent."""
  return list(text)


_ZH_WARNED = False


def zh_segmenter(name: str | Callable[[str], list[str]] = "auto"):
  """(segment, label) for Chinese metrics: "jieba", "char", "auto" or a callable.

  "auto" is jieba (as LongBench) when importable, else `char_segment` with a warning.
  """
  global _ZH_WARNED
  if callable(name):
    return name, getattr(name, "__name__", "custom")
  if name not in ("auto", "jieba", "char"):
    raise ValueError(f"zh_segmenter={name!r} is not one of 'auto', 'jieba', 'char' or a callable")
  if name == "char":
    return char_segment, "char"
  try:
    import jieba
  except ImportError:
    if name == "jieba":
      raise ImportError(
        "zh_segmenter='jieba' needs jieba (LongBench's Chinese segmenter); "
        "`pip install jieba==0.42.1` or use zh_segmenter='char'"
      ) from None
    if not _ZH_WARNED:
      warnings.warn(
        "jieba is not installed: Chinese LongBench metrics segment by character "
        "(LongBench uses jieba; `pip install jieba==0.42.1` to match it)",
        stacklevel=2,
      )
      _ZH_WARNED = True
    return char_segment, "char"
  return (lambda text: list(jieba.cut(text, cut_all=False))), "jieba"


def _segment(kwargs) -> Callable[[str], list[str]]:
  segment = kwargs.get("segment")
  return zh_segmenter("auto")[0] if segment is None else segment


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
  """F1 over segmented words, each `normalize_zh_answer`-ed, empty ones dropped."""
  segment = _segment(kwargs)
  pred = [normalize_zh_answer(t) for t in segment(prediction)]
  gold = [normalize_zh_answer(t) for t in segment(ground_truth)]
  return f1_score([t for t in pred if t], [t for t in gold if t])


def _sentences(text: str) -> list[str]:
  """pltrdy rouge `Rouge._get_avg_scores`: pieces between '.', whitespace collapsed."""
  return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _words(sentences: Sequence[str]) -> list[str]:
  """pltrdy rouge `_split_into_words`: every sentence split on a single space."""
  return [w for s in sentences for w in s.split(" ")]


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> list[str]:
  """One LCS of x (reference words) and y (candidate words), as pltrdy's `_recon_lcs`.

  The DP table is `_lcs`; the backtrack takes a match when x[i-1] == y[j-1], else moves
  up when table[i-1][j] > table[i][j-1] and left otherwise (ties go left), which fixes
  which LCS (and so which word set) is returned. Iterative instead of recursive.
  """
  n, m = len(x), len(y)
  table = [[0] * (m + 1) for _ in range(n + 1)]
  for i in range(1, n + 1):
    row, prev, xi = table[i], table[i - 1], x[i - 1]
    for j in range(1, m + 1):
      if xi == y[j - 1]:
        row[j] = prev[j - 1] + 1
      else:
        row[j] = max(prev[j], row[j - 1])
  out = []
  i, j = n, m
  while i > 0 and j > 0:
    if x[i - 1] == y[j - 1]:
      out.append(x[i - 1])
      i, j = i - 1, j - 1
    elif table[i - 1][j] > table[i][j - 1]:
      i -= 1
    else:
      j -= 1
  return out[::-1]


def rouge_l(prediction: str, ground_truth: str) -> dict[str, float]:
  """pltrdy rouge 1.0.1 summary-level ROUGE-L: {"f", "p", "r"} (see the module docstring).

  R = |U| / m, P = |U| / n, F = 2PR / (P + R + 1e-8), where U is the union over reference
  sentences r and candidate sentences c of the word sets of LCS(r, c), m and n are the
  numbers of distinct reference and candidate words. Raises ValueError when either text
  has no sentence (the package's "Collections must contain at least 1 sentence").
  """
  hyp, ref = _sentences(prediction), _sentences(ground_truth)
  if not hyp or not ref:
    raise ValueError("Collections must contain at least 1 sentence.")
  m = len(set(_words(ref)))
  n = len(set(_words(hyp)))
  union: set[str] = set()
  for ref_s in ref:
    ref_words = ref_s.split(" ")
    for hyp_s in hyp:
      union.update(_lcs_words(ref_words, hyp_s.split(" ")))
  llcs = len(union)
  r, p = llcs / m, llcs / n
  return {"f": 2.0 * ((p * r) / (p + r + 1e-8)), "p": p, "r": r}


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
  """ROUGE-L F (pltrdy rouge); 0.0 when either text is empty, as LongBench."""
  try:
    return rouge_l(prediction, ground_truth)["f"]
  except ValueError:
    return 0.0


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
  """ROUGE-L F over segmented Chinese words (joined by spaces, as LongBench)."""
  segment = _segment(kwargs)
  return rouge_score(" ".join(segment(prediction)), " ".join(segment(ground_truth)))


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
  """1/k when the ground truth is among the k classes named in the prediction, else 0.

  Classes that are substrings of the ground truth (but not it) are dropped first, by
  LongBench's loop that removes items from the list it iterates (so it can skip one).
  """
  all_classes = kwargs["all_classes"]
  em_match_list = [c for c in all_classes if c in prediction]
  for match_term in em_match_list:  # mutated inside the loop, as LongBench
    if match_term in ground_truth and match_term != ground_truth:
      em_match_list.remove(match_term)
  if ground_truth in em_match_list:
    return 1.0 / len(em_match_list)
  return 0.0


def _digit_share(prediction: str, target: str) -> float:
  numbers = _DIGITS.findall(prediction)
  right = sum(1 for number in numbers if str(number) == str(target))
  return 0.0 if len(numbers) == 0 else float(right / len(numbers))


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
  """Share of the integers in the prediction that equal the ground truth."""
  return _digit_share(prediction, ground_truth)


def _paragraph_id(ground_truth: str, pattern: str) -> str:
  match = re.findall(pattern, ground_truth)
  if not match:
    raise ValueError(
      f"retrieval ground truth {ground_truth!r} does not match {pattern!r}; "
      "passage_retrieval answers look like 'Paragraph 12' (zh: '段落12')"
    )
  return match[0]


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
  """Share of the integers in the prediction equal to N of the answer 'Paragraph N'."""
  return _digit_share(prediction, _paragraph_id(ground_truth, r"Paragraph (\d+)"))


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
  """As `retrieval_score` for answers '段落N'."""
  return _digit_share(prediction, _paragraph_id(ground_truth, r"段落(\d+)"))


def fuzz_ratio(s1: str | None, s2: str | None) -> int:
  """fuzzywuzzy 0.18.0 `fuzz.ratio`, pure-Python path: round(100 * SequenceMatcher ratio).

  Decorator order as the original: None -> 0, equal -> 100, an empty string -> 0.
  `round` is Python's (half to even), as fuzzywuzzy `utils.intr`.
  """
  if s1 is None or s2 is None:
    return 0
  if s1 == s2:
    return 100
  if len(s1) == 0 or len(s2) == 0:
    return 0
  return int(round(100 * difflib.SequenceMatcher(None, s1, s2).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
  """Edit similarity of the first prediction line that has no '`', '#' or '//' (else '')."""
  line = ""
  for candidate in prediction.lstrip("\n").split("\n"):
    if ("`" not in candidate) and ("#" not in candidate) and ("//" not in candidate):
      line = candidate
      break
  return fuzz_ratio(line, ground_truth) / 100
