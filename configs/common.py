"""The configuration schema shared by every experiment (override any field with --config.a.b=v).

This file is the one place where defaults live: the library reads every field directly and fills the
fields a stored or hand-written config lacks from here (:func:`with_defaults`).
"""
import ml_collections


def schedule_config(name: str = "constant", **overrides) -> ml_collections.ConfigDict:
    """A scalar schedule (see jaxrobust/train/schedules.py): lr, ε, and named method schedules."""
    s = ml_collections.ConfigDict()
    s.name = name  # constant | linear | cosine | multistep | exponential | cyclic | periodic
    s.value = 1.0  # base value (named method schedules only; lr/ε take optimizer.lr/threat.eps)
    s.warmup_epochs = 0.0  # linear warm-up from 0
    s.ramp_epochs = 0.0  # linear/cosine: duration (<= 0: the whole run after the warm-up)
    s.start_fraction = 0.0  # linear/cosine/exponential/periodic start, as a fraction of the value
    s.final_fraction = 1.0  # ... and end (exponential: cap/floor)
    s.milestones = (0.5, 0.75)  # multistep: fractions of training (<= 1) or epochs (> 1)
    s.gamma = 0.1  # multistep factor
    s.rate = 1.0  # exponential: factor per epoch
    s.peak_fraction = 0.4  # cyclic: where the peak is
    s.period_epochs = 1.0  # periodic: restart period
    for k, v in overrides.items():
        s[k] = v
    return s


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
    # ε(step) = schedule of threat.eps (thesis §4.2.4); ctx.schedules['eps'] in objectives.
    c.objective.eps_schedule = schedule_config("constant")
    # Named scalar schedules a method declares (κ, β of CROWN-IBP, λ, α ...): name -> schedule_config
    # with its base `value`; ctx.schedules[name] in objectives.
    c.objective.schedules = ml_collections.ConfigDict()
    # trades / mart / awp* (jaxrobust/train/adversarial.py): KL weight β (objective.schedules.beta
    # overrides it), EMA of the weights in extra['ema'] (0 = off), AWP relative size γ and base method.
    c.objective.beta = 6.0
    c.objective.ema_decay = 0.0
    c.objective.awp = ml_collections.ConfigDict()
    c.objective.awp.gamma = 5e-3
    c.objective.awp.base = "pgd_at"  # objective 'awp': pgd_at (or at) | trades | mart
    c.objective.awp.warmup_epochs = 0.0  # epochs without the weight perturbation first
    # Certified training (jaxrobust/train/certified.py): PER eq 3.20 (α, C, constant β), Alg 3.6's
    # subsample B' (also MMR's; <= 0: the whole batch), MMR (Croce et al. 2019), SABR λ, MTL-IBP α.
    # Named schedules: kappa (ibp, crown_ibp), crown_beta (crown_ibp); per_beta, mmr_lambda and
    # mtl_alpha, when configured as schedules, override the constants here.
    c.objective.certified = ml_collections.ConfigDict()
    c.objective.certified.per_alpha = 0.15
    c.objective.certified.per_beta = 0.1
    c.objective.certified.per_c = 4
    c.objective.certified.subsample = 0
    c.objective.certified.mmr_gamma_b = 0.15
    c.objective.certified.mmr_gamma_d = 0.15
    c.objective.certified.mmr_k_b = 100
    c.objective.certified.mmr_lambda = 0.5
    c.objective.certified.sabr_lambda = 0.4
    c.objective.certified.mtl_alpha = 0.5
    # Shi et al. 2021 (ibp, crown_ibp, sabr, mtl_ibp): IBP initialisation of the hidden kernels, and the
    # warm-up regularisers (bound tightness + ReLU balance) with weight warmup_reg·(1 - ε(t)/ε)
    # (0 = off; their λ = 0.5) and tolerance τ = warmup_tol.
    c.objective.certified.ibp_init = False
    c.objective.certified.warmup_reg = 0.0
    c.objective.certified.warmup_tol = 0.5
    # Fast AT (jaxrobust/train/fast_at.py, thesis §5.2): steps are fractions of ε.
    c.objective.fast = ml_collections.ConfigDict()
    c.objective.fast.fgsm_step = 1.25  # fgsm_rs: α = 1.25ε (Wong et al. 2020)
    c.objective.fast.fgsm_ga_step = 1.0  # fgsm_ga: FGSM step from x
    c.objective.fast.ga_lambda = 0.2  # fgsm_ga: GradAlign λ (objective.schedules.ga_lambda overrides)
    c.objective.fast.nfgsm_noise = 2.0  # nfgsm: η ~ U(-2ε, 2ε)
    c.objective.fast.nfgsm_step = 1.0  # nfgsm: α = ε, no projection onto the ε-ball
    c.objective.fast.atta_step = 0.5  # atta: α = 4/255 at ε = 8/255 (ATTA-1)
    c.objective.fast.cache_steps = 1  # atta: attack steps per update from the cached start
    c.objective.fast.atas_rule = "released"  # atas: 'thesis' (eq. 5.16) | 'released' (clamped)
    c.objective.fast.atas_c = 0.01  # atas: C of eq. 5.16 / c of the released rule (ImageNet 0.1)
    c.objective.fast.atas_beta = 0.5  # atas: β of eq. 5.15
    c.objective.fast.atas_alpha = 2.0  # atas: α_i = 2ε at v = 0 (γ/C = 16/255 at 8/255)
    c.objective.fast.atas_min_step = 0.5  # atas 'released': α_i >= 0.5ε (4/255 at 8/255)
    c.objective.fast.atas_max_step = 1.75  # atas 'released': α_i <= 1.75ε (14/255 at 8/255)
    c.objective.fast.atas_warmup_epochs = 0  # atas: released code: 5 epochs of a constant step
    c.objective.fast.atas_warmup_step = 1.0  # ... of ε, v not updated
    c.objective.fast.cache_reset_at = ()  # 1-based epochs whose visits restart from U(ball) (released: 10, 20)
    c.objective.fast.free_replays = 8  # free: m
    c.objective.fast.yopo_m = 5  # yopo: YOPO-m-n
    c.objective.fast.yopo_n = 3
    c.objective.fast.yopo_step = 0.25  # yopo: σ = 2/255 at ε = 8/255
    c.objective.fast.cache_resolution = 0  # atta/atas/free: store δ at RxR (0 = full; ImageNet 32)
    c.objective.fast.cache_dtype = "float32"  # or "bfloat16"

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd | adam | adamw
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 5e-4
    c.optimizer.wd_skip_bn_bias = True
    c.optimizer.clip_norm = 0.0  # global norm over the trainable parameters
    # Parameter groups: label -> ConfigDict(pattern, lr_scale, weight_decay). A parameter whose path
    # ('Dense_0/kernel') matches `pattern` (re.search; "" = none) gets the label; labels may also come
    # from the objective (e.g. 'scores' of pruning). weight_decay < 0 = the optimizer's. The label
    # 'frozen' (or freeze=True) is never updated (optax.set_to_zero) and never decayed.
    c.optimizer.param_groups = ml_collections.ConfigDict()

    # Learning-rate schedule of optimizer.lr: decays from start_fraction=1 to final_fraction=0.
    c.schedule = schedule_config("multistep", start_fraction=1.0, final_fraction=0.0)

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 10.0
    c.train.num_steps = -1  # > 0 overrides num_epochs
    c.train.log_every = 50
    c.train.eval_every_epochs = 1.0  # 0 disables periodic evaluation
    c.train.checkpoint_every_steps = -1  # <= 0: every epoch
    c.train.keep_checkpoints = 3
    c.train.tensorboard = True
    # Catastrophic-overfitting monitor (jaxrobust/train/monitors.py): FGSM/PGD accuracy on a fixed
    # held-out batch every `every_epochs`; a collapse (PGD accuracy `drop` below its best while FGSM
    # accuracy rises) is logged + warned; the best-PGD state is kept in WORKDIR/best_pgd.
    c.train.monitor = ml_collections.ConfigDict()
    c.train.monitor.enabled = False
    c.train.monitor.every_epochs = 1.0
    c.train.monitor.split = ""  # "" = 'val' (data.val_fraction > 0) if present, else 'test'
    c.train.monitor.num_examples = 512
    c.train.monitor.pgd_steps = 10
    c.train.monitor.pgd_restarts = 1
    c.train.monitor.drop = 0.2
    c.train.monitor.gap = 0.5  # also a collapse: FGSM accuracy > PGD accuracy + gap (0 = off)
    c.train.monitor.keep_best = True
    c.train.monitor.stop_on_collapse = False

    # Periodic adversarial scheduling (jaxrobust/train/pas.py, thesis §4.2.4): the ends of the training
    # periods in epochs, or fractions of the run when every value is <= 1 (the last one = the end of
    # the run); () = off. The schedules named in `restart` ('lr', 'eps' or objective.schedules names)
    # restart at each period start, scaled to the period's length; the variables at each period end
    # are kept in RUN/pas/ and the run's model is their ensemble (averaged softmax), evaluated with
    # load_trained(workdir, weights='pas_ensemble') / experiments.evaluate --config.weights=pas_ensemble.
    c.pas = ml_collections.ConfigDict()
    c.pas.periods = ()
    c.pas.restart = ("lr", "eps")

    c.eval = ml_collections.ConfigDict()
    c.eval.splits = ("test",)
    c.eval.num_examples = -1  # <= 0: the whole split
    c.eval.attack = ml_collections.ConfigDict()
    c.eval.attack.steps = 20
    c.eval.attack.step_size = -1.0
    c.eval.attack.restarts = 1
    c.eval.attack.random_start = True
    c.eval.attack.loss = "ce"

    # Robust overfitting toolkit (thesis §4.3; owner "overfit"): instance difficulty (eq. 4.30) tracked
    # at no extra forward pass (jaxrobust/train/difficulty.py), periodic per-instance evaluations and
    # groups G0..G9, easy/random/hard subsets and extra data (jaxrobust/data/subsets.py), fine-tuning
    # from a pre-trained run (jaxrobust/train/references.py), IAT / SAT / Alg. 4.1 (train/reweight.py).
    c.train.difficulty = ml_collections.ConfigDict()
    c.train.difficulty.enabled = False  # RUN/difficulty.npy, instance_stats.npz, difficulty.json
    c.train.instance_eval = ml_collections.ConfigDict()
    c.train.instance_eval.sources = ()  # "[dataset@]split:clean|fgsm|pgd", e.g. ("train:pgd", "test:clean")
    c.train.instance_eval.every_epochs = 1.0
    c.train.instance_eval.num_examples = -1  # per source, a seeded subset (<= 0: the whole split)
    c.train.instance_eval.seed = 0
    c.train.instance_eval.groups_reference = ""  # run whose difficulty.npy defines G0..G9 (groups.jsonl)
    c.train.init_from = ""  # workdir of a pre-trained run (relative: to this workdir) to start from
    c.train.init_from_config = ""  # its config (configs/x.py:arg): trained first when missing
    c.data.subset = ml_collections.ConfigDict()
    c.data.subset.kind = ""  # "" (whole set) | easy | random | hard
    c.data.subset.size = 0
    c.data.subset.reference = ""  # workdir of the run whose difficulty ranks the examples (relative: to this workdir)
    c.data.subset.reference_config = ""  # its config (configs/x.py:arg): trained first when missing
    c.data.subset.class_balanced = True  # the thesis's "easiest 1000 of each class"
    c.data.subset.seed = 0  # 'random' subsets
    c.data.extra = ml_collections.ConfigDict()
    c.data.extra.source = ""  # "" | "rest" (what data.subset left out) | a dataset name: half of every batch
    c.data.extra.split = "train"
    c.data.extra.size = -1  # <= 0: all of it (a seeded subset otherwise)
    c.data.extra.seed = 0
    c.objective.rw = ml_collections.ConfigDict()  # at_rw / atta_rw: Alg. 4.1; finetuning: RW + KL
    c.objective.rw.reweight = True  # w_i = softmax(f(x'_i))_{y_i}, normalised over the batch
    c.objective.rw.rho = 0.9  # moving-average momentum of the adaptive target t~ (1 = never updated)
    c.objective.rw.beta = 0.1  # t = β·1_y + (1 − β)·t~ (1 = one-hot targets)
    c.objective.rw.warmup_epochs = 5.0  # one-hot targets before (t~ is updated meanwhile)
    c.objective.rw.kl_lambda = 0.0  # λ of the KL(o‖o') term (Table 4.7: 6)
    c.objective.iat = ml_collections.ConfigDict()  # iat: Balaji et al. 2019 instance-adaptive ε
    c.objective.iat.gamma = 0.25  # step of ε_i, as a fraction of threat.eps (1.9/255 at 8/255)
    c.objective.iat.beta = 0.5  # ε_i ← β ε_i + (1 − β) ε_i^new
    c.objective.iat.warmup_epochs = 5.0  # uniform ε before
    c.objective.iat.init_fraction = 1.0  # ε_i at the end of the warm-up (fraction of threat.eps)
    c.objective.sat = ml_collections.ConfigDict()  # sat: Huang et al. 2020 self-adaptive training
    c.objective.sat.momentum = 0.9  # t_i ← α t_i + (1 − α) softmax(f(x_i))
    c.objective.sat.warmup_epochs = 5.0  # E_s: one-hot targets and no update before
    # Robust binary sub-networks (jaxrobust/pruning, thesis §5.1; owner: prune). Functions called once
    # after a run's final checkpoint and evaluation, before summary.json ("module:function", with
    # (config, workdir, variables); pruning runs write RUN/export/ with
    # "jaxrobust.pruning.export:export_run"). model.name='subnet' takes subnet_kwargs() below.
    c.train.finish_hooks = ()
    # accel (issue #17): mixed precision and several seeds in one program.
    # model.dtype: 'float32' | 'bfloat16' (bf16 convs/dense/activations; parameters, optimizer state,
    # loss, softmax and BN statistics float32; bounds/certification always float32).
    c.model.dtype = "float32"
    return c


