"""Perplexity vs. context length: the strided (sliding-window) and the truncated protocol.

Protocol "sliding" (the default; Press et al. 2022, ALiBi, "sliding window evaluation";
Hugging Face "Perplexity of fixed-length models"; YaRN `eval/perplexity.py`, protocol
(a) in notes/algorithms.md §7): a document of N tokens is cut into windows of
`context_len` input tokens whose starts advance by `stride`. A window starting at
token s feeds tokens[s : s + L] to the model (positions 0..L-1) and predicts
tokens[s + 1 : s + L + 1]. Only targets that no earlier window scored count, so
the first window scores all L targets and each later one scores the last
`stride` of them, which have seen at least L - stride tokens of context. Every
target 1..N-1 is scored exactly once: a document contributes N - 1 tokens.

Two deliberate choices differ from the Hugging Face loop, both documented here:
- The last window is aligned to the document end (start N - 1 - L) instead of
  being shortened, so every window has exactly L tokens (one compiled shape) and
  its few new targets see more context, never less.
- Every window is an independent sequence: positions restart at 0 and no BOS is
  added (the documents are scored exactly as given).

Documents: `doc_mode="separate"` (default, the usual choice for long-context
evaluation, e.g. PG19 books) scores each document on its own and skips documents
shorter than `context_len + 1` tokens, counting them in `skipped_documents`.
`doc_mode="concatenate"` joins all documents into one stream, with
`separator_id` (e.g. EOS) between documents when given, and scores the stream.

Protocol "truncated" (YaRN arXiv:2309.00071 §4.3.1, Proof-pile: ten documents of at
least 128k tokens, each truncated to the evaluated length, `eval/perplexity.py --truncate`;
LongRoPE arXiv:2402.13753 evaluates with the same loop, microsoft/LongRoPE
`evaluation/perplexity.py --truncate`): each document is cut to its first L + 1 tokens
and scored as one window. tokens[0 : L] are the input (positions 0..L-1) and all L
targets tokens[1 : L + 1] are scored, so every document contributes exactly L tokens,
each predicted from the whole truncated prefix, none scored twice. Documents shorter
than L + 1 tokens are skipped and counted in `skipped_documents`. The reference loop
prepends a BOS inside its L-token window and scores the L - 1 document tokens after it
(the last input has no label); lcjax documents already start with BOS
(`lcjax.data.make_eval_documents`), and the one extra target, predicted at position
L - 1, is scored too. The positions and the attention span are the same (0..L-1),
which is what a RoPE scaling is tested on. Each length averages over the first L
tokens of each document, so lengths are compared on nested prefixes of the same
documents, not on identical tokens; it costs one forward pass of L tokens per document
and length (sliding windows need ~N / stride of them).

`perplexity_vs_length` with protocol "truncated" scores all lengths from one window of
max(lengths) tokens per document when the model is prefix-invariant: a causal LM whose
RoPE does not depend on the window length (every registered type but `dynamic` and
`longrope`, `RopeType.uses_seq_len`), whose logits at positions 0..L-1 are then those of
the L-token window. The numbers equal the one-window-per-length loop up to fp32 rounding
of the blocked softmax (the test compares the two); it saves a compilation and a
forward pass per extra length, which dominate a sweep of RoPE variants on CPU.

LongLoRA's protocol (b), which scores every token of overlapping windows, is not
implemented: it mixes short-context tokens into the average.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.positional.rope import ROPE_TYPES

__all__ = [
  "perplexity",
  "perplexity_vs_length",
  "window_starts",
  "DOC_MODES",
  "PPL_PROTOCOLS",
  "prefix_invariant",
]

DOC_MODES = ("separate", "concatenate")
PPL_PROTOCOLS = ("sliding", "truncated")


def window_starts(num_tokens: int, context_len: int, stride: int) -> list[tuple[int, int]]:
  """(start, first scored window position) of every window over a document.

  Window starts are 0, stride, 2*stride, ... while a full window fits, plus a last
  window aligned to the document end when the regular starts do not reach it.
  Position j of a window (0 <= j < context_len) predicts target start + 1 + j; a
  window scores positions first..context_len-1. The scored counts sum to
  num_tokens - 1.
  """
  if num_tokens < context_len + 1:
    raise ValueError(
      f"a document of {num_tokens} tokens is shorter than context_len + 1 = {context_len + 1}"
    )
  last_start = num_tokens - 1 - context_len
  starts = list(range(0, last_start + 1, stride))
  if starts[-1] != last_start:
    starts.append(last_start)
  windows = []
  scored_up_to = 0  # targets 1..scored_up_to are already scored
  for start in starts:
    first = max(scored_up_to, start) - start
    windows.append((start, first))
    scored_up_to = start + context_len
  return windows


def _as_documents(documents) -> list[np.ndarray]:
  docs = []
  for i, doc in enumerate(documents):
    array = np.asarray(doc)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
      raise ValueError(
        f"document {i} has shape {array.shape} and dtype {array.dtype}; "
        "pass 1-D integer token arrays"
      )
    docs.append(array.astype(np.int32))
  return docs


def _prepare(
  documents, context_len: int, doc_mode: str, separator_id: int | None
) -> tuple[list[np.ndarray], int]:
  """The token streams to score and the number of skipped documents."""
  docs = _as_documents(documents)
  if doc_mode not in DOC_MODES:
    raise ValueError(f"doc_mode={doc_mode!r} is unknown; choose one of {DOC_MODES}")
  if doc_mode == "concatenate":
    if separator_id is not None and docs:
      sep = np.array([separator_id], np.int32)
      docs = [np.concatenate([piece for doc in docs for piece in (doc, sep)][:-1])]
    elif docs:
      docs = [np.concatenate(docs)]
  kept = [doc for doc in docs if doc.size >= context_len + 1]
  if not kept:
    longest = max((doc.size for doc in docs), default=0)
    raise ValueError(
      f"no document ({doc_mode}) has context_len + 1 = {context_len + 1} tokens "
      f"(the longest has {longest}); lower context_len or pass longer documents"
    )
  return kept, len(docs) - len(kept)


def _token_nll(model, tokens_BW: jax.Array, logits_chunk: int | None) -> jax.Array:
  """Per-position NLL [B, W-1] of tokens_BW[:, 1:] given the prefix tokens_BW[:, :-1].

  Models with `hidden_states` and `logits` (DecoderLM) compute the vocabulary
  logits `logits_chunk` positions at a time, so a long window never holds the
  full [B, L, V] float32 logits; other callables run `model(tokens)`.
  """
  inputs_BL, targets_BL = tokens_BW[:, :-1], tokens_BW[:, 1:]
  B, L = inputs_BL.shape

  def nll(logits_BCV, targets_BC):
    logits_BCV = logits_BCV.astype(jnp.float32)
    picked_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BCV, axis=-1) - picked_BC

  chunked = hasattr(model, "hidden_states") and hasattr(model, "logits")
  if not chunked or logits_chunk is None or L <= logits_chunk:
    return nll(model(inputs_BL), targets_BL)
  h_BLD = model.hidden_states(inputs_BL)
  h_BLD = h_BLD[0] if isinstance(h_BLD, tuple) else h_BLD  # DecoderLM also returns caches
  n = -(-L // logits_chunk)
  pad = n * logits_chunk - L
  h_BLD = jnp.pad(h_BLD, ((0, 0), (0, pad), (0, 0)))
  targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
  h_NBCD = h_BLD.reshape(B, n, logits_chunk, -1).swapaxes(0, 1)
  targets_NBC = targets_BL.reshape(B, n, logits_chunk).swapaxes(0, 1)
  nll_NBC = jax.lax.map(lambda xs: nll(model.logits(xs[0]), xs[1]), (h_NBCD, targets_NBC))
  return nll_NBC.swapaxes(0, 1).reshape(B, n * logits_chunk)[:, :L]


@functools.partial(jax.jit, static_argnames=("graphdef", "logits_chunk"))
def _nnx_token_nll(graphdef, state, tokens_BW, logits_chunk):
  return _token_nll(nnx.merge(graphdef, state), tokens_BW, logits_chunk)


def _scorer(model, logits_chunk: int | None) -> Callable[[np.ndarray], np.ndarray]:
  """A jitted tokens_BW -> nll_BL function: one compilation per window shape."""
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    return lambda tokens_BW: _nnx_token_nll(graphdef, state, tokens_BW, logits_chunk)
  if not callable(model):
    raise TypeError(f"model of type {type(model).__name__} is not callable; pass an LM")
  return jax.jit(lambda tokens_BW: _token_nll(model, tokens_BW, logits_chunk))


def _windows(
  docs: list[np.ndarray], context_len: int, stride: int | None, protocol: str
) -> list[tuple[int, int, int]]:
  """(document index, start, first scored window position) of every window, in order."""
  if protocol == "truncated":  # one window per document: its first L + 1 tokens, all scored
    return [(doc_index, 0, 0) for doc_index in range(len(docs))]
  return [
    (doc_index, start, first)
    for doc_index, doc in enumerate(docs)
    for start, first in window_starts(doc.size, context_len, stride)
  ]


def _score(
  model,
  docs: list[np.ndarray],
  *,
  context_len: int,
  stride: int | None,
  protocol: str,
  batch_size: int,
  max_windows: int | None,
  logits_chunk: int | None,
) -> tuple[float, int, int]:
  """Sum of NLL over scored tokens, scored-token count and window count."""
  windows = _windows(docs, context_len, stride, protocol)
  if max_windows is not None:
    windows = windows[:max_windows]
  score = _scorer(model, logits_chunk)
  positions_L = np.arange(context_len)
  total_nll, total_tokens = 0.0, 0
  for b in range(0, len(windows), batch_size):
    batch = windows[b : b + batch_size]
    tokens_BW = np.zeros((batch_size, context_len + 1), np.int32)
    mask_BL = np.zeros((batch_size, context_len), bool)  # padding rows score nothing
    for row, (doc_index, start, first) in enumerate(batch):
      tokens_BW[row] = docs[doc_index][start : start + context_len + 1]
      mask_BL[row] = positions_L >= first
    nll_BL = np.asarray(score(tokens_BW), np.float64)
    total_nll += float(np.sum(nll_BL, where=mask_BL))
    total_tokens += int(mask_BL.sum())
  return total_nll, total_tokens, len(windows)


def _truncated_nll(
  model,
  docs: list[np.ndarray],
  context_len: int,
  batch_size: int,
  logits_chunk: int | None,
) -> np.ndarray:
  """NLL [documents, L] (float64) of each document's targets 1..L, one window per document."""
  score = _scorer(model, logits_chunk)
  nll_NL = np.zeros((len(docs), context_len))
  for b in range(0, len(docs), batch_size):
    batch = docs[b : b + batch_size]
    tokens_BW = np.zeros((batch_size, context_len + 1), np.int32)  # padding rows are dropped
    for row, doc in enumerate(batch):
      tokens_BW[row] = doc[: context_len + 1]
    nll_NL[b : b + len(batch)] = np.asarray(score(tokens_BW), np.float64)[: len(batch)]
  return nll_NL


