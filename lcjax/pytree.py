"""Small pytree helpers shared across packages."""

from __future__ import annotations

__all__ = ["path_str"]


def path_str(path) -> str:
  """'layers/0/self_attn/q_proj/kernel' for a jax key path."""
  parts = []
  for key in path:
    parts.append(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))))
  return "/".join(parts)
