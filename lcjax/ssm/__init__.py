"""State space models: the Mamba-2 SSD layer math (`lcjax.ssm.ssd`, Dao & Gu 2024) and the
training-free state-collapse mitigations of Chen et al. 2024, "Stuffed Mamba" §5
(`lcjax.ssm.mitigations`)."""

from __future__ import annotations

from lcjax.ssm.mitigations import (
  forget_more_remember_less,
  ssd_states,
  ssd_windowed,
  window_log_decay,
  window_state_difference,
)
from lcjax.ssm.ssd import normalize_state, segsum, ssd_chunked, ssd_sequential, ssd_step

__all__ = [
  "segsum",
  "ssd_chunked",
  "ssd_sequential",
  "ssd_step",
  "normalize_state",
  "forget_more_remember_less",
  "ssd_states",
  "ssd_windowed",
  "window_log_decay",
  "window_state_difference",
]
