"""The one training loop, its state, objectives, optimizers, schedules and checkpoints."""
from jaxrobust.train.loop import (RunSetup, TrainedRun, build_dataset, build_model, build_run,
                                  build_threat, create_train_state, load_config, load_trained,
                                  make_update_fn, train)
from jaxrobust.train.objectives import (Objective, ObjectiveContext, ObjectiveOutput, get_objective,
                                        list_objectives, register)
from jaxrobust.train import adversarial  # noqa: F401  (registers trades, mart, awp, awp_at, awp_trades)
from jaxrobust.train import certified  # noqa: F401  (registers plain, at, kw, ibp, crown_ibp, mmr*, [li]per*, sabr, mtl_ibp)
from jaxrobust.train import fast_at  # noqa: F401  (registers at, fgsm_rs, fgsm_ga, nfgsm, atta, atas, free, yopo)
from jaxrobust.train import reweight  # noqa: F401  (registers at_rw, atta_rw, iat, sat)
from jaxrobust.train.schedules import make_scalar_schedule
from jaxrobust.train.state import TrainState

__all__ = ["train", "load_trained", "load_config", "TrainedRun", "TrainState", "register",
           "Objective", "ObjectiveOutput", "get_objective", "list_objectives", "ObjectiveContext",
           "build_dataset", "build_model", "build_threat", "build_run", "RunSetup",
           "create_train_state", "make_update_fn", "make_scalar_schedule"]
