"""The configuration schema shared by every experiment (override any field with --config.a.b=v)."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.distributed = False  # multi-host: jax.distributed.initialize() (see BUILD.md)
    c.imports = ()  # modules to import first (e.g. ones registering objectives): --config.imports=my_pkg.my_objectives
    c.allow_config_changes = False  # resume a workdir although non-resumable keys changed (jaxrobust/train/workdir.py)

    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist5k"
    c.data.data_dir = ""  # TFDS data_dir or local directory; "" = default location
    c.data.batch_size = 128
    c.data.eval_batch_size = 500
    c.data.val_fraction = 0.0  # stratified validation split carved from train
    c.data.split_seed = 0
    c.data.augment = "none"  # or "crop_flip" (pad-4 random crop + horizontal flip, on device)
    c.data.pixel_range = (0.0, 1.0)

    c.model = ml_collections.ConfigDict()
    c.model.name = "fc1"
    c.model.normalize = True  # dataset mean/std inside the model
    c.model.kwargs = ml_collections.ConfigDict()

    c.threat = ml_collections.ConfigDict()
    c.threat.norm = "linf"
    c.threat.eps = 0.1
    c.threat.box = (0.0, 1.0)

    c.objective = ml_collections.ConfigDict()
    c.objective.name = "pgd_at"
    c.objective.attack = ml_collections.ConfigDict()
    c.objective.attack.steps = 10
    c.objective.attack.step_size = -1.0  # <= 0: 2.5 * eps / steps
    c.objective.attack.scale_step_with_eps = True  # keep step/eps fixed while eps is ramped
    c.objective.attack.restarts = 1
    c.objective.attack.random_start = True
    c.objective.attack.loss = "ce"
    c.objective.attack.bn_mode = "eval"  # BN statistics used while the attack runs
    c.objective.eps_schedule = ml_collections.ConfigDict()
    c.objective.eps_schedule.name = "constant"  # constant | linear | cosine
    c.objective.eps_schedule.ramp_epochs = 0.0
    c.objective.eps_schedule.start_fraction = 0.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd | adam | adamw
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 5e-4
    c.optimizer.wd_skip_bn_bias = True
    c.optimizer.clip_norm = 0.0

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "multistep"  # constant | multistep | cosine | cyclic | linear
    c.schedule.warmup_epochs = 0.0
    c.schedule.milestones = (0.5, 0.75)  # fractions of training (<= 1) or epochs (> 1)
    c.schedule.gamma = 0.1
    c.schedule.final_fraction = 0.0
    c.schedule.peak_fraction = 0.4

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 10.0
    c.train.num_steps = -1  # > 0 overrides num_epochs
    c.train.log_every = 50
    c.train.eval_every_epochs = 1.0  # 0 disables periodic evaluation
    c.train.checkpoint_every_steps = -1  # <= 0: every epoch
    c.train.keep_checkpoints = 3
    c.train.stop_after_steps = -1  # > 0: checkpoint and stop there (used to test resumption)
    c.train.tensorboard = True

    c.eval = ml_collections.ConfigDict()
    c.eval.splits = ("test",)
    c.eval.num_examples = -1  # <= 0: the whole split
    c.eval.attack = ml_collections.ConfigDict()
    c.eval.attack.steps = 20
    c.eval.attack.step_size = -1.0
    c.eval.attack.restarts = 1
    c.eval.attack.random_start = True
    c.eval.attack.loss = "ce"
    return c
