"""Shared infrastructure: configs, mesh and rules, trainer, checkpoints."""

from jaxlib_models.core.checkpoint import Checkpointer, CheckpointError
from jaxlib_models.core.config import ConfigError, apply_overrides, load_config
from jaxlib_models.core.mesh import DEFAULT_RULES, make_mesh
from jaxlib_models.core.trainer import Task, TrainConfig, train
from jaxlib_models.core.train_state import TrainState

__all__ = [
    "Checkpointer", "CheckpointError", "ConfigError", "apply_overrides",
    "load_config", "DEFAULT_RULES", "make_mesh", "Task", "TrainConfig",
    "train", "TrainState",
]
