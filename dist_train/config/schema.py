"""Typed schema of a run. Every field carries a one-line description; unknown keys are errors.

YAML maps onto these models one to one (`optim.lr` is `Config.optim.lr`). Defaults describe the
quickstart, so an empty YAML file is a valid (small) run.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dist_train.config.options import Options, validate_options
from dist_train.registry import BACKENDS, DATASETS, LOCAL_METHODS, MODELS, OPTIMIZERS, Registry, import_plugins
from dist_train.tasks.names import check_pairing


class RunSection(Options):
    name: str = Field("quickstart", description="Run name; outputs go to <run.dir>/<run.name>/.")
    dir: str = Field("runs", description="Parent directory of all run directories.")


class TrainSection(Options):
    steps: int = Field(200, ge=1, description="Number of optimizer steps to train for.")
    seed: int = Field(0, description="Seed for model init, data order and dropout.")
    batch_size: int = Field(32, ge=1, description="Global batch size per optimizer step (all ranks, all micro-batches).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this value; 0 disables.")
    log_every: int = Field(10, ge=1, description="Log metrics every this many steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate on the validation split every this many steps; 0 = only at the end.")
    eval_batches: int = Field(4, ge=1, description="Validation batches per evaluation.")
    sample_tokens: int = Field(0, ge=0, description="Language models: tokens to generate after training (written to <run>/sample.txt); 0 = none.")
    sample_prompt: str = Field("def ", description="Prompt for the generated sample: encoded with the data set's tokenizer when it has one (token_bin: the tokenizer.json beside the shards), as UTF-8 bytes on a byte-level corpus.")
    sample_temperature: float = Field(0.8, gt=0, description="Softmax temperature for sampling.")
    on_nonfinite: Literal["skip", "stop"] = Field("stop", description="A step whose loss or gradients are not finite is never applied to the weights: skip it (counted in nonfinite_skipped) and go on, or stop: every rank stops, the last good weights are checkpointed and the job exits 1 with a message naming the step.")


def _in(registry, value: str) -> str:
    """A name a registry holds (a plugin may have added it), or an import path it makes an entry of
    (`model.name: "package.module:factory"`); the error lists the choices."""
    if value not in registry:
        registry.add_import_path(value)
    return value


class _ComponentSection(Options):
    """A section some of whose keys belong to the component it names (a data set's `data.path`, a
    method's `local.man.*`): they arrive as extra keys, and the component's own options model
    validates them (`_own_keys`), so a new component brings its keys with it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


class _NamedComponentSection(_ComponentSection):
    """A section that names one component of a registry (`data.name`, `model.name`) and holds that
    component's own keys beside its common ones: the component's options model validates them, and
    the resolved config spells every one of them out."""

    _registry: ClassVar[Registry]

    @model_validator(mode="after")
    def _own_keys(self):
        # A key the chosen component does not read is a mistake (the run would silently train
        # something other than the user meant), unless it is another component's key at that
        # component's default: a resolved config of that component.
        registry, section = self._registry, self._registry.key.partition(".")[0]
        extra = self.__pydantic_extra__
        own = registry.get(self.name).options
        known = set(own.model_fields) if own else set()
        for key in [k for k in extra if k not in known]:
            if not _another_sets_default(registry, self.name, key, extra[key]):
                raise ValueError(f"{section}.{key}: not read by {registry.key}={self.name}"
                                 + (f" (its keys: {', '.join(sorted(known))})" if known else ""))
            del extra[key]
        validated = validate_options(own, dict(extra), section, f"{registry.key} is {self.name}")
        extra.clear()
        extra.update(dict(validated))  # every key of the component spelt out, as the resolved config shows
        return self

    def options(self) -> Options:
        """The chosen component's own options (its options model over this section's extra keys)."""
        return validate_options(self._registry.get(self.name).options, dict(self.__pydantic_extra__),
                                self._registry.key.partition(".")[0])


def _another_sets_default(registry: Registry, name: str, key: str, value) -> bool:
    """Is `<section>.<key>: value` another registered component's key at that component's default?"""
    for other in registry:
        own = registry.get(other).options if other != name else None
        if own is not None and key in own.model_fields and own.model_fields[key].default == value:
            return True
    return False


class ModelSection(_NamedComponentSection):
    name: str = Field("gpt", description="Model, by registered name (dist_train.registry.MODELS): gpt (byte-level GPT-2-style decoder), llama (Llama 3 decoder: flavours debug, 1B, 3B, 8B, 70B), mlp, cnn, basis_mlp / basis_fno (PDE basis networks under the moe section's constraint: a pointwise MLP, or a 2-D Fourier neural operator over (t, x), the paper's kind), or a plugin's, or an import path package.module:factory (or path/file.py:factory) of a function that returns the model (it receives the data set's sizes and the mapping model.options as keyword arguments; see the README's model protocol). Each model owns further model.* keys (its options model: n_layer, width, ...).")
    block_size: int = Field(64, ge=2, description="Context length in tokens: the windows a token data set cuts and a language model reads (ignored by other tasks).")

    _registry = MODELS
    _name_is_registered = field_validator("name")(classmethod(lambda cls, v: _in(MODELS, v)))


class DataSection(_NamedComponentSection):
    name: str = Field("stdlib_bytes", description="Data set, by registered name (dist_train.registry.DATASETS): stdlib_bytes (bytes of the Python stdlib source), token_bin (nanoGPT or llm.c token files and shards, e.g. from `dist-train prepare-data`), digits (sklearn digits), shapes32 (generated 32x32 RGB shapes), reaction_diffusion (1D Fisher-KPP solutions), diffusion_sorption (PDEBench's 1D diffusion-sorption problem), or a plugin's. Each data set owns further data.* keys (its options model).")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Fraction of the data held out for validation.")
    test_fraction: Optional[float] = Field(None, ge=0, lt=1, description="Fraction held out as a test split (stdlib_bytes, digits, shapes32, the PDE sets); default 0.1 for shapes32, else 0 (no test split).")
    prefetch: bool = Field(True, description="Make the next step's batch (sampler draw, micro-batch split, read, copy to the device; pinned memory on CUDA) on a background thread while the current step runs, one step ahead; the batches and results are the same either way. false: each step makes its own batch when it starts. The wait for data is logged as data_wait_s and data_wait_frac.")

    _registry = DATASETS
    _name_is_registered = field_validator("name")(classmethod(lambda cls, v: _in(DATASETS, v)))

    @model_validator(mode="after")
    def _fractions_leave_training_data(self):
        if self.val_fraction + (self.test_fraction or 0.0) >= 1:
            raise ValueError(f"data.val_fraction + data.test_fraction ({self.val_fraction} + {self.test_fraction}) must be below 1")
        return self


class MoESection(Options):
    constraint: Literal["hard", "soft"] = Field("hard", description="PDE models: hard constraint (u = b.omega, omega solved per sample by Levenberg-Marquardt on each expert's sub-domain) or soft constraint (omega learned; the PDE only in the loss).")
    experts: int = Field(4, ge=1, description="Hard-constraint experts K, one per sub-domain, placed round-robin on the ranks of each expert group (several per rank allowed); 1 = one global constraint.")
    expert_parallel: Optional[int] = Field(None, ge=1, description="Ranks per expert group (the device mesh's 'ep' dimension): the data-parallel ranks form dp / ep groups of ep neighbouring ranks, each holding all K experts and exchanging basis values and solutions only inside the group; must divide the data-parallel size. null: one group of every data-parallel rank.")
    time_splits: int = Field(1, ge=1, description="Split time as well as space: experts = time_splits x space bands (must divide moe.experts).")
    overlap: int = Field(0, ge=0, description="Columns each expert constrains beyond its own block on either side (restricted additive Schwarz; an extension, not in PI-HC-MoE): it solves omega_k on the widened region and keeps b.omega_k on its own block. 0 = the paper's non-overlapping split.")
    points: int = Field(1024, ge=1, description="PDE residual points m sampled over the whole grid (m / K per expert), besides every initial and boundary point.")
    basis: int = Field(32, ge=1, description="Basis functions N produced by the basis network.")
    loss: Literal["physics", "data"] = Field("physics", description="Training loss: the discretised PDE's residual + initial + boundary terms over the whole grid (no solution data, as PI-HC), or mean squared error to the reference solution.")
    ridge: float = Field(1e-4, ge=0, description="Ridge term ridge x ||omega||^2 of each constrained least-squares problem.")
    lm_max_iter: int = Field(50, ge=1, description="Levenberg-Marquardt iteration cap per solve (unconverged samples are counted in lm_unconverged).")
    lm_tol: float = Field(1e-10, gt=0, description="Levenberg-Marquardt tolerance on ||grad L||_inf, relative to its value at omega = 0.")
    lm_hessian: Literal["exact", "gauss_newton"] = Field("exact", description="Model matrix of the Levenberg-Marquardt steps: the exact Hessian of the least-squares objective (Newton steps under LM damping; converges where Gauss-Newton crawls, e.g. diffusion-sorption's front) or Gauss-Newton's J^T J (classic LM, as PI-HC).")
    lm_ftol: float = Field(1e-12, ge=0, description="Levenberg-Marquardt stops a sample (counted in lm_stalled) when a step is rejected although the step's model (lm_hessian) predicted a decrease of L of at most lm_ftol * L (MINPACK's ftol test, on rejected steps); 0 turns the test off.")


class ActivationCheckpointingSection(Options):
    mode: Literal["none", "full", "selective"] = Field("none", description="none: keep every activation; full: each block keeps only its input and is recomputed whole in backward (about one more forward per step); selective: as `selective` says, between the two in memory and time.")
    selective: Literal["every_n", "op"] = Field("every_n", description="mode selective: every_n (blocks i with i % every_n == 0 recomputed whole, the others keep everything; the default, as torchtitan's: at every_n 2 about half of full's memory saving for half its recomputation) or op (every block keeps its matmul and attention outputs and recomputes only the cheap ops between them: norms, rotary embeddings, activations; torch's create_selective_checkpoint_contexts).")
    every_n: int = Field(2, ge=1, description="selective every_n: checkpoint every n-th block (1 = every block, as full).")
    save_matmuls: Literal["all", "every_second"] = Field("all", description="selective op: keep the output of every matmul (default: no matmul is recomputed, so the step costs about what none costs), or of every second one in each block (torchtitan's variant: less memory, half the matmuls recomputed).")

    @model_validator(mode="before")
    @classmethod
    def _bare_mode(cls, value):
        # `activation_checkpointing: full` (or true / false, which configs saved before the modes
        # existed hold) names the mode alone.
        if isinstance(value, bool):
            return {"mode": "full" if value else "none"}
        if isinstance(value, str):
            return {"mode": value}
        return value


class ParallelSection(Options):
    backend: str = Field("ddp", description="Data-parallel backend, by registered name (dist_train.registry.BACKENDS): ddp (DDP), fsdp (FSDP2), deepspeed (DeepSpeed ZeRO), fairscale (FairScale OSS), or none (single process).")
    stages: int = Field(1, ge=1, description="Local-learning stages the model is split into; 1 = end-to-end backprop.")
    cut_points: Optional[list[int]] = Field(None, description="Block index where each stage after the first begins; default: balanced as parallel.balance says.")
    balance: Literal["params", "measured"] = Field("params", description="Without cut_points: balance stages by parameter count, or by each block's forward+backward time measured on the run's device (rank 0 measures; a resumed run keeps its cuts).")
    _backend_is_registered = field_validator("backend")(classmethod(lambda cls, v: _in(BACKENDS, v)))

    mixed_precision: Literal["fp32", "bf16"] = Field("fp32", description="Parameter/compute dtype policy (bf16 needs CUDA or a recent CPU).")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    deepspeed_config: Optional[str] = Field(None, description="Optional DeepSpeed JSON merged over the generated config.")
    reshard_after_forward: bool = Field(True, description="FSDP2: free gathered parameters after forward (ZeRO-3 style).")
    dp_replicate: int = Field(1, ge=1, description="HSDP: the data-parallel ranks of a stage form dp_replicate groups of dp / dp_replicate neighbouring ranks (dp_shard); a sharding backend (fsdp) shards inside a group and replicates across groups, so its all-gathers stay inside one (a node, when it is the node count) and only the gradient all-reduce crosses groups. 1: shard over every data-parallel rank. Must divide the data-parallel size.")
    activation_checkpointing: ActivationCheckpointingSection = Field(default_factory=ActivationCheckpointingSection, description="Recompute block activations in backward instead of keeping them: mode none, full or selective, and selective's kind (see its keys). A bare value sets the mode: none, full, selective, or true / false (= full / none, as older configs spell it).")
    compile: bool = Field(False, description="torch.compile each model block on its own (in place: parameter and checkpoint names unchanged), after activation checkpointing and before DDP / FSDP2 wrap the model. On CPU inductor builds C++ and needs the system compiler ($CXX, else g++). Compile time is logged as compile_s.")


class LocalSection(_ComponentSection):
    method: str = Field("dgl", description="Local-learning method used when parallel.stages > 1, by registered name (dist_train.registry.LOCAL_METHODS): dgl, mono_forward, infopro, auglocal, man, forward_forward, tpsgd, noprop, or a plugin's. A method with options reads them from local.<method>.* (its options model).")
    max_in_flight: int = Field(2, ge=1, description="Activation messages a stage may have in flight before it waits (back-pressure).")
    asynchronous: bool = Field(False, description="While waiting for the previous stage, train on a replayed batch instead of idling.")
    replay_size: int = Field(4, ge=1, description="Asynchronous mode: batches kept per stage for replay.")
    max_reuse: int = Field(3, ge=1, description="Asynchronous mode: times a batch may be trained on in all.")
    send_targets: bool = Field(True, description="Send each batch's targets with its activation. False: every stage reads its targets from the deterministic sampler, so only activations cross (half a backprop pipeline's bytes).")

    _method_is_registered = field_validator("method")(classmethod(lambda cls, v: _in(LOCAL_METHODS, v)))

    @model_validator(mode="after")
    def _own_keys(self):
        # local.<name>.*: the options of method <name> (any registered method's may be given, as a
        # resolved config keeps them); the chosen method's are always spelt out.
        extra = self.__pydantic_extra__
        for key in extra:
            if key not in LOCAL_METHODS:
                raise ValueError(f"local.{key}: unknown key")
            if LOCAL_METHODS.get(key).options is None:
                raise ValueError(f"local.{key}: method {key} has no options")
        if self.method not in extra and LOCAL_METHODS.get(self.method).options is not None:
            extra[self.method] = {}
        for key, values in extra.items():
            values = values.model_dump() if isinstance(values, BaseModel) else values
            extra[key] = validate_options(LOCAL_METHODS.get(key).options, values or {}, f"local.{key}")
        return self

    def options(self, method: str) -> dict:
        """The `local.<method>.*` options as constructor keyword arguments ({} for a method without options)."""
        own = LOCAL_METHODS.get(method).options
        if own is None:
            return {}
        given = (self.__pydantic_extra__ or {}).get(method)
        return (given if given is not None else own()).model_dump()


class MatrixOptimOptions(Options):
    adamw_lr: Optional[float] = Field(None, gt=0, description="Peak lr of the AdamW groups (embeddings, output head, biases, norms); default: optim.lr. Both follow the same schedule, keeping their ratio.")
    momentum: float = Field(0.95, ge=0, lt=1, description="muon: momentum mu (M <- mu*M + G); normuon: beta1 of its EMA momentum.")
    beta2: float = Field(0.95, ge=0, lt=1, description="normuon: beta2 of the per-row second moment v.")
    nesterov: Optional[bool] = Field(None, description="Nesterov momentum; default: on for muon and for normuon's reference variant, off for normuon's paper rule.")
    lr_scale: Literal["keller", "match_rms_adamw"] = Field("keller", description="muon: update scale, sqrt(max(1, m/n)) (keller) or 0.2*sqrt(max(m, n)) (match_rms_adamw: reuse AdamW's lr and wd).")
    variant: Literal["paper", "reference"] = Field("paper", description="normuon: the paper's rule (update RMS fixed at 0.2*lr) or the authors' code (Nesterov, rescale to the pre-normalisation norm x sqrt(max(1, m/n))).")
    ns_steps: int = Field(5, ge=1, description="Newton-Schulz iterations.")
    ns_coefficients: Literal["quintic", "polar_express"] = Field("quintic", description="Newton-Schulz coefficients: the fixed quintic (3.4445, -4.7750, 2.0315) or Polar Express's per-step minimax ones (arXiv 2505.16932).")
    ns_dtype: Literal["auto", "bf16", "fp32", "fp64"] = Field("auto", description="Newton-Schulz precision; auto: bf16 on CUDA, the parameters' dtype on CPU.")
    owner_compute: bool = Field(True, description="Each matrix orthogonalised by one owner rank. false: every rank orthogonalises every matrix (the naive scheme, kept as a benchmark baseline).")
    matrix_params: list[str] = Field(default_factory=list, description="Glob patterns of parameter names to orthogonalise (overrides the role rules).")
    adamw_params: list[str] = Field(default_factory=list, description="Glob patterns of parameter names to give to AdamW (checked first).")


class OptimSection(Options):
    name: str = Field("adamw", description="Optimizer, by registered name (dist_train.registry.OPTIMIZERS): adamw, sgd, muon / normuon for the hidden matrices with AdamW for the rest, dp_sgd (per-example clipping and noise, see privacy.*, before privacy.base_optimizer), or diff2 (DIFF2 over the data-parallel ranks as workers, full local data every round, see privacy.diff2).")
    _name_is_registered = field_validator("name")(classmethod(lambda cls, v: _in(OPTIMIZERS, v)))

    lr: float = Field(3e-3, gt=0, description="Peak learning rate (muon / normuon: of the hidden matrices).")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (matrices only; biases, norms and embeddings are exempt).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1 (sgd: momentum).")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon (normuon: also the epsilon added to sqrt(v)).")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Learning-rate schedule after warm-up.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of the peak lr.")
    matrix: MatrixOptimOptions = Field(default_factory=MatrixOptimOptions, description="muon / normuon settings: momentum, Newton-Schulz, routing of parameters.")


