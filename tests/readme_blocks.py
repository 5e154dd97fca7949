"""README.md's code blocks as data: fenced blocks, shell commands, snippet placeholders.

The parsing half of tests/test_readme_commands.py (which runs what this finds): README
blocks with their heading, bash blocks split into commands like a shell would, and, for
python snippets, the names they read without binding and small arrays to bind them to.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import re
import shlex

import numpy as np

# --- README parsing ------------------------------------------------------------------------

BASH_LANGS = ("bash", "sh", "shell", "console")
PYTHON_LANGS = ("python", "py", "python3")


@dataclasses.dataclass(frozen=True)
class Block:
  """One fenced code block: its section heading, language, first line and text."""

  heading: str
  lang: str
  line: int  # 1-based line of the first line inside the fence
  text: str


@dataclasses.dataclass
class Command:
  """One logical bash command: `VAR=value` prefix, argv, and where the README has it."""

  line: int
  text: str  # as the README writes it (continuations joined, comment dropped)
  env: dict[str, str]
  argv: list[str]


def readme_blocks(text: str) -> list[Block]:
  """The bash and python blocks of a markdown text, each with the heading it sits under."""
  heading, blocks, lines, i = "top", [], text.splitlines(), 0
  while i < len(lines):
    line = lines[i]
    title = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
    if title:
      heading = "top" if len(title.group(1)) == 1 else title.group(2)
    fence = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
    if fence:
      close, lang, start, body = fence.group(1), fence.group(2).lower(), i + 2, []
      i += 1
      while i < len(lines) and not lines[i].strip().startswith(close):
        body.append(lines[i])
        i += 1
      if lang in BASH_LANGS + PYTHON_LANGS:
        kind = "python" if lang in PYTHON_LANGS else "bash"
        blocks.append(Block(heading, kind, start, "\n".join(body)))
    i += 1
  return blocks


def _drop_optional(tokens: list[str]) -> list[str]:
  """`[--verify]` -> `--verify` (run the optional flag too); `[--step N]` -> dropped."""
  out, group = [], None
  for token in tokens:
    if group is None and not token.startswith("[-"):
      out.append(token)
      continue
    group = [token[1:]] if group is None else group + [token]
    if group[-1].endswith("]"):
      group[-1] = group[-1][:-1]
      if len(group) == 1:
        out.append(group[0])
      group = None
  if group is not None:
    raise ValueError(f"unclosed optional group [{' '.join(group)}")
  return out


def bash_commands(block: Block) -> list[Command]:
  """The commands of a bash block: `\\` continuations joined, comments and blank lines dropped."""
  logical, pending, start = [], "", None
  for offset, raw in enumerate(block.text.splitlines()):
    start = block.line + offset if start is None else start
    if raw.rstrip().endswith("\\"):
      pending += raw.rstrip()[:-1] + " "
      continue
    logical.append((start, pending + raw))
    pending, start = "", None
  if pending:
    logical.append((start, pending))
  commands = []
  for line, text in logical:
    tokens = shlex.split(text, comments=True)
    if not tokens:
      continue
    env = {}
    while tokens and re.match(r"^[A-Za-z_]\w*=", tokens[0]):
      key, value = tokens.pop(0).split("=", 1)
      env[key] = value
    shown = " ".join(re.sub(r"(^|\s)#[^'\"]*$", "", text).split())  # for messages only
    commands.append(Command(line, shown, env, _drop_optional(tokens)))
  return commands


def slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].rstrip("-") or "top"


# Sizes of the shape-suffix letters of the repo's array names (tokens_BT, q_BTHD, ...).
DIMS = dict(B=1, T=16, S=16, L=16, P=4, H=4, K=2, G=2, D=16, N=8, V=64)


def placeholder_value(name: str):
  """A small array for a name a snippet uses but never defines, from its shape suffix."""
  import jax.numpy as jnp

  found = re.fullmatch(r"([a-z][a-z0-9_]*?)_([A-Z]+)", name)
  if not found or any(d not in DIMS for d in found.group(2)):
    return None
  prefix, dims = found.groups()
  shape = tuple(DIMS[d] for d in dims)
  rng = np.random.default_rng(sum(map(ord, name)))
  if "seg" in prefix:  # two packed documents
    row = np.where(np.arange(shape[-1]) < shape[-1] // 2, 1, 2)
    return jnp.asarray(np.broadcast_to(row, shape), jnp.int32)
  if "pos" in prefix:
    return jnp.asarray(np.broadcast_to(np.arange(shape[-1]), shape), jnp.int32)
  if any(word in prefix for word in ("token", "prompt", "ids", "target")):
    return jnp.asarray(rng.integers(0, 32, size=shape), jnp.int32)
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def free_names(tree: ast.AST) -> set[str]:
  """Names a snippet reads but never binds (imports, assignments, defs, arguments)."""
  loaded, bound = set(), set(dir(builtins))
  for node in ast.walk(tree):
    if isinstance(node, ast.Name):
      (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    elif isinstance(node, ast.Import | ast.ImportFrom):
      bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
      bound.add(node.name)
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
  return loaded - bound