def prefix_invariant(model) -> bool:
  """Whether `model`'s logits at positions 0..L-1 of a longer window equal the L-token window's.

  True for a DecoderLM (causal; it has `rope_parameters`) whose RoPE type does not read the
  window length (`RopeType.uses_seq_len` is False: not `dynamic`, not `longrope`). Any other
  callable is assumed not to be: the caller may know better and pass `share_prefix=True`.
  """
  rope_parameters = getattr(model, "rope_parameters", None)
  if not isinstance(rope_parameters, dict):
    return False
  rope_type = ROPE_TYPES.get(rope_parameters.get("rope_type"))
  return rope_type is not None and not rope_type.uses_seq_len


def _result(total_nll, tokens, windows, **info) -> dict:
  nll = total_nll / tokens
  return dict(nll=nll, ppl=math.exp(nll), tokens=tokens, windows=windows, **info)


def _check_protocol(protocol: str, doc_mode: str) -> None:
  if protocol not in PPL_PROTOCOLS:
    raise ValueError(f"protocol={protocol!r} is unknown; choose one of {PPL_PROTOCOLS}")
  if protocol == "truncated" and doc_mode != "separate":
    raise ValueError(
      f"protocol='truncated' scores each document's first tokens and needs "
      f"doc_mode='separate', got doc_mode={doc_mode!r}"
    )


