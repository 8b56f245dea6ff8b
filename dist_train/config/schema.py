"""Typed schema of a run. Every field carries a one-line description; unknown keys are errors.

YAML maps onto these models one to one (`optim.lr` is `Config.optim.lr`). Defaults describe the
quickstart, so an empty YAML file is a valid (small) run.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from dist_train.tasks.names import check_pairing


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info):
        # pydantic's lax mode reads `steps: true` as 1; a bool where a number belongs is a mistake.
        if isinstance(value, bool):
            annotation = str(cls.model_fields[info.field_name].annotation)
            if "bool" not in annotation and ("int" in annotation or "float" in annotation):
                word = "an integer" if "int" in annotation else "a number"
                raise PydanticCustomError("bool_for_number", "expected {word}, got {value}",
                                          {"word": word, "value": str(value).lower()})
        return value


class RunSection(_Strict):
    name: str = Field("quickstart", description="Run name; outputs go to <run.dir>/<run.name>/.")
    dir: str = Field("runs", description="Parent directory of all run directories.")


class TrainSection(_Strict):
    steps: int = Field(200, ge=1, description="Number of optimizer steps to train for.")
    seed: int = Field(0, description="Seed for model init, data order and dropout.")
    batch_size: int = Field(32, ge=1, description="Global batch size per optimizer step (all ranks, all micro-batches).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this value; 0 disables.")
    log_every: int = Field(10, ge=1, description="Log metrics every this many steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate on the validation split every this many steps; 0 = only at the end.")
    eval_batches: int = Field(4, ge=1, description="Validation batches per evaluation.")
    sample_tokens: int = Field(0, ge=0, description="Language models: tokens to generate after training (written to <run>/sample.txt); 0 = none.")
    sample_prompt: str = Field("def ", description="Prompt for the generated sample (UTF-8 bytes on a byte-level corpus).")
    sample_temperature: float = Field(0.8, gt=0, description="Softmax temperature for sampling.")
    on_nonfinite: Literal["skip", "stop"] = Field("stop", description="A step whose loss or gradients are not finite is never applied to the weights: skip it (counted in nonfinite_skipped) and go on, or stop: every rank stops, the last good weights are checkpointed and the job exits 1 with a message naming the step.")


class ModelSection(_Strict):
    name: Literal["gpt", "mlp", "cnn", "basis_mlp", "basis_fno"] = Field("gpt", description="Reference model: byte-level GPT, MLP, small CNN, or a PDE basis network with the moe section's constraint (basis_mlp: pointwise MLP; basis_fno: 2-D Fourier neural operator over (t, x), the paper's kind).")
    n_layer: int = Field(4, ge=1, description="Number of blocks (transformer blocks, hidden layers or conv blocks).")
    width: int = Field(128, ge=1, description="Embedding size (gpt), hidden units (mlp) or channels (cnn).")
    n_head: int = Field(4, ge=1, description="Attention heads (gpt only); must divide width.")
    block_size: int = Field(64, ge=2, description="Context length in tokens (gpt only).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability.")
    modes: int = Field(12, ge=1, description="basis_fno only: Fourier modes kept per axis in each layer (the lowest in x, the lowest of either sign in t; capped at what the padded grid has).")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.name == "gpt" and self.width % self.n_head != 0:
            raise ValueError(f"model.n_head ({self.n_head}) must divide model.width ({self.width})")
        return self


_PDE_SETS = ("reaction_diffusion", "diffusion_sorption")
# The data-set-specific keys of `data` and the data sets that read them (the others read all sets).
_DATA_KEY_READERS = {"path": ("token_bin",), "val_path": ("token_bin",), "vocab_size": ("token_bin",),
                     "max_bytes": ("stdlib_bytes",), "num_examples": ("shapes32", *_PDE_SETS),
                     "seed": ("shapes32", *_PDE_SETS), "nx": _PDE_SETS, "nt": _PDE_SETS, "t_end": _PDE_SETS,
                     "nu": _PDE_SETS, "rho": ("reaction_diffusion",)}


class DataSection(_Strict):
    name: Literal["stdlib_bytes", "token_bin", "digits", "shapes32", "reaction_diffusion", "diffusion_sorption"] = Field(
        "stdlib_bytes", description="Dataset: bytes of the Python stdlib source, uint16 .bin token files, sklearn digits, generated 32x32 RGB shapes, 1D Fisher-KPP reaction-diffusion solutions, or PDEBench's 1D diffusion-sorption problem (both generated with a finite-difference solver).")
    path: Optional[str] = Field(None, description="token_bin: path of the training .bin file (nanoGPT/llm.c uint16 format).")
    val_path: Optional[str] = Field(None, description="token_bin: validation .bin file; default: the last val_fraction of `path`.")
    vocab_size: Optional[int] = Field(None, ge=2, description="token_bin: vocabulary size; default: max token id + 1 (scanned).")
    max_bytes: int = Field(4_000_000, ge=1024, description="stdlib_bytes: cap on corpus size in bytes (files taken in sorted order).")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Fraction of the data held out for validation.")
    test_fraction: Optional[float] = Field(None, ge=0, lt=1, description="Fraction held out as a test split (stdlib_bytes, digits, shapes32); default 0.1 for shapes32, else 0 (no test split).")
    num_examples: Optional[int] = Field(None, ge=20, description="shapes32 / the PDE sets: examples generated in all (train + val + test); default 7000 images / 512 solutions.")
    seed: int = Field(0, description="shapes32 / the PDE sets: seed the examples are generated from (fixed apart from train.seed).")
    nx: int = Field(128, ge=3, description="PDE sets: grid points in x on [0, 1] (boundaries included).")
    nt: int = Field(64, ge=2, description="PDE sets: time levels on [0, t_end] (t = 0 included).")
    t_end: Optional[float] = Field(None, gt=0, description="PDE sets: final time; default 1.0 (reaction_diffusion) / 500 (diffusion_sorption, PDEBench's).")
    nu: Optional[float] = Field(None, ge=0, description="PDE sets: diffusion coefficient, nu of u_t = nu u_xx + rho u (1 - u) (default 0.005) or D of R(u) u_t = D u_xx (default 5e-4, PDEBench's).")
    rho: float = Field(1.0, ge=0, description="reaction_diffusion: reaction rate rho.")

    @model_validator(mode="after")
    def _keys_are_read(self):
        # A key the chosen data set never reads (data.path with stdlib_bytes) is a config mistake:
        # the run would silently train on other data than the user meant. A key at its default is
        # no mistake (a resolved config.yaml spells out every key).
        for key, readers in _DATA_KEY_READERS.items():
            if (key in self.model_fields_set and self.name not in readers
                    and getattr(self, key) != type(self).model_fields[key].default):
                raise ValueError(f"data.{key}: not read by data.name={self.name} (only by {', '.join(readers)})")
        return self

    @model_validator(mode="after")
    def _fractions_leave_training_data(self):
        if self.val_fraction + (self.test_fraction or 0.0) >= 1:
            raise ValueError(f"data.val_fraction + data.test_fraction ({self.val_fraction} + {self.test_fraction}) must be below 1")
        return self


class MoESection(_Strict):
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


class ParallelSection(_Strict):
    backend: Literal["ddp", "fsdp", "deepspeed", "fairscale", "none"] = Field(
        "ddp", description="Data-parallel backend: DDP, FSDP2, DeepSpeed ZeRO, FairScale OSS, or none (single process).")
    stages: int = Field(1, ge=1, description="Local-learning stages the model is split into; 1 = end-to-end backprop.")
    cut_points: Optional[list[int]] = Field(None, description="Block index where each stage after the first begins; default: balanced as parallel.balance says.")
    balance: Literal["params", "measured"] = Field("params", description="Without cut_points: balance stages by parameter count, or by each block's forward+backward time measured on the run's device (rank 0 measures; a resumed run keeps its cuts).")
    mixed_precision: Literal["fp32", "bf16"] = Field("fp32", description="Parameter/compute dtype policy (bf16 needs CUDA or a recent CPU).")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    deepspeed_config: Optional[str] = Field(None, description="Optional DeepSpeed JSON merged over the generated config.")
    reshard_after_forward: bool = Field(True, description="FSDP2: free gathered parameters after forward (ZeRO-3 style).")
    activation_checkpointing: bool = Field(False, description="End-to-end backprop: keep only each model block's input and recompute the block in backward (torch checkpoint, non-reentrant): less activation memory for about one more forward per step.")

    @model_validator(mode="after")
    def _checkpointing_is_end_to_end(self):
        # The local-learning stages are built by their own loop, which does not apply it: refuse
        # rather than silently run without it.
        if self.activation_checkpointing and self.stages > 1:
            raise ValueError("parallel.activation_checkpointing: applies to end-to-end backprop (parallel.stages=1); "
                             "local-learning stages do not support it")
        return self


class InfoProOptions(_Strict):
    lambda1_first: Optional[float] = Field(None, ge=0, description="InfoPro: reconstruction weight lambda1 of the first stage, moving linearly to lambda1_last at the last local stage; default: the official code's value for this number of stages (K=2: 5; K=4: 1; K=8, 16: 5).")
    lambda2_first: Optional[float] = Field(None, ge=0, description="InfoPro: task weight lambda2 of the first stage, moving linearly to lambda2_last; default: the official code's value for this number of stages (K=2: 0.5; K=4, 8, 16: 0).")
    lambda1_last: Optional[float] = Field(None, ge=0, description="InfoPro: reconstruction weight lambda1 of the last local stage; default: the official code's value for this number of stages (K=4, 8: 0; K=16: 0.5).")
    lambda2_last: Optional[float] = Field(None, ge=0, description="InfoPro: task weight lambda2 of the last local stage; default: the official code's value for this number of stages (K=4, 8, 16: 1).")


class AugLocalOptions(_Strict):
    depth: int = Field(3, ge=1, description="AugLocal: d, the auxiliary depth (layers copied from the later ones) of the first stage (official README, ResNet-110: 3).")
    decay: float = Field(0.5, ge=0, le=1, description="AugLocal: tau, the pyramidal decay coefficient: the depth falls linearly from d towards min_depth over the local stages (official README: 0.5).")
    min_depth: int = Field(1, ge=1, description="AugLocal: d_min, the smallest auxiliary depth (official code: 1).")


class MANOptions(_Strict):
    momentum: float = Field(0.995, ge=0, lt=1, description="MAN: EMA momentum m of the next stage's first block (paper: 0.995).")
    every: int = Field(1, ge=1, description="MAN: steps between weight messages from the next stage (1 = every step, as in the paper).")
    delay: int = Field(2, ge=1, description="MAN: a weight message sent after step s is applied at the start of step s + delay (fixed, so runs are deterministic).")


class ForwardForwardOptions(_Strict):
    threshold: Optional[float] = Field(None, gt=0, description="Forward-Forward: goodness threshold theta; default: the layer's number of units.")
    label_scale: float = Field(1.0, gt=0, description="Forward-Forward: value written into the input's first C entries for the label (one-hot).")


class TpSGDOptions(_Strict):
    dim: Optional[int] = Field(None, ge=1, description="tpSGD: size of the target P·onehot(y); it is the stage output's width (no readout), so only that value (or null) is accepted.")


class NoPropOptions(_Strict):
    steps: Optional[int] = Field(None, ge=1, description="NoProp: diffusion steps T (a multiple of parallel.stages; each stage owns T/K denoising blocks); default: T = K.")
    eta: float = Field(0.1, gt=0, description="NoProp: eta, the weight of the SNR-weighted denoising loss (paper's Eq. 8).")
    max_alpha_bar: float = Field(0.99, gt=0, lt=1, description="NoProp: alpha_bar at the last step T (cosine schedule from 0).")
    learn_embedding: bool = Field(False, description="NoProp: learn the label embedding U jointly (its gradient is summed over the stages each step: a small all-reduce) instead of keeping it fixed.")


class LocalSection(_Strict):
    method: Literal["dgl", "mono_forward", "infopro", "auglocal", "man", "forward_forward", "tpsgd", "noprop"] = Field(
        "dgl", description="Local-learning method used when parallel.stages > 1.")
    max_in_flight: int = Field(2, ge=1, description="Activation messages a stage may have in flight before it waits (back-pressure).")
    asynchronous: bool = Field(False, description="While waiting for the previous stage, train on a replayed batch instead of idling.")
    replay_size: int = Field(4, ge=1, description="Asynchronous mode: batches kept per stage for replay.")
    max_reuse: int = Field(3, ge=1, description="Asynchronous mode: times a batch may be trained on in all.")
    send_targets: bool = Field(True, description="Send each batch's targets with its activation. False: every stage reads its targets from the deterministic sampler, so only activations cross (half a backprop pipeline's bytes).")
    infopro: InfoProOptions = Field(default_factory=InfoProOptions, description="InfoPro hyperparameters.")
    auglocal: AugLocalOptions = Field(default_factory=AugLocalOptions, description="AugLocal hyperparameters.")
    man: MANOptions = Field(default_factory=MANOptions, description="MAN hyperparameters.")
    forward_forward: ForwardForwardOptions = Field(default_factory=ForwardForwardOptions, description="Forward-Forward hyperparameters.")
    tpsgd: TpSGDOptions = Field(default_factory=TpSGDOptions, description="tpSGD hyperparameters.")
    noprop: NoPropOptions = Field(default_factory=NoPropOptions, description="NoProp hyperparameters.")

    def options(self, method: str) -> dict:
        """The `local.<method>.*` options as constructor keyword arguments (none for dgl, mono_forward)."""
        section = getattr(self, method, None)
        return section.model_dump() if isinstance(section, BaseModel) else {}


class MatrixOptimOptions(_Strict):
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


class OptimSection(_Strict):
    name: Literal["adamw", "sgd", "muon", "normuon", "dp_sgd", "diff2"] = Field("adamw", description="Optimizer: adamw, sgd, muon / normuon for the hidden matrices with AdamW for the rest, dp_sgd (per-example clipping and noise, see privacy.*, before privacy.base_optimizer), or diff2 (DIFF2 over the data-parallel ranks as workers, full local data every round, see privacy.diff2).")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (muon / normuon: of the hidden matrices).")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (matrices only; biases, norms and embeddings are exempt).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1 (sgd: momentum).")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon (normuon: also the epsilon added to sqrt(v)).")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Learning-rate schedule after warm-up.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of the peak lr.")
    matrix: MatrixOptimOptions = Field(default_factory=MatrixOptimOptions, description="muon / normuon settings: momentum, Newton-Schulz, routing of parameters.")


class Diff2Options(_Strict):
    period: int = Field(10, ge=1, description="Restart period T: a fresh clipped gradient every T rounds, clipped gradient differences in between; 1 = DP-GD.")
    c2: float = Field(3.0, gt=0, description="C2: a difference round clips per-example gradient differences to C2 x ||x_r - x_(r-1)|| (C1 is privacy.max_grad_norm).")
    noise: Literal["calibrated", "closed_form"] = Field("calibrated", description="sigma1, sigma2 from the authors' closed form, or the closed form scaled down to exactly privacy.target_epsilon by privacy.accountant (less noise, same guarantee).")
    sigma1: Optional[float] = Field(None, ge=0, description="Explicit restart-round noise multiplier (with sigma2; instead of target_epsilon). Noise std = sigma1 x C1.")
    sigma2: Optional[float] = Field(None, ge=0, description="Explicit difference-round noise multiplier (with sigma1). Noise std = sigma2 x C2 x ||x_r - x_(r-1)||.")


class PrivacySection(_Strict):
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


class TelemetrySection(_Strict):
    energy: Literal["auto", "nvml", "rapl", "none"] = Field("auto", description="Energy source; auto tries NVML (GPU energy counter, else sampled power), then RAPL (CPU packages), else reports unavailable with nulls. nvml or rapl on a machine that cannot read it is an error.")
    grid_intensity_g_per_kwh: Optional[float] = Field(None, gt=0, description="Grid carbon intensity (g CO2 per kWh) for the run summary's CO2 figure; without it no CO2 is reported (nothing is looked up).")
    tensorboard: bool = Field(True, description="Write TensorBoard events to <run>/tb on rank 0.")
    progress: Literal["auto", "on", "off"] = Field("auto", description="Progress bar on rank 0 (auto: only on a terminal).")
    sample_ids: bool = Field(False, description="Every rank logs the example ids it trained on at each step to <run>/samples/rank<r>/metrics.jsonl (ids of steps lost to a crash are dropped on resume): an audit of the data order across restarts.")


class CheckpointSection(_Strict):
    every: int = Field(0, ge=0, description="Save a checkpoint every this many steps; 0 = only at the end.")
    keep: int = Field(2, ge=1, description="Keep the newest this many committed checkpoints.")
    resume: str = Field("auto", description="auto (latest committed checkpoint if any), never, or a path to a step-N folder.")
    at_end: bool = Field(True, description="Save a checkpoint after the last step.")


class RuntimeSection(_Strict):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA (NCCL) when available, else CPU (gloo).")
    threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads per process; default: leave torch's choice.")
    cpu_malloc: Literal["cache", "system"] = Field(
        "cache", description="Host heap (glibc): 'cache' keeps freed memory in the process for the next step instead "
        "of returning it and faulting it back in (as PyTorch's CUDA allocator does on GPU; the resident set stays at "
        "the step's high-water mark); 'system' leaves glibc's defaults. See dist_train/runtime/malloc.py.")
    start_timeout_s: float = Field(600, gt=0, description="Collective timeout during start-up (rendezvous, model set-up).")
    steady_timeout_s: float = Field(300, gt=0, description="Collective timeout in steady-state training.")
    save_timeout_s: float = Field(1800, gt=0, description="Collective timeout while saving or loading a checkpoint.")
    stop_grace_s: int = Field(
        30, ge=0, description="`dist-train launch`: seconds the agent lets its workers end on their own after "
        "SIGTERM (when the job is stopped, to commit a checkpoint; when a peer failed, to exit) before it SIGKILLs "
        "them. torchrun's default is 30; a hung peer holds the failed job that long.")


class Config(_Strict):
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

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.data.name == "token_bin" and not self.data.path:
            raise ValueError("data.path: required when data.name is token_bin")
        check_pairing(self.data.name, self.model.name)  # the model's task is the data set's
        if self.train.batch_size % self.train.grad_accum != 0:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must be divisible by train.grad_accum ({self.train.grad_accum})")
        if self.optim.name == "dp_sgd":
            p = self.privacy
            if p.noise_multiplier is None and p.target_epsilon is None:
                raise ValueError("privacy: dp_sgd needs privacy.noise_multiplier or privacy.target_epsilon")
            if p.noise_multiplier == 0 and p.target_epsilon is not None:
                raise ValueError(f"privacy.noise_multiplier: 0 (no noise) gives no finite epsilon, but "
                                 f"privacy.target_epsilon is {p.target_epsilon}")
            if self.parallel.activation_checkpointing:
                raise ValueError("parallel.activation_checkpointing: dp_sgd keeps each layer's input for its "
                                 "per-example norms already; recomputation would capture every layer twice")
            if self.train.grad_accum != 1:
                raise ValueError("train.grad_accum: dp_sgd splits its Poisson batches by privacy.max_physical_batch; "
                                 "leave grad_accum at 1")
        if self.optim.name == "diff2":
            p, d = self.privacy, self.privacy.diff2
            if (d.sigma1 is None) != (d.sigma2 is None):
                raise ValueError("privacy.diff2: give both sigma1 and sigma2, or neither (calibrated from target_epsilon)")
            if d.sigma1 is None and p.target_epsilon is None:
                raise ValueError("privacy: diff2 needs privacy.target_epsilon or privacy.diff2.sigma1 and sigma2")
            if self.parallel.stages != 1:
                raise ValueError("parallel.stages: diff2 trains end to end (its workers are the data-parallel ranks)")
            if self.train.grad_accum != 1:
                raise ValueError("train.grad_accum: diff2 takes each worker's whole data in one pass; leave it at 1")
            if self.parallel.activation_checkpointing:
                raise ValueError("parallel.activation_checkpointing: diff2 computes per-example gradients with "
                                 "torch.func; there is no backward pass to checkpoint")
        return self
