"""What every `scripts/*.py` entry point shares: config flags that fail in one line.

ml_collections' flag parser raises a bare `AttributeError: "'path'"` traceback for an
override of a field that does not exist, and a config file whose `:ARGS` are wrong
fails inside absl's flag parsing. `run(main)` checks the config flags first
(`lcjax.config.check_override_flags`) and prints `error: <one sentence>` with exit
status 2, the convention of every lcjax script, before absl parses anything.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app

from lcjax.config import ConfigError, check_override_flags

__all__ = ["fail", "run"]


def fail(message: str, status: int = 2) -> int:
  """Prints `error: message` to stderr and returns `status` (for `return fail(...)`)."""
  print(f"error: {message}", file=sys.stderr)
  return status


def run(main: Callable[[list[str]], int], *, config_flags: Sequence[str] = ("config",)) -> None:
  """`absl.app.run(main)` after checking the `--config.*` flags; exits with main's status."""
  try:
    for flag in config_flags:
      check_override_flags(sys.argv[1:], flag)
  except ConfigError as e:
    sys.exit(fail(str(e)))
  app.run(lambda argv: sys.exit(main(argv)))
