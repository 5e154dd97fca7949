"""Every code block of README.md runs: a documented command that does not run is a failing test.

README.md is parsed when the tests are collected (never a copy of it): each ```bash block is
one test whose commands run in order in one tmp dir (a later command may read an earlier
one's run), each ```python block is one test that execs the snippet. A command runs for real
but shrunk by the rule of its program (`RULES`): a tiny model, 32-token rows, 2 steps, and
small real files in place of the README's placeholders (`runs/...`, `/tmp/...`, data globs,
`/models/...` Hugging Face folders, `HF_FOLDER`, `LCJAX_FOLDER`, `RUN_WORKDIR`, `--config
...`). A command that no rule covers fails its test with a message asking for a rule, so a new
README command is never silently untested.

Cost: each script run pays ~6 s of imports and a few seconds of XLA compilation, so the
runs share a persistent XLA compilation cache per pytest session (several README commands
compile the same tiny train step and initializers), study variants that shrink to the same
`smoke` run run once, and scripts/convert_hf.py runs in the test process. Multi-process and
TPU compile-only runs do not use the cache (concurrent writers of one entry).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fnmatch
import importlib.util
import io
import json
import math
import os
import re
import runpy
import shlex
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from readme_blocks import (
  Block,
  Command,
  bash_commands,
  free_names,
  placeholder_value,
  readme_blocks,
  slug,
)
from readme_files import build_tiny_hf_folder, write_data_files, write_longbench_folder

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT_S = 600

# Shrunk sizes. Rows are SEQ tokens (times what the context layout needs); blocks divide them.
SEQ = 32
BLOCK = 16
TINY_MODEL = dict(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
TINY_MAMBA = dict(num_layers=1, d_model=32, head_dim=16, d_state=8, chunk_size=16)
BYTE_VOCAB = 384  # the byte tokenizer's padded vocabulary


def _block_params():
  blocks = readme_blocks(README.read_text(encoding="utf-8")) if README.exists() else []
  ids, seen = [], {}
  for block in blocks:
    base = f"{slug(block.heading)}-{block.lang}"
    seen[base] = seen.get(base, -1) + 1
    ids.append(f"{base}{seen[base]}")
  return [pytest.param(block, id=name) for block, name in zip(blocks, ids, strict=True)]


BLOCKS = _block_params()


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory) -> Path:
  """One tiny Hugging Face checkpoint per test process, only read by the tests."""
  return build_tiny_hf_folder(tmp_path_factory.mktemp("tiny_hf"), 4 * SEQ)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
  """A persistent XLA cache shared by this session's workers (identical tiny train steps).

  The session's own cache when conftest.py (or the caller) set one, else one made here.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  return base / "jax_compile_cache"


# --- running commands ------------------------------------------------------------------------


def _tail(text: str, lines: int = 40) -> str:
  return "\n".join(text.rstrip().splitlines()[-lines:])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _flag(argv: list[str], name: str) -> str | None:
  """The value of `--name=v` or `--name v` in argv (the last one), else None."""
  value = None
  for i, item in enumerate(argv):
    if item.startswith(f"--{name}="):
      value = item.split("=", 1)[1]
    elif item == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _set_flag(argv: list[str], name: str, value: str) -> list[str]:
  """argv with every `--name` set to `value` (appended when absent)."""
  out, i, found = [], 0, False
  while i < len(argv):
    if argv[i].startswith(f"--{name}="):
      out.append(f"--{name}={value}")
      found = True
    elif argv[i] == f"--{name}" and i + 1 < len(argv):
      out += [f"--{name}", value]
      found = True
      i += 1
    else:
      out.append(argv[i])
    i += 1
  return out if found else out + [f"--{name}={value}"]


def _normalized(argv: list[str], drop: tuple[str, ...] = ()) -> tuple:
  """argv as a sorted tuple of (flag, value) pairs, either spelling, without `drop` flags."""
  items, i = [], 0
  while i < len(argv):
    name, sep, value = argv[i].partition("=") if argv[i].startswith("--") else ("", "", argv[i])
    if name and not sep and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
      value, i = argv[i + 1], i + 1
    if name.lstrip("-") not in drop:
      items.append((name, value))
    i += 1
  return tuple(sorted(items))