def subnet_kwargs(base: str = "cnn_small", **overrides) -> ml_collections.ConfigDict:
    """``model.kwargs`` of ``model.name='subnet'`` (jaxrobust/pruning/subnet.py, thesis §5.1): the zoo
    model ``base`` with score-masked conv/dense kernels (owner: prune)."""
    k = ml_collections.ConfigDict()
    k.base = base  # the zoo model whose kernels are pruned
    k.base_kwargs = ml_collections.ConfigDict()  # its own kwargs (w, widths, ...)
    k.keep_rate = 0.01  # 1 - r: the thesis's pruning rate r = 0.99 keeps 1%
    k.gamma = 0.1  # eq 5.11: m_i / n_i^γ = const (1 = fixed rate, 0 = fixed number)
    k.rounding = "exact"  # keep counts: exact (sum = budget) | released (the authors' code)
    k.min_keep = 1  # every layer keeps at least this many weights (exact rounding)
    k.weight_init = "binary"  # binary (±1, §5.1.3) | signed_kaiming_constant | base | pretrained
    k.score_init = "uniform"  # uniform U[-a, a] | fan_uniform U[±a/√fan_in] | magnitude (HYDRA) | pretrained
    k.score_scale = 0.01  # a of Table 5.3
    k.last_bn = True  # LBN: non-affine 1-D BatchNorm over the logits (§5.1.3)
    k.weights_from = ""  # a run's workdir whose final weights are θ (weight_init='pretrained'; HYDRA)
    k.scores_from = ""  # a subnet run's workdir whose scores are copied (score_init='pretrained')
    for key, v in overrides.items():
        k[key] = v
    return k