class Diff2Options(Options):
    period: int = Field(10, ge=1, description="Restart period T: a fresh clipped gradient every T rounds, clipped gradient differences in between; 1 = DP-GD.")
    c2: float = Field(3.0, gt=0, description="C2: a difference round clips per-example gradient differences to C2 x ||x_r - x_(r-1)|| (C1 is privacy.max_grad_norm).")
    noise: Literal["calibrated", "closed_form"] = Field("calibrated", description="sigma1, sigma2 from the authors' closed form, or the closed form scaled down to exactly privacy.target_epsilon by privacy.accountant (less noise, same guarantee).")
    sigma1: Optional[float] = Field(None, ge=0, description="Explicit restart-round noise multiplier (with sigma2; instead of target_epsilon). Noise std = sigma1 x C1.")
    sigma2: Optional[float] = Field(None, ge=0, description="Explicit difference-round noise multiplier (with sigma1). Noise std = sigma2 x C2 x ||x_r - x_(r-1)||.")


class PrivacySection(Options):
    noise_multiplier: Optional[float] = Field(None, ge=0, description="DP-SGD noise multiplier sigma (noise std = sigma x max_grad_norm per coordinate); default: calibrated from target_epsilon over train.steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-example clipping radius C over all trainable parameters (flat clipping).")
    target_epsilon: Optional[float] = Field(None, gt=0, description="Privacy budget: training stops before epsilon would exceed it (also across resume). Required unless noise_multiplier is set.")
    delta: Optional[float] = Field(None, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee; must be below 1/N (N = training examples); default: 1/(10 N).")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Privacy accountant (Opacus): RDP with Balle et al. 2020 conversion, or PRV (Gopi et al. 2021).")
    base_optimizer: Literal["sgd", "adamw", "muon", "normuon"] = Field("sgd", description="Optimizer that takes the privatised gradient (optim.lr, optim.beta1/beta2/eps, optim.weight_decay, optim.matrix.* apply).")
    max_physical_batch: int = Field(64, ge=1, description="Largest micro-batch per rank: a Poisson logical batch is split into physical micro-batches of at most this many examples.")
    secure_rng: bool = Field(False, description="Draw the noise from a generator seeded by the OS's cryptographic RNG every step (not reproducible); default: seeded from (train.seed, step), reproducible across resume.")
    fix_model: bool = Field(False, description="Replace BatchNorm layers by GroupNorm instead of refusing the model.")
    diff2: Diff2Options = Field(default_factory=Diff2Options, description="optim.name diff2: restart period, C2 and the noise.")