def _device_count(env: dict[str, str]) -> int:
  found = re.search(r"xla_force_host_platform_device_count=(\d+)", env.get("XLA_FLAGS", ""))
  return int(found.group(1)) if found else 1


def _format_value(value) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, tuple):
    return "(" + "".join(f"{v!r}," for v in value) + ")"
  return str(value)


class Workspace:
  """One block's tmp dir: placeholder -> real path bindings, shared by its commands in order."""

  OUTPUT_FLAGS = ("dst", "out", "output", "output_dir")

  def __init__(self, block: Block, tmp_path: Path, request: pytest.FixtureRequest):
    self.block, self.tmp, self.request = block, tmp_path, request
    self.bound: dict[str, str] = {}  # README path or placeholder -> real path
    self.notes: list[str] = []
    self.done: set[tuple] = set()  # effective commands already run
    self.current: Command | None = None
    basetemp = request.getfixturevalue("tmp_path_factory").getbasetemp()
    self.real_roots = (str(tmp_path), str(basetemp))

  # paths and placeholders

  def hf_folder(self) -> str:
    return str(self.request.getfixturevalue("tiny_hf_folder"))

  def fresh(self, name: str) -> str:
    base = self.tmp / "out" / slug(name)
    path, n = base, 1
    while path.exists() or str(path) in self.bound.values():
      path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return str(path)

  def data_glob(self, pattern: str, argv: list[str]) -> str:
    if pattern not in self.bound:
      clean = re.sub(r"^[/.]+", "", pattern)
      path = str(self.tmp / "data" / clean)
      text_field = _flag(argv, "config.data.source.text_field") or "text"
      write_data_files(path, text_field)
      self.bound[pattern] = path
    return self.bound[pattern]

  def path(self, value: str, argv: list[str], role: str = "input") -> str:
    """A README path as a real tmp path: a data glob, an output, a model folder or a run folder.

    An output (`--dst`) is always a fresh folder, so nothing writes into the shared tiny
    checkpoint; a `/models/...` folder read before anything wrote it is that checkpoint.
    """
    if value.startswith(self.real_roots):  # already substituted (a helper's own command)
      return value
    if "*" in value:
      return self.data_glob(value, argv)
    if role == "output":
      self.bound[value] = self.fresh(value)
    elif value not in self.bound:
      is_model = value.startswith("/models/")
      self.bound[value] = self.hf_folder() if is_model else str(self.tmp / "work" / slug(value))
    return self.bound[value]

  def placeholder(self, name: str, role: str) -> str:
    """An all-caps README placeholder; `role` is "output", "workdir" or "input"."""
    if role == "output":
      self.bound[name] = self.fresh(name)
      return self.bound[name]
    if name in self.bound:
      return self.bound[name]
    makers: dict[str, Callable[[], str]] = {
      "HF_FOLDER": self.hf_folder,
      "HF_DIR": self.hf_folder,
      "LCJAX_FOLDER": self.lcjax_folder,
      "RUN_WORKDIR": self.run_workdir,
      "WORKDIR": self.run_workdir,
      "N": lambda: "1",  # --step N: the first of the 2 checkpoints a shrunk run keeps
      "STEP": lambda: "1",
    }
    if role == "workdir" and name.endswith(("WORKDIR", "RUN")):
      makers[name] = lambda: self.fresh(name)
    if name not in makers:
      pytest.fail(
        f"README.md:{self.current.line}: placeholder {name} in `{self.current.text}` has no "
        f"rule; add it to Workspace.placeholder in {Path(__file__).name}",
        pytrace=False,
      )
    self.bound[name] = makers[name]()
    return self.bound[name]

  def lcjax_folder(self) -> str:
    """An lcjax params folder: the tiny HF checkpoint converted by scripts/convert_hf.py."""
    dst = self.fresh("LCJAX_FOLDER")
    self.run_helper(
      ["python", "scripts/convert_hf.py", "--to", "lcjax", "--src", self.hf_folder(), "--dst", dst]
    )
    return dst

  def run_workdir(self) -> str:
    """A trained run folder: the quickstart, shrunk like any README training command."""
    workdir = self.fresh("RUN_WORKDIR")
    self.run_helper(
      ["python", "scripts/train.py", "--config", "configs/quickstart.py:tiny", "--workdir", workdir]
    )
    return workdir

  def run_helper(self, argv: list[str]) -> None:
    """Runs a command this test needs first (not one from the README) through its rule."""
    outer = self.current
    helper = Command(outer.line, shlex.join(argv) + f"   (to prepare `{outer.text}`)", {}, argv)
    run_command(self, helper)
    self.current = outer

  def substitute(self, argv: list[str]) -> list[str]:
    """argv with every placeholder replaced; `--config ...` is the tiny quickstart."""
    out = []
    for i, item in enumerate(argv):
      if item == "...":
        out.append("configs/quickstart.py:tiny")
        if _flag(argv, "workdir") is None:
          out += ["--workdir", self.path("runs/elided", argv)]
      elif item.startswith("--"):
        flag, sep, value = item.partition("=")
        out.append(f"{flag}={self.value(value, self.role(flag), argv)}" if sep else item)
      else:
        prev = argv[i - 1] if i else ""
        flag = prev if prev.startswith("--") and "=" not in prev else ""
        out.append(self.value(item, self.role(flag), argv))
    return out

  def role(self, flag: str) -> str:
    name = flag.lstrip("-")
    return "output" if name in self.OUTPUT_FLAGS else "workdir" if name == "workdir" else "input"

  def value(self, value: str, role: str, argv: list[str]) -> str:
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", value):
      return self.placeholder(value, role)
    pattern = re.compile(
      r"(?<![\w./~-])(?:[\w./-]*\*[\w.*/-]*|(?:runs|/tmp|/data|/models)/[^\s'\",\]\)}]*)"
    )
    return pattern.sub(lambda m: self.path(m.group(0), argv, role), value)


