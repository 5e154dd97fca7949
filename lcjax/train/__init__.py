"""Training: the loop, the step, optimizer, checkpoints and run outputs."""

from lcjax.train.config import base_config, validate_config
from lcjax.train.loop import TrainingDiverged, build_run_model, train

__all__ = ["base_config", "validate_config", "train", "build_run_model", "TrainingDiverged"]