def subnet_model(c, base: str, base_kwargs=None, *, train: str = "scores", export: bool = True,
                 **overrides) -> ml_collections.ConfigDict:
    """Makes ``c`` a pruning run of ``base``: model 'subnet' with :func:`subnet_kwargs`, the frozen
    optimizer group (``train='scores'``: weights frozen, edge-popup; ``'weights'``: scores frozen, the
    mask fixed, HYDRA's fine-tuning) and, with ``export``, the RUN/export/ finish hook."""
    if train not in ("scores", "weights"):
        raise ValueError(f"subnet_model train={train!r}; expected 'scores' or 'weights'.")
    c.model.name = "subnet"
    c.model.kwargs = subnet_kwargs(base, **overrides)
    for key, v in (base_kwargs or {}).items():
        c.model.kwargs.base_kwargs[key] = v
    frozen = "^weights/" if train == "scores" else "^scores/"
    c.optimizer.param_groups.frozen = param_group_config(frozen, freeze=True)
    c.train.finish_hooks = ("jaxrobust.pruning.export:export_run",) if export else ()
    return c


def param_group_config(pattern: str = "", lr_scale: float = 1.0, weight_decay: float = -1.0,
                       freeze: bool = False) -> ml_collections.ConfigDict:
    """One optimizer parameter group (see ``optimizer.param_groups``)."""
    return ml_collections.ConfigDict(dict(pattern=pattern, lr_scale=float(lr_scale),
                                          weight_decay=float(weight_decay), freeze=bool(freeze)))