def _process_env(cmd_env: dict[str, str], cache: Path | None) -> dict[str, str]:
  """The test's environment on CPU, 1 device unless the command's own XLA_FLAGS say more."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
  env.update(cmd_env)
  # The suite's fast-compile flags (conftest.py), with the command's own device count.
  env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {os.environ.get('LCJAX_TEST_XLA_FLAGS', '')}".strip()
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if cache is not None:  # cache every program, however small or quick to compile
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
  return env


def _python(argv: list[str]) -> list[str]:
  """`python X ...` -> this interpreter on X in the repository."""
  return [sys.executable, *argv[1:]]


def _run(ws: Workspace, argv: list[str], env: dict[str, str], shown: list[str]) -> str:
  """Runs argv in the repository root; fails the test with the output's tail unless exit 0."""
  result = subprocess.run(
    argv,
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=TIMEOUT_S,
    check=False,
  )
  if result.returncode != 0:
    _fail(ws, result.returncode, shown, result.stdout)
  return result.stdout


def _fail(ws: Workspace, rc, argv: list[str], output: str):
  pytest.fail(
    f"README.md:{ws.current.line}: `{ws.current.text}` failed (exit {rc}); run as\n"
    f"  {shlex.join(argv)}\n--- last lines ---\n{_tail(output)}",
    pytrace=False,
  )