class TelemetrySection(Options):
    energy: Literal["auto", "nvml", "rapl", "none"] = Field("auto", description="Energy source; auto tries NVML (GPU energy counter, else sampled power), then RAPL (CPU packages), else reports unavailable with nulls. nvml or rapl on a machine that cannot read it is an error.")
    grid_intensity_g_per_kwh: Optional[float] = Field(None, gt=0, description="Grid carbon intensity (g CO2 per kWh) for the run summary's CO2 figure; without it no CO2 is reported (nothing is looked up).")
    tensorboard: bool = Field(True, description="Write TensorBoard events to <run>/tb on rank 0.")
    progress: Literal["auto", "on", "off"] = Field("auto", description="Progress bar on rank 0 (auto: only on a terminal).")
    sample_ids: bool = Field(False, description="Every rank logs the example ids it trained on at each step to <run>/samples/rank<r>/metrics.jsonl (ids of steps lost to a crash are dropped on resume): an audit of the data order across restarts.")


class CheckpointSection(Options):
    every: int = Field(0, ge=0, description="Save a checkpoint every this many steps; 0 = only at the end.")
    keep: int = Field(2, ge=1, description="Keep the newest this many committed checkpoints.")
    resume: str = Field("auto", description="auto (latest committed checkpoint if any), never, or a path to a step-N folder.")
    at_end: bool = Field(True, description="Save a checkpoint after the last step.")
    # `async` is a Python keyword: the field is `async_`, spelt `async` in YAML, overrides and the dump.
    model_config = ConfigDict(populate_by_name=True)
    async_: bool = Field(False, alias="async", description="Copy the state to host memory and write it in the background (DCP async_save over a gloo group of its own) while training goes on; the COMMITTED marker is written once every rank's write has finished, and at most one save is in flight (the next waits). Backends that write their own format (deepspeed, fairscale) refuse it.")


