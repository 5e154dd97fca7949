"""Progress feedback: a one-line bar on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import os
import sys
import time

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
  """H:MM:SS, or MM:SS under an hour (progress lines, ETAs)."""
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
  """Shows step, loss, tokens/s and ETA; plain lines every `every` steps when not a TTY."""

  def __init__(self, total: int, start: int, *, every: int, stream=None, quiet: bool = False):
    self.total, self.start, self.every = total, start, max(every, 1)
    self.stream = open(os.devnull, "w") if quiet else (stream or sys.stdout)  # noqa: SIM115
    self.tty = self.stream.isatty()
    self.t0 = time.time()

  def update(self, step: int, loss: float, tokens_per_sec: float) -> None:
    done = step - self.start
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = format_duration((self.total - step) / rate) if rate > 0 else "?"
    text = f"step {step}/{self.total} loss {loss:.4f} {tokens_per_sec:,.0f} tok/s eta {eta}"
    if self.tty:
      width = 24
      filled = int(width * step / max(self.total, 1))
      bar = "#" * filled + "-" * (width - filled)
      self.stream.write(f"\r[{bar}] {text}")
      if step >= self.total:
        self.stream.write("\n")
      self.stream.flush()
    elif step % self.every == 0 or step >= self.total:
      self.stream.write(text + "\n")
      self.stream.flush()

  def message(self, text: str) -> None:
    if self.tty:
      self.stream.write("\n")
    self.stream.write(text + "\n")
    self.stream.flush()