def _check_positive(**values: int | None) -> None:
  for name, value in values.items():
    if value is not None and (not isinstance(value, int | np.integer) or value < 1):
      raise ValueError(f"{name}={value!r} must be a positive integer")


def perplexity(
  model,
  documents: Sequence[np.ndarray],
  *,
  context_len: int,
  stride: int | None = None,
  batch_size: int = 1,
  max_windows: int | None = None,
  doc_mode: str = "separate",
  separator_id: int | None = None,
  logits_chunk: int | None = 2048,
  protocol: str = "sliding",
) -> dict:
  """Perplexity of `model` on `documents` at one context length.

  Args:
    model: any callable `model(tokens_BT) -> logits_BTV` (the DecoderLM signature).
    documents: 1-D integer token arrays.
    context_len: input tokens per window (L).
    stride: window step, 1..L; default L (disjoint windows). Tokens scored after
      the first window of a document see at least L - stride tokens of context.
      Only for protocol "sliding".
    batch_size: windows per forward pass; the last batch is padded (one compile).
    max_windows: score only the first this many windows (documents in order); with
      protocol "truncated" a window is a document, so this bounds scored documents.
    doc_mode: "separate" (skip and count documents under L + 1 tokens) or
      "concatenate" (one stream, `separator_id` between documents if given).
    separator_id: token put between documents in "concatenate" mode.
    logits_chunk: positions per vocabulary-logits chunk for models with
      `hidden_states`/`logits`; None computes the whole window at once.
    protocol: "sliding" (strided windows over whole documents) or "truncated" (each
      document's first L + 1 tokens as one window, L targets scored); see the module
      docstring. "truncated" needs doc_mode "separate".

  Returns:
    dict(nll=mean NLL per scored token (nats), ppl=exp(nll), tokens=scored tokens,
    windows, context_len, stride (None for "truncated"), documents=scored documents or
    streams, skipped_documents, doc_mode, protocol).
  """
  _check_protocol(protocol, doc_mode)
  if protocol == "truncated" and stride is not None:
    raise ValueError(
      f"stride={stride} applies to protocol 'sliding'; protocol 'truncated' scores one "
      "window per document, so leave stride unset"
    )
  if protocol == "sliding":
    stride = context_len if stride is None else stride
  _check_positive(
    context_len=context_len,
    stride=stride,
    batch_size=batch_size,
    max_windows=max_windows,
    logits_chunk=logits_chunk,
  )
  if stride is not None and stride > context_len:
    raise ValueError(
      f"stride={stride} exceeds context_len={context_len}: tokens between windows "
      "would never be scored; use stride <= context_len"
    )
  docs, skipped = _prepare(documents, context_len, doc_mode, separator_id)
  total_nll, tokens, windows = _score(
    model,
    docs,
    context_len=context_len,
    stride=stride,
    protocol=protocol,
    batch_size=batch_size,
    max_windows=max_windows,
    logits_chunk=logits_chunk,
  )
  documents_scored = len(docs)
  if protocol == "truncated":
    documents_scored = windows
  return _result(
    total_nll,
    tokens,
    windows,
    context_len=context_len,
    stride=stride,
    documents=documents_scored,
    skipped_documents=skipped,
    doc_mode=doc_mode,
    protocol=protocol,
  )