def _resolve_config(argv: list[str]):
  """The run config the script will build from argv's --config flags (ml_collections' parser)."""
  from absl import flags as absl_flags
  from ml_collections import config_flags

  picked, i = [], 0
  while i < len(argv):
    item = argv[i]
    if item == "--config" and i + 1 < len(argv):
      picked.append(f"--config={argv[i + 1]}")
      i += 1
    elif item.startswith(("--config=", "--config.")):
      picked.append(item)
    i += 1
  for n, item in enumerate(picked):
    if item.startswith("--config="):
      spec = item.split("=", 1)[1]
      path, sep, arg = spec.partition(":")
      picked[n] = f"--config={ROOT / path if not os.path.isabs(path) else path}{sep}{arg}"
  values = absl_flags.FlagValues()
  argv = ["readme", *picked]
  config_flags.DEFINE_config_file(
    "config", None, "config", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


def _topology_devices(topology: str) -> int:
  """Chips of a TPU topology name: v5p:4x4x4 -> 64."""
  return math.prod(int(n) for n in re.findall(r"\d+", topology.split(":", 1)[-1]))


def shrink_overrides(config, devices: int) -> dict[str, object]:
  """`--config.*` overrides that make `config` a 2-step run of a tiny model on `devices`.

  The mesh stays the README's (it is part of what the command checks); the rows are
  SEQ tokens, or the smallest multiple the context layout can split; the batch is one row
  per data x fsdp shard. A model loaded with `init_from` is not shrunk: the test's
  checkpoint is tiny instead.
  """
  from lcjax.parallel.mesh import mesh_shape

  sizes = mesh_shape(config.mesh, devices)
  parts = sizes["context"] * (2 if config.parallel.get("layout") == "zigzag" else 1)
  seq = math.lcm(SEQ, parts)
  o: dict[str, object] = {}
  model = config.model
  if config.get("init_from") is None:
    family = model.get("family", "llama")
    tiny = dict(TINY_MAMBA if family == "mamba2" else TINY_MODEL)
    if "num_heads" in tiny:
      tiny.update(num_heads=2 * sizes["tensor"], num_kv_heads=sizes["tensor"])
      tiny["d_model"] = max(tiny["d_model"], tiny["num_heads"] * tiny["head_dim"])
    if model.get("layer_types"):
      tiny.pop("num_layers")  # a per-layer pattern fixes the depth
    o.update({f"model.{k}": v for k, v in tiny.items() if k in model})
    tokenizer = config.data.get("tokenizer") or {}
    if tokenizer.get("kind", "byte") == "byte" and model.get("vocab_size", 0) > BYTE_VOCAB:
      o["model.vocab_size"] = BYTE_VOCAB
    if "max_position_embeddings" in model:
      o["model.max_position_embeddings"] = seq
    if "max_position_embeddings" in (model.get("rope") or {}):
      o["model.rope.max_position_embeddings"] = seq
  o["data.seq_len"] = seq
  o.update({"attention.block_q": BLOCK, "attention.block_kv": BLOCK})
  t = config.train
  o.update(
    {
      "train.steps": 2,
      "train.batch_size": sizes["data"] * sizes["fsdp"] * t.grad_accum,
      "train.warmup_steps": min(t.warmup_steps, 1),
      "train.log_every": 1,
      "checkpoint.every_steps": 1,
      "eval.every_steps": 0,
      "eval.batches": 1,
    }
  )
  if config.eval.ppl_lengths:
    # Windows of the row length: compiling the unrolled attention of longer ones costs more
    # than scoring one document's many short windows.
    # ... and of its first 4 windows only (a whole document is hundreds of 32-token windows).
    o.update(
      {
        "eval.ppl_lengths": (seq,),
        "eval.ppl_max_documents": 1,
        "eval.ppl_max_tokens_per_document": 4 * seq + 1,
      }
    )
  if config.eval.passkey.enabled:
    o.update(
      {"eval.passkey.lengths": (256,), "eval.passkey.depths": (0.5,), "eval.passkey.trials": 1}
    )
  tasks = tuple(config.eval.get("tasks") or ())
  if set(tasks) - {"longbench"}:  # scripts/eval.py's RULER tasks: one short length, 2 samples
    o.update(RULER_SHRINK)
  if "longbench" in tasks:
    o.update(LONGBENCH_SHRINK)
  return o


def _shrunk(ws: Workspace, argv: list[str], devices: int) -> list[str]:
  try:
    config = _resolve_config(argv)
    overrides = shrink_overrides(config, devices)
  except Exception as e:  # noqa: BLE001 - the script would fail the same way
    pytest.fail(
      f"README.md:{ws.current.line}: `{ws.current.text}`: its config does not resolve: "
      f"{type(e).__name__}: {e}",
      pytrace=False,
    )
  # A repeated scalar override takes the last value, but a repeated tuple one appends to the
  # first (ml_collections): the README's value of a field shrunk here is dropped instead.
  kept, skip = [], False
  for i, item in enumerate(argv):
    name = item[len("--config.") :].split("=", 1)[0] if item.startswith("--config.") else None
    if skip:
      skip = False
    elif name in overrides:
      skip = "=" not in item and i + 1 < len(argv)
    else:
      kept.append(item)
  return kept + [f"--config.{k}={_format_value(v)}" for k, v in overrides.items()]


def _check_run_folder(ws: Workspace, workdir: str, shown: list[str], output: str) -> None:
  metrics = Path(workdir) / "metrics.jsonl"
  lines = metrics.read_text().splitlines() if metrics.exists() else []
  checkpoints = Path(workdir) / "checkpoints"
  steps = [p for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.exists() else []
  if not any('"loss"' in line for line in lines) or not steps:
    _fail(ws, "0, but no metrics.jsonl loss line or no checkpoint", shown, output)


def run_train(ws: Workspace, cmd: Command) -> None:
  """scripts/train.py: the README's flags with the shrinking overrides in place of its own.

  `--compile_only --topology T` compiles for T's chips (skipped, with a warning, only when
  libtpu is missing); `--num_processes=K` starts all K processes with a free coordinator port.
  A multi-stage config (`stages`) runs its `smoke` arg instead (`run_stages_smoke`).
  """
  argv = ws.substitute(cmd.argv)
  if "--compile_only" not in argv and _has_stages(argv):
    run_stages_smoke(ws, cmd, argv)
    return
  topology = _flag(argv, "topology")
  if "--compile_only" in argv and topology:
    if importlib.util.find_spec("libtpu") is None:
      warnings.warn(
        f"libtpu is not installed: README.md:{cmd.line} `{cmd.text}` not run", stacklevel=1
      )
      ws.notes.append(f"skipped (no libtpu): {cmd.text}")
      return
    full = _python(_shrunk(ws, argv, _topology_devices(topology)))
    output = _run(ws, full, _process_env(cmd.env, None), full)
    if "per device:" not in output:
      _fail(ws, "0, but no 'per device:' report", full, output)
    return
  processes = int(_flag(argv, "num_processes") or 1)
  env = _process_env(
    cmd.env, None if processes > 1 else ws.request.getfixturevalue("compile_cache")
  )
  full = _python(_shrunk(ws, argv, _device_count(env) * processes))
  workdir = _flag(full, "workdir")
  if processes == 1:
    output = _run(ws, full, env, full)
  else:  # every process of the job, on one machine, with a free coordinator port
    if _flag(full, "coordinator") is not None:
      full = _set_flag(full, "coordinator", f"127.0.0.1:{_free_port()}")
    runs = [_set_flag(full, "process_id", str(i)) for i in range(processes)]
    procs = [
      subprocess.Popen(
        run, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
      for run in runs
    ]
    try:
      logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    for run, p in zip(runs, procs, strict=True):
      if p.returncode != 0:
        _fail(ws, p.returncode, run, "\n".join(logs))
    output = logs[0]
  _check_run_folder(ws, workdir, full, output)


# One NIAH task at a length its template fits with byte tokens and a 16-token answer budget:
# the command's plumbing (tasks, lengths, outputs); tests/test_ruler.py covers every task.
RULER_SHRINK = {
  "eval.tasks": ("niah_single_1",),
  "eval.lengths": (640,),
  "eval.ruler.samples": 2,
  "eval.ruler.batch_size": 2,
  "eval.ruler.tokens_to_generate": 16,
}


# LongBench: 2 rows of the folder the test writes, prompts cut to 256 tokens.
LONGBENCH_SHRINK = {
  "eval.longbench.max_len": 256,
  "eval.longbench.limit": 2,
  "eval.longbench.batch_size": 2,
}


def _eval_outputs(argv: list[str]) -> list[str]:
  """The files scripts/eval.py must write for `argv`'s eval.tasks (none without tasks)."""
  tasks = _flag(argv, "config.eval.tasks") or ""
  outputs = ["eval/longbench.json"] if "longbench" in tasks else []
  if re.sub(r"[\s'\"(),]|longbench", "", tasks):  # any other (RULER) task
    outputs.append("eval/ruler.md")
  return outputs


def _longbench_data(argv: list[str]) -> None:
  if path := _flag(argv, "config.eval.longbench.path"):
    write_longbench_folder(Path(path))


def run_eval_hf(ws: Workspace, cmd: Command, argv: list[str], env: dict[str, str]) -> None:
  """scripts/eval.py --hf: the config's `smoke` arg (default configs/ruler_eval.py) on the
  tiny HF folder, without the README's lengths (the smoke config's fit the tiny model)."""
  if _flag(argv, "config") is None:
    argv = [*argv[:2], "--config", "configs/ruler_eval.py", *argv[2:]]  # before --config.*
  argv = _smoke_argv(ws, cmd, argv, "an eval config", "evaluation")
  if argv is None:
    return
  argv = [a for a in argv if not a.startswith("--config.eval.lengths")]
  if "longbench" in (_flag(argv, "config.eval.tasks") or ""):
    argv += [f"--config.{k}={_format_value(v)}" for k, v in LONGBENCH_SHRINK.items()]
  _longbench_data(argv)
  full = _python(argv)
  output = _run(ws, full, env, full)
  workdir = Path(_flag(argv, "workdir"))
  missing = [f for f in _eval_outputs(full) or ["eval/ruler.md"] if not (workdir / f).exists()]
  if missing:
    _fail(ws, f"0, but no {', '.join(missing)}", full, output)


def run_eval(ws: Workspace, cmd: Command) -> None:
  """scripts/eval.py: shrunk like training; a workdir with no run gets one trained first."""
  argv = ws.substitute(cmd.argv)
  env = _process_env(cmd.env, ws.request.getfixturevalue("compile_cache"))
  if _flag(argv, "hf") is not None:
    run_eval_hf(ws, cmd, argv, env)
    return
  workdir = _flag(argv, "workdir")
  _longbench_data(argv)  # the training run that prepares the workdir validates it too
  if workdir and not (Path(workdir) / "checkpoints").exists():
    ws.notes.append(f"trained {workdir} first for `{cmd.text}`")
    ws.run_helper(["python", "scripts/train.py", *argv[2:]])
  full = _python(_shrunk(ws, argv, _device_count(env)))
  output = _run(ws, full, env, full)
  if _flag(full, "config.eval.ppl_lengths"):
    ppl = Path(workdir) / "eval" / "ppl_vs_length.json"
    if not ppl.exists():
      _fail(ws, "0, but no eval/ppl_vs_length.json", full, output)
    # The shrink's document cut reached the evaluation: a few windows of SEQ, not hundreds.
    windows = [r["windows"] for rows in json.loads(ppl.read_text()).values() for r in rows]
    if max(windows) > 8:
      _fail(ws, f"0, but perplexity scored {max(windows)} windows, not at most 8", full, output)
  missing = [f for f in _eval_outputs(full) if not (Path(workdir) / f).exists()]
  if missing:
    _fail(ws, f"0, but no {', '.join(missing)}", full, output)


def _run_in_process(ws: Workspace, argv: list[str]) -> str:
  """`python script args` as __main__ in this process (no second jax/torch import)."""
  out = io.StringIO()
  old_argv, rc = sys.argv, 0
  sys.argv = [str(ROOT / argv[1]), *argv[2:]]
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
      runpy.run_path(str(ROOT / argv[1]), run_name="__main__")
  except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, int | None):
      out.write(str(e.code))
  except Exception:  # noqa: BLE001 - reported with the command
    out.write(traceback.format_exc())
    rc = "an exception"
  finally:
    sys.argv = old_argv
  if rc != 0:
    _fail(ws, rc, argv, out.getvalue())
  return out.getvalue()


def run_convert(ws: Workspace, cmd: Command) -> None:
  """scripts/convert_hf.py, in this process, between real folders; the output must be written."""
  argv = ws.substitute(cmd.argv)
  _run_in_process(ws, argv)
  dst = _flag(argv, "dst")
  if dst and not (Path(dst).is_dir() and any(Path(dst).iterdir())):
    _fail(ws, "0, but nothing was written", argv, f"{dst} is empty or missing")
  if _flag(argv, "to") == "hf":  # a folder transformers loads
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(dst)


def _smoke_argv(ws: Workspace, cmd: Command, argv: list[str], what: str, run: str):
  """argv with its config's `smoke` arg, or None when the same smoke run already ran."""
  path = (_flag(argv, "config") or "").partition(":")[0]
  if not (ROOT / path).is_file() or not re.search(r"\bsmoke\s*=", (ROOT / path).read_text()):
    pytest.fail(
      f"README.md:{cmd.line}: `{cmd.text}`: {path} is not {what} with a `smoke` arg to run "
      f"it cheaply; add one or a rule in {Path(__file__).name}",
      pytrace=False,
    )
  argv = _set_flag(argv, "config", f"{path}:smoke")
  key = _normalized(argv, drop=("workdir",))
  if key in ws.done:
    ws.notes.append(f"`{cmd.text}` is the same smoke {run} as an earlier command: not rerun")
    return None
  ws.done.add(key)
  return argv


def _has_stages(argv: list[str]) -> bool:
  try:
    return bool(_resolve_config(argv).get("stages"))
  except Exception:  # noqa: BLE001 - _shrunk reports a config that does not resolve
    return False


def run_stages_smoke(ws: Workspace, cmd: Command, argv: list[str]) -> None:
  """A multi-stage config's command as its `smoke` arg: every stage, tiny and a few steps.

  Stage overrides set each stage's lengths and steps, so the generic shrinking cannot
  reach them; the config's own `smoke` size is the cheap form of the same chain. Every
  stage folder must end with a loss line and a checkpoint, and the chain with results.csv.
  """
  argv = _smoke_argv(ws, cmd, argv, "a config with stages", "chain")
  if argv is None:
    return
  full = _python(argv)
  output = _run(ws, full, _process_env(cmd.env, ws.request.getfixturevalue("compile_cache")), full)
  workdir = Path(_flag(argv, "workdir"))
  stages = sorted(p for p in workdir.glob("stage-*") if p.is_dir())
  if not stages or not (workdir / "results.csv").exists():
    _fail(ws, "0, but no stage folders or no results.csv", full, output)
  for stage in stages:
    _check_run_folder(ws, str(stage), full, output)


def run_sweep_script(ws: Workspace, cmd: Command) -> None:
  """scripts/sweep.py: the sweep config's `smoke` arg (every point, a few steps each).

  `--list` and `--print_commands` run as written (they train nothing); a run must leave
  DIR/results.csv with a row per point. Variants that shrink to the same smoke run
  (runlocal, the full grid) run once.
  """
  argv = _smoke_argv(ws, cmd, ws.substitute(cmd.argv), "a sweep config", "sweep")
  if argv is None:
    return
  env = _process_env(cmd.env, ws.request.getfixturevalue("compile_cache"))
  full = _python(argv)
  output = _run(ws, full, env, full)
  if "--list" in argv or "--print_commands" in argv:
    if not output.strip():
      _fail(ws, "0, but it printed nothing", full, output)
    return
  results = Path(_flag(argv, "workdir")) / "results.csv"
  if not results.exists() or len(results.read_text().splitlines()) < 2:
    _fail(ws, "0, but no results.csv with a row per point", full, output)


BENCH_SHRINK = {
  "scripts/bench_ssd.py": "--lengths 64 --heads 2 --head_dim 16 --d_state 8 --chunk 16 "
  "--block 16 --batch 1 --repeats 1 --sequential_max 64",
  "scripts/bench_attention_blocks.py": "--seq_len 256 --block 64 --heads 2 --head_dim 16",
  # On CPU it checks its arguments and says it needs an accelerator.
  "scripts/gpu_check.py": "--seq_len 128 --blocks 32 --groups 1",
}


def run_bench(ws: Workspace, cmd: Command) -> None:
  """Benchmarks with size flags run tiny; scripts/bench.py has none: its argv parses, imports."""
  argv = ws.substitute(cmd.argv)
  env = _process_env(cmd.env, None)
  if argv[1] in BENCH_SHRINK:
    full = _python(argv + BENCH_SHRINK[argv[1]].split())
  else:
    ws.notes.append(f"{argv[1]} has no size flags: only its arguments and imports are checked")
    full = _python(argv + ["--help"])
  _run(ws, full, env, full)


def run_make(ws: Workspace, cmd: Command) -> None:
  """`make X` as `make -n X`: the target exists and expands (the real `make test` would recurse)."""
  full = ["make", "-n", *cmd.argv[1:]]
  env = {**os.environ, **cmd.env}
  result = subprocess.run(
    full, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
  )
  if result.returncode != 0:
    _fail(ws, result.returncode, full, result.stdout + result.stderr)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Commands whose program matches `program` (fnmatch patterns for argv[0], argv[1], ...)."""

  program: tuple[str, ...]
  run: Callable[[Workspace, Command], None]


RULES = (
  Rule(("make",), run_make),
  Rule(("python", "scripts/train.py"), run_train),
  Rule(("python", "scripts/eval.py"), run_eval),
  Rule(("python", "scripts/sweep.py"), run_sweep_script),
  Rule(("python", "scripts/convert_hf.py"), run_convert),
  Rule(("python", "scripts/bench*.py"), run_bench),
  Rule(("python", "scripts/gpu_check.py"), run_bench),
)


def _program(argv: list[str]) -> list[str]:
  head = list(argv[:2])
  if head and re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", head[0]):
    head[0] = "python"
    if len(head) > 1:
      head[1] = os.path.normpath(head[1])
  return head


def run_command(ws: Workspace, cmd: Command) -> None:
  ws.current = cmd
  program = _program(cmd.argv)
  for rule in RULES:
    if len(program) >= len(rule.program) and all(
      fnmatch.fnmatchcase(part, pattern)
      for part, pattern in zip(program, rule.program, strict=False)
    ):
      rule.run(ws, cmd)
      return
  pytest.fail(
    f"README.md:{cmd.line}: no rule runs `{cmd.text}` (program {' '.join(program)}); add one to "
    f"RULES in {Path(__file__).name} that runs it on tiny settings",
    pytrace=False,
  )


# --- python snippets -------------------------------------------------------------------------


def run_python_block(ws: Workspace, block: Block) -> None:
  """Execs a snippet with its free names bound to small arrays and "path/to/X" to tmp folders.

  "path/to/...hf..." is the tiny Hugging Face checkpoint; any other "path/to/X" is a fresh
  folder, and one that the snippet fills with a config.json must load in transformers.
  """
  outputs = []

  def path(match: re.Match) -> str:
    name = match.group(2)
    if "hf" in name.lower():
      return repr(ws.hf_folder())
    outputs.append(ws.fresh(name))
    return repr(outputs[-1])

  source = re.sub(r"([\"'])path/to/([^\"']+)\1", path, block.text)
  tree = ast.parse(source)
  namespace: dict = {"__name__": "__readme__"}
  for name in sorted(free_names(tree)):
    value = placeholder_value(name)
    if value is None:
      pytest.fail(
        f"README.md:{block.line}: the snippet uses `{name}`, which it does not define and no "
        f"rule provides; add it to placeholder_value in {Path(__file__).name}",
        pytrace=False,
      )
    namespace[name] = value
  exec(compile(source, f"README.md:{block.line}", "exec"), namespace)
  for out in outputs:
    if (Path(out) / "config.json").exists():
      import transformers

      transformers.AutoModelForCausalLM.from_pretrained(out)


# --- the tests ---------------------------------------------------------------------------------


def test_bash_blocks_parse_like_a_shell():
  """Continuations join, comments go, an env prefix is kept, `[--flag]` runs, `[--k V]` not."""
  text = (
    "# a comment line\n"
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/train.py \\\n"
    "    --config ... --x='a b#c'   # trailing comment\n"
    "\n"
    "python scripts/convert_hf.py --to hf --src A --dst B [--verify] [--step N]\n"
  )
  first, second = bash_commands(Block("h", "bash", 10, text))
  assert first.line == 11 and first.env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert first.argv == ["python", "scripts/train.py", "--config", "...", "--x=a b#c"]
  assert second.line == 14 and second.argv[-1] == "--verify" and "--step" not in second.argv
  blocks = readme_blocks("# t\n```bash\nmake x\n```\n## Sec\n```python\nx = 1\n```\n```\nno\n```\n")
  assert [(b.heading, b.lang, b.line, b.text) for b in blocks] == [
    ("top", "bash", 3, "make x"),
    ("Sec", "python", 7, "x = 1"),
  ]


def test_a_command_without_a_rule_fails_and_asks_for_one(tmp_path, request):
  ws = Workspace(Block("h", "bash", 1, ""), tmp_path, request)
  with pytest.raises(pytest.fail.Exception, match="no rule runs `frobnicate --all`.*add one"):
    run_command(ws, Command(3, "frobnicate --all", {}, ["frobnicate", "--all"]))


def test_readme_has_bash_and_python_blocks():
  langs = {param.values[0].lang for param in BLOCKS}
  assert langs == {"bash", "python"}, f"README.md code blocks found: {langs or 'none'}"


@pytest.mark.parametrize("block", BLOCKS)
def test_readme_block_runs(block: Block, tmp_path, request, monkeypatch):
  monkeypatch.chdir(ROOT)  # as a reader runs them: relative paths are the repository's
  ws = Workspace(block, tmp_path, request)
  if block.lang == "python":
    run_python_block(ws, block)
    return
  commands = bash_commands(block)
  assert commands, f"README.md:{block.line}: a bash block with no command"
  for cmd in commands:
    start = time.perf_counter()
    run_command(ws, cmd)
    ws.notes.append(f"{time.perf_counter() - start:6.1f} s  README.md:{cmd.line} {cmd.text}")
  for note in ws.notes:
    print(note)