class RuntimeSection(Options):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA (NCCL) when available, else CPU (gloo).")
    threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads per process; default: leave torch's choice.")
    cpu_malloc: Literal["cache", "system"] = Field(
        "cache", description="Host heap (glibc): 'cache' keeps freed memory in the process for the next step instead "
        "of returning it and faulting it back in (as PyTorch's CUDA allocator does on GPU; the resident set stays at "
        "the step's high-water mark); 'system' leaves glibc's defaults. See dist_train/runtime/malloc.py.")
    memory_check: bool = Field(True, description="Refuse a run, before anything starts, whose planned memory per rank (dist-train plan's memory/rank row: weights, gradients, optimizer state, activations) exceeds the memory per rank: the device's free memory (GPU), or the node's available RAM divided by its ranks (CPU). false: start anyway.")
    memory_per_rank_gb: Optional[float] = Field(None, gt=0, description="The memory per rank (GiB) that runtime.memory_check compares the plan with, instead of the measured one (e.g. to leave room for other jobs on the node).")
    start_timeout_s: float = Field(600, gt=0, description="Collective timeout during start-up (rendezvous, model set-up).")
    steady_timeout_s: float = Field(300, gt=0, description="Collective timeout in steady-state training.")
    save_timeout_s: float = Field(1800, gt=0, description="Collective timeout while saving or loading a checkpoint.")
    stop_grace_s: int = Field(
        30, ge=0, description="`dist-train launch`: seconds the agent lets its workers end on their own after "
        "SIGTERM (when the job is stopped, to commit a checkpoint; when a peer failed, to exit) before it SIGKILLs "
        "them. torchrun's default is 30; a hung peer holds the failed job that long.")


