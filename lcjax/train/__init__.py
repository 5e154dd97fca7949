"""Training: the loop, the step, optimizer, checkpoints and run outputs."""

from lcjax.train.config import base_config, validate_config
from lcjax.train.loop import TrainingDiverged, train
from lcjax.train.run_model import build_run_model, load_run_params, model_config_for_run

__all__ = [
  "base_config",
  "validate_config",
  "train",
  "build_run_model",
  "load_run_params",
  "model_config_for_run",
  "TrainingDiverged",
]
