"""`JobSpec`: the one configuration type of a dlrl job.

The TOML file given to `dlrl train`, the body of `POST /v1/jobs` and the Python object are the
same pydantic model. It is flat on purpose: one level of sections, a docstring per field,
validation in the type. Unknown keys are errors (a typo must not silently fall back to a default),
types are strict ("5" or true is no integer), numbers finite, and every size field has an upper
bound (`le=`) generous enough for the command line; the job API applies stricter limits of its own
(services.api.admission).
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from dlrl.decoding import Decoding, Temperature, Tokens

Beta = Annotated[float, Strict(), Field(ge=0.0, lt=1.0)]
CHECKOUT = Path(__file__).resolve().parents[1]
"""The dlrl checkout (deploy/eval/ holds the shipped protocols)."""


class Section(BaseModel):
    # strict: "5" or true is no step count; allow_inf_nan: Infinity is no learning rate.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, strict=True,
                              allow_inf_nan=False)


class LoraSpec(Section):
    """LoRA hyper-parameters; `target_modules=None` picks the family default."""

    r: int = Field(16, ge=1, le=4096)
    """Rank of each adapter."""
    alpha: float = Field(32.0, gt=0, le=1e6)
    """Scale numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter input (0 keeps the old-policy and new-policy passes identical)."""
    target_modules: list[str] | str | None = Field(None, max_length=256)
    """Module-name suffixes, a full-match regex, or "all-linear"; None = the family's default
    (`Family.lora_targets`, dlrl.models.families)."""


class ModelSpec(Section):
    path: str = Field("builtin:tiny-sudoku", min_length=1, max_length=1024)
    """Local directory, hub id (e.g. GSAI-ML/LLaDA-8B-Instruct) or builtin:<name> (shipped asset)."""
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    """Parameter dtype: the master weights AdamW updates. Full fine-tuning needs float32 (or
    float64): at small learning rates bf16/fp16 round the updates away. For bf16 speed keep float32
    here and set train.compute_dtype = "bfloat16". With LoRA a bf16 base is fine (the adapters
    stay float32)."""
    trust_remote_code: bool = False
    """Run modeling code shipped with a checkpoint (never needed for LLaDA / Dream, which load
    through dlrl's native code); off by default because it executes the repository's Python."""
    lora: LoraSpec | None = None
    """Train a LoRA adapter instead of all weights; checkpoints then hold the adapter only."""

    @model_validator(mode="after")
    def _masters_can_learn(self) -> "ModelSpec":
        if self.lora is None and self.dtype in ("bfloat16", "float16"):
            raise ValueError(
                f"model.dtype = {self.dtype!r} with full fine-tuning (model.lora unset) would make AdamW "
                f"update {self.dtype} weights, whose rounding swallows updates at small learning rates "
                f"(at lr 5e-7 almost no weight changes). Use float32 master weights with {self.dtype} "
                f"compute: model.dtype = 'float32' and train.compute_dtype = {self.dtype!r}; or train a "
                f"LoRA adapter (model.lora) over the {self.dtype} base"
            )
        return self


class TaskSpec(Section):
    name: str = Field("sudoku", min_length=1, max_length=256)
    """Registered task name (sudoku, countdown, math) or an import path 'pkg.module:factory'
    (import paths only where allowed: see dlrl.tasks.get_task)."""
    style: Literal["compact", "chat"] = "compact"
    """Prompt style: 'compact' for tiny character-level models, 'chat' for instruct models."""
    options: dict[str, Any] = Field(default_factory=dict, max_length=64)
    """Task-specific options passed to the task factory (e.g. path of a JSONL file, blanks)."""
    train_size: int | None = Field(None, ge=1, le=100_000_000)
    """Number of training examples (None: the task's default/all)."""
    eval_size: int = Field(48, ge=1, le=1_000_000)
    """Number of held-out test examples evaluated."""


class RolloutSpec(Decoding):
    """How rollouts are decoded (the fields of dlrl.decoding.Decoding, with their bounds and
    rules: `engine`, `cache`, `threshold`, `factor`, `cfg_scale`, ... are documented there) and
    how many: prompts, group size, batching, workers. The engine named here decodes the
    evaluations too (evaluation is greedy)."""

    prompts_per_step: int = Field(16, ge=1, le=65_536)
    """Prompts (groups) per learner step."""
    group_size: int = Field(8, ge=1, le=4096)
    """Completions sampled per prompt (G)."""
    gen_length: Tokens = 256
    """Generated tokens per completion (L)."""
    block_length: Tokens = 32
    """Semi-autoregressive block length of the sampler."""
    steps: Tokens = 128
    """Diffusion sampling steps for the whole response."""
    temperature: Temperature = 0.6
    """Gumbel-max sampling temperature for rollouts (evaluation is greedy)."""
    batch_size: int = Field(64, ge=1, le=65_536)
    """Sequences generated per forward batch in a worker."""
    num_workers: int = Field(1, ge=1, le=1024)
    """Rollout actors."""


class TrainSpec(Section):
    algorithm: Literal["bgpo", "naive_elbo", "diffu_grpo"] = "bgpo"
    """Policy objective: BGPO (chunked bound), the naive ELBO ratio, or d1's diffu-GRPO."""
    steps: int = Field(400, ge=1, le=10_000_000)
    """Learner steps (one rollout batch each)."""
    n_mc: int = Field(16, ge=1, le=4096)
    """Monte-Carlo ELBO samples per completion (n_t)."""
    mc_chunk: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = 1
    """MC samples per ELBO forward pass (1 = least memory; n_mc = one pass). BGPO runs each
    chunk's forward and backward at once, so only one chunk's graph is alive; the naive ELBO ratio
    chunks its forward passes too but keeps every chunk's graph until its one backward, so chunking
    saves it no memory; diffu-GRPO makes one pass and ignores it. The old-policy ELBO terms (no
    graph) are computed in the same chunks. "auto": the largest that fits the learner's free
    memory, chosen once at start (learner.memory.resolve_mc_chunk); every chunk size gives the
    same gradient."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward instead of keeping its activations
    (learner.memory): about a block's worth of activations instead of all of them, for roughly
    one more forward pass of compute."""
    mask_scheme: Literal["iid", "stratified", "antithetic"] = "stratified"
    """How the n_mc masks of a completion are drawn."""
    mask_coupling: Literal["completion", "group"] = "group"
    """'group': completion i of a group uses the same MC masks as its siblings (common random
    numbers). Each completion's ELBO estimate is unchanged in law, but tokens the G completions
    share then get (nearly) cancelling updates, since advantages sum to zero within a group;
    'completion': independent masks per completion."""
    time_form: Literal["auto", "discrete", "continuous", "bernoulli"] = "auto"
    """Mask-count (k ~ U{1..L}, weight L/k), continuous-time (t ~ U(0,1), weight 1/t) or SDAR's
    Bernoulli (p = (1 - 1e-3) t + 1e-3, weight 1/p, >= 1 mask) ELBO (dlrl.diffusion.mc_masks).
    "auto": the model family's, the form it was trained with (dlrl.batch.time_form_for):
    "bernoulli" for block-diffusion families (SDAR / TraDo, LLaDA2.x), "discrete" otherwise."""
    normalize: Literal["token", "sequence"] = "token"
    """Divide each ELBO term by L (per-token) or keep the sequence bound."""
    lr: float = Field(5e-7, gt=0, le=1.0)
    """AdamW's peak learning rate: reached after warmup_steps, then decayed as lr_decay says
    (learner/schedule.py)."""
    warmup_steps: int = Field(0, ge=0, le=10_000_000)
    """Linear learning-rate warm-up: Adam's first steps are sign-like (as large as lr on every
    weight whatever the gradient's size), which jolts an already-trained policy."""
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate decay after warm-up, to lr * final_lr_ratio at the last step: the last steps
    then move the policy less, so the run does not end on its noisiest updates."""
    final_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The decayed learning rate at the last step, as a fraction of lr (not used when constant)."""
    weight_decay: float = Field(0.01, ge=0, le=10.0)
    """AdamW weight decay."""
    betas: tuple[Beta, Beta] = Field((0.9, 0.99), strict=False)  # a TOML/JSON array is fine
    """AdamW betas."""
    grad_clip: float = Field(1.0, gt=0, le=1e6)
    """Max global gradient norm."""
    micro_batch: int = Field(8, ge=1, le=65_536)
    """Completions per forward pass (times mc_chunk rows)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32", "float64"] = "auto"
    """dtype of the learner's matmuls (torch.autocast; dlrl.precision), while the weights and
    AdamW's state stay in model.dtype. "auto": bfloat16 on CUDA, model.dtype on the CPU.
    "float32"/"float64" (no autocast) must equal model.dtype."""
    updates_per_batch: int = Field(1, ge=1, le=1024)
    """Optimizer steps on each rollout batch (1 = strictly on-policy)."""
    clip_eps: float | None = Field(0.2, gt=0, le=1e6)
    """PPO clip of the ratio (None = off): BGPO's per MC sample, diffu-GRPO's per token (0.2, the
    default, is d1's). The naive ELBO ratio is not clipped."""
    dual_clip: float | None = Field(3.0, gt=1, le=1e6)
    """Dual-clip cap for negative advantages (None = off)."""
    p_mask_prompt: float = Field(0.15, ge=0, le=1)
    """diffu-GRPO only: probability of masking each prompt token."""
    seed: int = Field(0, ge=-(2**63), lt=2**63)
    """Seeds prompt order, sampling noise and MC masks."""

    @model_validator(mode="after")
    def _chunk_fits(self) -> "TrainSpec":
        if self.mc_chunk != "auto" and self.mc_chunk > self.n_mc:
            raise ValueError(f"mc_chunk {self.mc_chunk} exceeds n_mc {self.n_mc}")
        return self


class EvalSpec(Section):
    every: int = Field(10, ge=1, le=10_000_000)
    """Evaluate the held-out set every this many learner steps (and before the first)."""
    steps: Tokens | None = None
    """Sampling steps for evaluation (None: same as rollout)."""
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    """Remasking of the greedy evaluation decode (rollouts use rollout.remasking)."""
    samples: int = Field(4, ge=0, le=256)
    """Completions each evaluation logs to <run>/samples.jsonl (the first held-out prompts, the same
    ones every time, with their greedy completion and reward; one is printed): seeing what the model
    writes catches a reward hack or a format collapse that the mean hides. 0: none."""
    protocol: str | None = Field(None, min_length=1, max_length=4096)
    """A protocol file (deploy/eval/*.toml): the periodic evaluation then runs it exactly as
    `dlrl eval` does (its task, data, prompts, extraction, decoding; task.eval_size, eval.steps and
    eval.remasking are not used), logs `eval_score` and writes <run>/eval/step-<k>/. A relative
    path is taken from the current directory, else from the dlrl checkout (so
    "deploy/eval/tiny-sudoku.toml" names a shipped protocol from anywhere); it is stored resolved."""

    @field_validator("protocol")
    @classmethod
    def _protocol_file(cls, value: str | None) -> str | None:
        """The file is read and validated now, so a bad protocol fails the spec, not step 0."""
        if value is None:
            return None
        if not FILE_CHECKS.get():  # untrusted: a lexical path only; admission checks where, then reads
            if "\x00" in value or not value.endswith(".toml"):
                raise ValueError(f"eval.protocol: {value!r} is not a protocol file (a .toml path)")
            return os.path.normpath(value if os.path.isabs(value) else CHECKOUT / value)
        path = protocol_path(value)
        # lazy: dlrl.config stays light for the API and the CLI (the protocol pulls in the tasks)
        from dlrl.eval_protocol import EvalProtocol, ProtocolError

        try:
            EvalProtocol.from_toml(path)
        except ProtocolError as exc:
            raise ValueError(f"eval.protocol: {exc}") from None
        return str(path)


def protocol_path(value: str) -> Path:
    """An eval.protocol value as an absolute path (see `EvalSpec.protocol`). Only `.toml` paths
    are read: over the API this validation runs before the admission policy's location rule
    (services.api.admission), so what a submission can learn about a file outside the allowed
    folders is limited to whether a .toml file there exists and is a valid protocol."""
    if "\x00" in value or not value.endswith(".toml"):
        raise ValueError(f"eval.protocol: {value!r} is not a protocol file (a .toml path)")
    raw = Path(value)
    try:
        if not raw.is_absolute() and not raw.exists() and (CHECKOUT / raw).exists():
            raw = CHECKOUT / raw
        return raw.resolve()
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
        raise ValueError(f"eval.protocol: cannot resolve {value!r}: {exc}") from None


FILE_CHECKS: ContextVar[bool] = ContextVar("dlrl_spec_file_checks", default=True)
"""Whether validating a spec reads the files it names (eval.protocol). The job API turns this off
while it serves a request (services.api.api): a submitted spec is untrusted until admitted, so it must
not learn through validation errors what files the server has; the admission policy checks the
path's location first and only then reads the file. The job itself validates with reading on."""


class QueueSpec(Section):
    """The trajectory queue between rollout workers and the learner (dlrl.queue)."""

    backend: Literal["ray", "redis"] = "ray"
    """'ray': an actor-held queue inside the Ray cluster (the local default); 'redis': a Redis
    Stream that outlives the run's processes (the distributed deployment)."""
    redis_url: str | None = Field(None, max_length=2048)
    """redis://[:password@]host:port/db. None: the DLRL_REDIS_URL environment variable, so the
    password need not be written into the spec."""
    capacity: int | None = Field(None, ge=1, le=10_000_000)
    """Groups queued but not yet acknowledged before producers block (back-pressure).
    None: (max_staleness + 2 + checkpoint steps) x prompts_per_step (dlrl.queue.default_capacity:
    entries are acknowledged only once their step is in a checkpoint)."""
    maxlen: int = Field(100_000, ge=1, le=100_000_000)
    """Approximate bound on the Redis stream's length (XADD MAXLEN ~): acknowledged history is trimmed."""


class WeightsSpec(Section):
    """How the learner's weights reach the rollout workers (dlrl.weights)."""

    sync: Literal["object_store", "collective"] = "object_store"
    """'object_store': ray.put once, workers fetch (CPU and default). 'collective': bucketed
    torch.distributed broadcast (NCCL on GPUs, gloo on CPUs), falling back to the object store."""
    bucket_mb: float = Field(256.0, gt=0, le=65_536)
    """Bucket size of the collective broadcast."""


class RuntimeSpec(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the learner and workers run. 'cuda': each asks for its GPUs (learner_gpus,
    worker_gpus) whatever the cluster shows at start, so an autoscaling cluster scales up.
    'auto': GPUs only if the cluster has some when the job starts, shared (small machines).
    See services/driver/placement.py."""
    learner_ranks: int = Field(1, ge=1, le=512)
    """Learner processes. N > 1: a learner group that shards the model, its gradients and AdamW
    state 1/N per rank with FSDP2 and trains 1/N of each batch per rank (learner/sharding.py);
    the gradient is the single learner's. One per GPU with device = 'cuda'. A checkpoint resumes
    only with the N that wrote it."""
    learner_gpus: float = Field(1.0, gt=0, le=64)
    """GPUs each learner rank asks for with device = 'cuda' (a fraction shares a GPU)."""
    worker_gpus: float = Field(1.0, gt=0, le=64)
    """GPUs each rollout worker asks for with device = 'cuda'."""
    placement_timeout_s: float = Field(600.0, gt=0, le=86_400)
    """How long the job waits for the cluster to grant its actors' resources (an autoscaler
    starting nodes included) before it fails with what it asked for."""
    publish_timeout_s: float = Field(1800.0, gt=0, le=86_400)
    """How long the driver waits for the learner to hand over a weights version. The first one of
    a run, and the first after a learner restart, waits for the learner's start as well: its
    process, imports, model load and checkpoint restore -- minutes for an 8B model, or for a tiny
    one on a heavily loaded machine (a fixed 60 s once failed such a run); later ones, for the copy
    of the weights into the object store. Past it the run fails, naming this setting. The default
    is the driver's wait for any other learner call (a save, an evaluation)."""
    ray_address: str | None = Field(None, max_length=2048)
    """Existing Ray cluster to join (None: start Ray in-process)."""
    num_cpus: int | None = Field(None, ge=1, le=4096)
    """CPUs for an in-process Ray (None: all)."""
    threads: int | None = Field(None, ge=1, le=1024)
    """torch threads per actor (None: the machine's cores, since sync actors take turns)."""
    out_dir: str = Field("runs", min_length=1, max_length=4096)
    """Runs are written to <out_dir>/<name>/."""
    checkpoint_every: int | None = Field(None, ge=0, le=10_000_000)
    """Save an HF checkpoint (and the resume state) every k steps; 0: only at the end. None (the
    default): every eval.every steps, so a run stopped anywhere (Ctrl-C, `dlrl stop`, a crash)
    resumes from its last evaluated step (`JobSpec.checkpoint_every` resolves it)."""
    max_staleness: int = Field(0, ge=0, le=1024)
    """0: synchronous, exactly on-policy. S >= 1: the driver dispatches rollout batch b once
    b <= version + S, so workers generate at most S weight versions ahead of the learner. The
    bound is kept by that dispatch rule, not by dropping late groups: every group is trained at
    its step (only a group whose step is already done, e.g. a rewound run's leftover, is dropped
    and counted as stale_dropped). A run resumed with `--resume` is bit-identical to the
    uninterrupted one only at 0: with S >= 1 the S batches after the checkpoint are regenerated
    by the checkpoint's weights, not the older ones that first made them (services.driver.driver)."""
    max_restarts: int = Field(3, ge=0, le=1000)
    """Times Ray restarts a crashed rollout worker and retries its call (its unfinished groups
    are redone), and times the driver rebuilds a dead learner (dead in a step or a checkpoint
    write) from its checkpoint without the run getting past the furthest step it had finished
    (then the run fails)."""
    keep_checkpoints: bool = False
    """Also keep every checkpoint (each checkpoint_every steps, and the last) as
    <run>/checkpoints/step-<k> (weights and trainer_state.json, no optimizer state), and record in
    <run>/best.json the kept step with the best periodic evaluation (ties: the earliest), the one
    `dlrl eval <run> --protocol <eval.protocol>` selects. checkpoint_every must then be a multiple
    of eval.every, so that every kept step is evaluated."""
    tracker: Literal["tensorboard"] | None = None
    """Also send every metrics record to an experiment tracker: 'tensorboard' writes
    <run>/tensorboard/ with torch.utils.tensorboard (needs the `tensorboard` package: pip install
    'dlrl[tracker]'); `tensorboard --logdir runs` shows it. None: metrics.jsonl only."""


class JobSpec(Section):
    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Run name: the folder under out_dir."""
    model: ModelSpec = ModelSpec()
    task: TaskSpec = TaskSpec()
    rollout: RolloutSpec = RolloutSpec()
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    queue: QueueSpec = QueueSpec()
    weights: WeightsSpec = WeightsSpec()
    runtime: RuntimeSpec = RuntimeSpec()

    @property
    def checkpoint_every(self) -> int:
        """runtime.checkpoint_every, with its default (None) resolved to eval.every: what the
        driver, the learner and the queue's capacity go by."""
        every = self.runtime.checkpoint_every
        return self.eval.every if every is None else every

    @model_validator(mode="after")
    def _compute_dtype_fits(self) -> "JobSpec":
        compute = self.train.compute_dtype
        if compute in ("float32", "float64") and compute != self.model.dtype:
            raise ValueError(
                f"train.compute_dtype = {compute!r} with model.dtype = {self.model.dtype!r}: autocast only "
                f"lowers precision (to bfloat16 or float16); use train.compute_dtype = "
                f"{self.model.dtype!r} or 'auto' for no autocast"
            )
        if compute in ("bfloat16", "float16") and self.model.dtype == "float64":
            raise ValueError(
                f"train.compute_dtype = {compute!r} with model.dtype = 'float64': torch.autocast leaves "
                f"float64 tensors alone, so nothing would run in {compute}; use float32 master weights"
            )
        return self

    @model_validator(mode="after")
    def _evaluated_as_trained(self) -> "JobSpec":
        if self.runtime.keep_checkpoints and (not self.checkpoint_every or self.checkpoint_every % self.eval.every):
            raise ValueError(f"runtime.keep_checkpoints needs runtime.checkpoint_every ({self.checkpoint_every}) "
                             f"to be a positive multiple of eval.every ({self.eval.every}): best.json "
                             f"chooses among evaluated checkpoints")
        if self.eval.protocol is not None and FILE_CHECKS.get():
            from dlrl.eval_protocol import EvalProtocol

            task = EvalProtocol.from_toml(self.eval.protocol).task.name
            if task != self.task.name:
                raise ValueError(f"eval.protocol {self.eval.protocol} is written for task {task!r}, "
                                 f"the job trains task {self.task.name!r}")
        return self

    @classmethod
    def from_toml(cls, path: str | Path) -> "JobSpec":
        with open(path, "rb") as f:
            return cls.model_validate(tomllib.load(f))