def _fill(cfg, defaults, path=""):
    for k, v in defaults.items():
        if k not in cfg:
            cfg[k] = v
        elif isinstance(v, ml_collections.ConfigDict) and isinstance(cfg[k], ml_collections.ConfigDict):
            _fill(cfg[k], v, path + k + ".")


def with_defaults(config) -> ml_collections.ConfigDict:
    """A copy of ``config`` with every missing field filled from :func:`base_config` (also inside the
    named schedules and parameter groups), so the library can read fields directly."""
    cfg = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    _fill(cfg, base_config())
    for sched in cfg.objective.schedules.values():
        _fill(sched, schedule_config())
    for group in cfg.optimizer.param_groups.values():
        _fill(group, param_group_config())
    return cfg


# ----------------------------------------------------------------------------- table reproduction
def reproduce_config(name: str, title: str = "", columns=(), seeds: str = "0",
                     row_header: str = "Method", decimals: int = 2, claims: str = "",
                     notes: str = "") -> ml_collections.ConfigDict:
    """A table's row set for ``python -m experiments.reproduce`` (see experiments/reproduce.py):
    ``columns`` = ((label, "file.json:key.path[*scale]"[, decimals]), ...); add rows with :func:`reproduce_row`
    and evaluations with :func:`reproduce_step`. ``claims`` = "module:function" taking
    ``{row: {column label: mean}}`` and returning ``[{'claim', 'holds', 'evidence'}]``."""
    c = ml_collections.ConfigDict()
    r = c.reproduce = ml_collections.ConfigDict()
    r.name = name  # D/<name>.md, D/<name>.json
    r.title = title
    # (label, source) or (label, source, decimals); decimals default to `decimals`
    r.columns = tuple((str(col[0]), str(col[1])) + tuple(int(d) for d in col[2:3]) for col in columns)
    r.seeds = str(seeds)  # comma-separated: "0,1,2"
    r.row_header = row_header
    r.decimals = int(decimals)
    r.claims = claims
    r.notes = notes
    r.only = ""  # comma-separated row names: run only these
    r.dry_run = False  # print the commands instead of running them
    r.rows = ml_collections.ConfigDict()
    r.order = ()  # row names in the order they were added (ConfigDict iterates its keys sorted)
    r.steps = ml_collections.ConfigDict()
    return c