def perplexity_vs_length(
  model,
  documents: Sequence[np.ndarray],
  lengths: Sequence[int],
  *,
  stride_fraction: float = 0.5,
  batch_size: int = 1,
  max_documents: int | None = None,
  max_tokens_per_document: int | None = None,
  doc_mode: str = "separate",
  separator_id: int | None = None,
  logits_chunk: int | None = 2048,
  protocol: str = "sliding",
  share_prefix: bool | None = None,
) -> list[dict]:
  """Perplexity at each context length in `lengths`, on the same documents.

  Only documents with at least max(lengths) + 1 tokens are kept (the first
  `max_documents` of them), each optionally truncated to
  `max_tokens_per_document`; shorter ones are counted in `skipped_documents`.
  With protocol "sliding" every length scores every target of every kept
  document exactly once, so all lengths are averaged over identical tokens and
  their perplexities are directly comparable. With protocol "truncated" (YaRN's
  Proof-pile curves) length L scores the first L targets of each kept document
  (one window each), so every length uses the same documents. In "concatenate"
  mode (sliding only) the documents are joined first (see `perplexity`) and the
  stream is truncated.

  Args:
    model, batch_size, doc_mode, separator_id, logits_chunk, protocol: as in
      `perplexity`.
    lengths: context lengths to evaluate, e.g. [1x, 2x, 4x] the training length.
    stride_fraction: stride = max(1, round(L * stride_fraction)) for each length;
      0.5 (the Hugging Face guide's 512/1024) means scored tokens after a
      document's first window see at least L/2 tokens of context; 1.0 is disjoint.
      Ignored by protocol "truncated".
    max_documents: keep at most this many long-enough documents.
    max_tokens_per_document: truncate kept documents to bound the cost.
    share_prefix: protocol "truncated" only: score every length from one window of
      max(lengths) tokens per document (see the module docstring). None (default) does
      so when `prefix_invariant(model)`; False runs one window per length, as the
      reference loop does.

  Returns:
    one `perplexity` result dict per length, in the order of `lengths`.
  """
  lengths = list(lengths)
  if not lengths:
    raise ValueError("lengths is empty; pass at least one context length")
  _check_protocol(protocol, doc_mode)
  _check_positive(
    max_documents=max_documents,
    max_tokens_per_document=max_tokens_per_document,
    **{f"lengths[{i}]": length for i, length in enumerate(lengths)},
  )
  if not 0 < stride_fraction <= 1:
    raise ValueError(f"stride_fraction={stride_fraction} must be in (0, 1]")
  lengths = [int(length) for length in lengths]
  longest = max(lengths)
  if max_tokens_per_document is not None and max_tokens_per_document < longest + 1:
    raise ValueError(
      f"max_tokens_per_document={max_tokens_per_document} is below max(lengths) + 1 = "
      f"{longest + 1}; raise it or drop the longest length"
    )
  docs, skipped = _prepare(documents, longest, doc_mode, separator_id)
  docs = [doc[:max_tokens_per_document] for doc in docs[:max_documents]]
  if share_prefix is None:
    share_prefix = prefix_invariant(model)
  if protocol == "truncated" and share_prefix:
    _check_positive(batch_size=batch_size, logits_chunk=logits_chunk)
    nll_NL = _truncated_nll(model, docs, longest, batch_size, logits_chunk)
    return [
      _result(
        float(nll_NL[:, :length].sum()),
        len(docs) * length,
        len(docs),
        context_len=length,
        stride=None,
        documents=len(docs),
        skipped_documents=skipped,
        doc_mode=doc_mode,
        protocol=protocol,
      )
      for length in lengths
    ]
  results = []
  for length in lengths:
    stride = max(1, round(length * stride_fraction)) if protocol == "sliding" else None
    total_nll, tokens, windows = _score(
      model,
      docs,
      context_len=length,
      stride=stride,
      protocol=protocol,
      batch_size=batch_size,
      max_windows=None,
      logits_chunk=logits_chunk,
    )
    results.append(
      _result(
        total_nll,
        tokens,
        windows,
        context_len=length,
        stride=stride,
        documents=len(docs),
        skipped_documents=skipped,
        doc_mode=doc_mode,
        protocol=protocol,
      )
    )
  return results
