"""State space models: the Mamba-2 SSD layer math (`lcjax.ssm.ssd`)."""

from __future__ import annotations

from lcjax.ssm.ssd import segsum, ssd_chunked, ssd_sequential, ssd_step

__all__ = ["segsum", "ssd_chunked", "ssd_sequential", "ssd_step"]