def reproduce_row(c, name: str, train: str, *, label: str = "", thesis=(), overrides=(),
                  steps: str = "") -> None:
    """Row ``name`` trained by ``train`` ("configs/x.py:arg") with ``overrides`` ("a.b=v"; ``{root}``
    and ``{seed}`` are replaced by the table's directory and the seed), the thesis's values aligned with
    the columns (None where the thesis has none), and the steps to run ("" = all, "none" = none)."""
    row = ml_collections.ConfigDict()
    row.train = train
    row.label = label or name
    row.thesis = tuple(float("nan") if v is None else v for v in thesis)
    row.overrides = tuple(overrides)
    row.steps = steps
    c.reproduce.rows[name] = row
    if "order" in c.reproduce:
        c.reproduce.order = tuple(n for n in c.reproduce.order if n != name) + (name,)


def reproduce_step(c, name: str, entry: str, config: str, output: str, overrides=()) -> None:
    """An evaluation run on every row's workdir: ``entry`` in {evaluate, certify, analyze}, its
    config ("configs/certify/table3_6.py"), the file it writes there ("certify.json")."""
    st = ml_collections.ConfigDict()
    st.entry, st.config, st.output, st.overrides = entry, config, output, tuple(overrides)
    c.reproduce.steps[name] = st