class Config(Options):
    run: RunSection = Field(default_factory=RunSection, description="Naming and output location.")
    train: TrainSection = Field(default_factory=TrainSection, description="Training loop.")
    model: ModelSection = Field(default_factory=ModelSection, description="Model.")
    data: DataSection = Field(default_factory=DataSection, description="Data set and split.")
    parallel: ParallelSection = Field(default_factory=ParallelSection, description="Parallelism.")
    local: LocalSection = Field(default_factory=LocalSection, description="Local-learning pipeline.")
    moe: MoESection = Field(default_factory=MoESection, description="PDE models (model.name basis_mlp or basis_fno): hard-constraint experts or the soft constraint.")
    optim: OptimSection = Field(default_factory=OptimSection, description="Optimizer and schedule.")
    privacy: PrivacySection = Field(default_factory=PrivacySection, description="Differential privacy (optim.name dp_sgd or diff2): noise, clipping, budget, accountant.")
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection, description="Logging, energy, progress.")
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection, description="Checkpointing and resume.")
    runtime: RuntimeSection = Field(default_factory=RuntimeSection, description="Devices, threads and timeouts.")
    plugins: list[str] = Field(default_factory=list, description="Python modules (dotted names, or paths of .py files) imported before the rest of the config is read: they register their own components (local methods, data sets, backends, optimizers) with dist_train.registry, so this config can name them.")

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data):
        # Before any section is read: the sections check names against the registries the plugins fill.
        if isinstance(data, dict) and isinstance(data.get("plugins"), list):
            import_plugins([str(p) for p in data["plugins"]])
        return data

    @model_validator(mode="after")
    def _cross_checks(self):
        check_pairing(DATASETS.get(self.data.name).task, self.data.name, self.model.name)  # the model's task is the data set's
        if self.train.batch_size % self.train.grad_accum != 0:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must be divisible by train.grad_accum ({self.train.grad_accum})")
        # Each component's own rules that need no world size (dp_sgd: a budget or a noise multiplier).
        for component in (DATASETS.get(self.data.name), MODELS.get(self.model.name), OPTIMIZERS.get(self.optim.name)):
            component.check_config(self)
        return self
