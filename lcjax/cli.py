"""What every `scripts/*.py` entry point shares: config flags that fail in one line.

ml_collections' flag parser raises a bare `AttributeError: "'path'"` traceback for an
override of a field that does not exist, and a config file whose `:ARGS` are wrong
fails inside absl's flag parsing. `run(main)` checks the config flags first
(`lcjax.config.check_override_flags`) and prints `error: <one sentence>` with exit
status 2, the convention of every lcjax script, before absl parses anything; the same
one line ends a `main` that raises ConfigError or FileNotFoundError (a bad config or a
missing file), or one of the script's own `errors` (e.g. TrainingDiverged, status 3).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

from absl import app

from lcjax.config import ConfigError, check_override_flags

__all__ = ["fail", "run"]


def fail(message: str, status: int = 2) -> int:
  """Prints `error: message` to stderr and returns `status` (for `return fail(...)`)."""
  print(f"error: {message}", file=sys.stderr)
  return status


def run(
  main: Callable[[list[str]], int],
  *,
  config_flags: Sequence[str] = ("config",),
  errors: Mapping[type[Exception], int] | None = None,
) -> None:
  """`absl.app.run(main)` after checking the `--config.*` flags; exits with main's status.

  ConfigError and FileNotFoundError from `main` print `error: <message>` and exit 2;
  `errors` maps further exception types to their exit status.
  """
  try:
    for flag in config_flags:
      check_override_flags(sys.argv[1:], flag)
  except ConfigError as e:
    sys.exit(fail(str(e)))
  statuses = {ConfigError: 2, FileNotFoundError: 2, **(errors or {})}

  def guarded(argv: list[str]) -> None:
    try:
      status = main(argv)
    except tuple(statuses) as e:
      status = fail(str(e), next(v for k, v in statuses.items() if isinstance(e, k)))
    sys.exit(status)

  app.run(guarded)
