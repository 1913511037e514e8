"""The one training loop, its state, objectives, optimizers, ε schedules and checkpoints."""
from jaxrobust.train.loop import (TrainedRun, build_dataset, build_model, build_threat, load_config,
                                  load_trained, train)
from jaxrobust.train.objectives import ObjectiveContext, get_objective, list_objectives, register
from jaxrobust.train.state import TrainState

__all__ = ["train", "load_trained", "load_config", "TrainedRun", "TrainState", "register",
           "get_objective", "list_objectives", "ObjectiveContext", "build_dataset", "build_model",
           "build_threat"]
