"""GPU memory of a job, from its spec and the model's shape: what `dlrl plan` prints.

Pure functions of numbers; every formula is in bytes and its docstring says what it counts.
h = hidden size, f = MLP width, kv = key/value width (heads x head_dim, smaller under GQA),
V = vocab, n = layers, b = bytes per element of the compute dtype, T = prompt + response tokens,
L = response tokens, rows = micro_batch x the MC copies whose graphs are alive at once (the
objective's memory term, `GraphCopies`: mc_chunk for BGPO, n_mc for the naive ELBO ratio).

The learner's layout is FSDP-style (ZeRO-3): with N learner GPUs each holds 1/N of the master
weights, their gradients and AdamW's two moments, and gathers the full weights one transformer
block at a time in the compute dtype (two blocks in flight: the one running, the one prefetched),
plus the root module (embedding and head), which stays gathered. With N = 1 there is no sharding
and autocast caches a compute-dtype copy of every weight for the forward instead. N > 1 is the
FSDP2 learner group (`runtime.learner_ranks`, learner/sharding.py), whose layout this is.

The activation formula counts the tensors autograd saves in the built-in block
(dlrl/models/bidirectional.py); LLaDA's and Dream's blocks are the same Llama-style layers (RMSNorm,
rotary attention, SwiGLU), so it is applied to their shapes too. Attention is SDPA without a
stored T x T score matrix (flash / memory-efficient kernels). A MoE model (LLaDA2.x) stores and
trains every expert, so its weights, gradients, optimizer states and gathered blocks are sized by
the total parameters, and its activations by what a token runs through (the routed experts it is
sent to and the shared one: `moe_block_activation_bytes`).
stored T x T score matrix (flash / memory-efficient kernels).

A block-diffusion family (`ModelShape.bd3`) is scored on its training layout [x_t ; x_0]
(dlrl.block_elbo), cropped to the columns the response depends on: every forward carries at most
T + L + B - 1 tokens (B its block size; `bd3_tokens`) under a dense mask of that side. Every
family's ELBO pass projects only the masked response positions onto the vocabulary, in chunks of
at most LOGIT_CHUNK logits (dlrl.models.output_head, `logits_bytes`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dlrl.config import JobSpec, LoraSpec
from dlrl.decoding import PER_BLOCK_STEPS

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_CONFIGS = ASSETS / "model-configs"
"""Published config.json of hub checkpoints, `<org>--<name>.json`, so a plan needs no download."""

BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
GB = 1e9

LOGIT_CHUNK = 2**25
"""Most logits the learner's ELBO head holds at once (dlrl.models.output_head): it projects the
rows it sums over in chunks of LOGIT_CHUNK // V rows (265 at LLaDA's 126,464-token vocabulary:
128 MB of float32 logits, and a head matmul of 2 x 265 x 4096 x 126,464 FLOP per chunk at 8B)."""


def logit_chunk_rows(vocab: int) -> int:
    """Rows per chunk of the ELBO head's projection: at most LOGIT_CHUNK logits, at least one row."""
    return max(1, LOGIT_CHUNK // vocab)


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: the sizes of a Llama-style masked-diffusion transformer, dense or MoE.

    A MoE model (experts > 0, LLaDA2.x) has `dense_layers` leading layers with a SwiGLU of width
    `ffn` and MoE layers after them: `experts` routed SwiGLU experts of width `expert_ffn`, of
    which `experts_per_token` run per token, one shared SwiGLU of width shared_experts x expert_ffn
    that every token runs, and a router (experts x hidden). Weights, gradients and optimizer states
    are sized by the total parameters (every expert is stored and trained); activations and FLOPs
    by the active ones (what one token runs through).
    """

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    tied: bool = False
    qkv_bias: bool = False
    head_dim: int | None = None
    """Width of one attention head; None: hidden / heads (Qwen3 sets it apart: 4B has 2560 / 32 = 80
    but head_dim 128)."""
    qk_norm: bool = False
    """Per-head RMSNorm gains on q and k (Qwen3, SDAR): 2 x head_dim parameters per block."""
    out_bias: bool = False
    """A bias on the attention's out projection (Qwen3's `attention_bias` sets it with q, k, v's)."""
    experts: int = 0
    """Routed experts per MoE layer; 0: a dense model."""
    experts_per_token: int = 0
    shared_experts: int = 0
    expert_ffn: int = 0
    dense_layers: int | None = None
    """Layers with a dense SwiGLU of width ffn (the first ones); None: every layer."""
    bd3_block: int = 0
    """The block size of a block-causal family, which the learner scores on the BD3-LM layout
    [x_t ; x_0] (`bd3_tokens` per row under a dense mask, logits of the L response positions
    only); 0 for a full-attention family. Set from the family and config by `shape_from_config`."""

    @property
    def bd3(self) -> bool:
        return self.bd3_block > 0

    @property
    def dim(self) -> int:
        """Width of one attention head."""
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def q(self) -> int:
        """Width of Q (and of the attention output): heads x head_dim; the hidden size unless head_dim says otherwise."""
        return self.heads * self.dim

    @property
    def kv(self) -> int:
        """Width of K (and of V): kv_heads x head_dim."""
        return self.kv_heads * self.dim

    @property
    def moe_layers(self) -> int:
        return 0 if self.experts == 0 else self.layers - (self.dense_layers or 0)

    @property
    def dense_count(self) -> int:
        return self.layers - self.moe_layers

    def attention_params(self) -> int:
        """q, k, v and out projections (+ biases, q/k norm gains) and the block's two RMSNorm gains."""
        h, q, kv = self.hidden, self.q, self.kv
        return (h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.out_bias else 0)
                + (2 * self.dim if self.qk_norm else 0) + 2 * h)

    def dense_block_params(self) -> int:
        """A dense block: attention + the SwiGLU's gate, up, down."""
        return self.attention_params() + 3 * self.hidden * self.ffn

    def moe_block_params(self, active: bool = False) -> int:
        """A MoE block: attention, the router, the shared expert and every routed expert (active:
        only the experts_per_token a token runs)."""
        routed = self.experts_per_token if active else self.experts
        h = self.hidden
        return (self.attention_params() + self.experts * h + 3 * h * self.shared_experts * self.expert_ffn
                + routed * 3 * h * self.expert_ffn)

    def block_params(self) -> int:
        """The largest block (the unit FSDP gathers whole; a dense model's every block)."""
        if self.moe_layers == 0:
            return self.dense_block_params()
        if self.dense_count == 0:
            return self.moe_block_params()
        return max(self.dense_block_params(), self.moe_block_params())

    def root_params(self) -> int:
        """Embedding, output head (unless tied) and the final norm: the FSDP root's own weights."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        """Every parameter (a MoE model's total)."""
        return self.dense_count * self.dense_block_params() + self.moe_layers * self.moe_block_params() + (
            self.root_params())

    def active_params(self) -> int:
        """Parameters one token runs through (embedding and head included): a dense model's all; a
        MoE model's without the experts it is not routed to (LLaDA2.0-mini: "16B-A1.4B")."""
        return self.dense_count * self.dense_block_params() + self.moe_layers * self.moe_block_params(
            active=True) + self.root_params()

    def lora_params(self, r: int) -> int:
        """Adapters of rank r on every linear of every block: r x (in + out) each (a dense block's
        gate and up counted as one fused h -> 2f linear, as the built-in model has them; a MoE
        block's experts' separately, as LLaDA2.x has them)."""
        h, f, q, kv, fe = self.hidden, self.ffn, self.q, self.kv, self.expert_ffn
        attn = (h + q + 2 * kv) + (q + h)
        dense = attn + (h + 2 * f) + (f + h)
        shared = 3 * (h + self.shared_experts * fe) if self.shared_experts else 0
        moe = attn + self.experts * 3 * (h + fe) + shared
        return r * (self.dense_count * dense + self.moe_layers * moe)


def shape_from_config(cfg: dict) -> ModelShape:
    """ModelShape from a config.json dict, read by the config's model family: each family knows its
    own config names (LLaDA's OLMo names, Hugging Face names elsewhere) and its layout's extras."""
    # Imported here: the family registry imports the model classes (torch, transformers), which
    # the rest of this module's arithmetic does not need, and each family module imports ModelShape.
    from dlrl.models.families import family_of

    family = family_of(cfg)
    shape = family.shape(cfg)
    block = family.block_size_for(cfg)
    return dataclasses.replace(shape, bd3_block=block) if block is not None else shape


def model_config(path: str) -> dict:
    """config.json for a spec's model.path: a local checkpoint, a built-in asset, or a known hub id."""
    if path.startswith("builtin:"):
        file = ASSETS / path.removeprefix("builtin:") / "config.json"
    elif Path(path).expanduser().is_dir():
        file = Path(path).expanduser() / "config.json"
    else:
        file = MODEL_CONFIGS / (path.replace("/", "--") + ".json")
    if not file.is_file():
        known = sorted(p.stem.replace("--", "/") for p in MODEL_CONFIGS.glob("*.json"))
        raise FileNotFoundError(
            f"no config.json for model {path!r}: give a local checkpoint directory, a builtin: model, "
            f"or one of the hub ids with a shipped config: {known}"
        )
    return json.loads(file.read_text())


@dataclass(frozen=True)
class LearnerMemory:
    """Peak bytes on one learner GPU, by kind."""

    weights: int
    grads: int
    optimizer: int
    gathered: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.gathered + self.activations + self.logits


def block_activation_bytes(shape: ModelShape, compute_bytes: int) -> int:
    """Bytes autograd keeps per token for one dense block's backward: 16h + b (2h + 4q + 3kv + 4f).

    Two RMSNorms each keep their float32 input and normalised value (8h) and the linear's input in
    the compute dtype (b h); attention keeps the fused qkv output (q + 2kv), rotated q and k (q + kv),
    the SDPA output and its reshaped copy for the out projection (2q), all in b; the SwiGLU keeps
    the gate/up output (2f), silu(gate) (f) and the product fed to `down` (f). The residual stream
    is float32 (embedding output plus bf16 branch outputs promotes to float32). q = h unless the
    config sets head_dim apart (Qwen3); the per-head q/k norms' small saves are not counted.
    """
    h, f, q, kv = shape.hidden, shape.ffn, shape.q, shape.kv
    return 16 * h + compute_bytes * (2 * h + 4 * q + 3 * kv + 4 * f)


def moe_block_activation_bytes(shape: ModelShape, compute_bytes: int) -> int:
    """Bytes per token for one MoE block's backward (dlrl/models/llada2.py), by what a token runs:
    16h + b (2h + 4q + 3kv + 4 f_a) + k h (2b + 4) + 8E, with f_a = (k + shared) x expert_ffn.

    Norms and attention as in a dense block; each of the k routed experts and the shared one keeps
    a SwiGLU's tensors (4 expert widths); each of the k slots also keeps its gathered input row and
    its output (2 b h) and the float32 copy the weighted sum multiplies (4h); the router keeps its
    float32 logits and sigmoid scores (8E).
    """
    h, q, kv, k = shape.hidden, shape.q, shape.kv, shape.experts_per_token
    active_ffn = (k + shape.shared_experts) * shape.expert_ffn
    return (16 * h + compute_bytes * (2 * h + 4 * q + 3 * kv + 4 * active_ffn) + k * h * (2 * compute_bytes + 4)
            + 8 * shape.experts)


def lora_activation_bytes(shape: ModelShape) -> int:
    """Extra bytes per token per dense block with LoRA: peft feeds each adapter a float32 copy of its input."""
    h, f = shape.hidden, shape.ffn
    return 4 * (3 * h + f)


def moe_lora_activation_bytes(shape: ModelShape) -> int:
    """The same for a MoE block: attention's two inputs (2h), and the gate, up and down inputs of
    each routed expert a token runs (k (2h + expert_ffn)) and of the shared one."""
    h, fe, k = shape.hidden, shape.expert_ffn, shape.experts_per_token
    shared = 2 * h + shape.shared_experts * fe if shape.shared_experts else 0
    return 4 * (2 * h + k * (2 * h + fe) + shared)


def activation_bytes(
    shape: ModelShape, rows: int, seq_len: int, compute_bytes: int, checkpointing: bool, lora: bool = False
) -> int:
    """Saved activations of one forward over rows x seq_len tokens, all n blocks.

    Without checkpointing every block keeps its tensors until the backward reaches it. With
    activation checkpointing per block only each block's float32 input (4h) is kept and one block
    is recomputed at a time: n x 4h + one block's tensors, per token.
    """
    per_block = block_activation_bytes(shape, compute_bytes) + (lora_activation_bytes(shape) if lora else 0)
    tokens = rows * seq_len
    if shape.moe_layers == 0:
        if checkpointing:
            return tokens * (shape.layers * 4 * shape.hidden + per_block)
        return tokens * shape.layers * per_block
    per_moe = moe_block_activation_bytes(shape, compute_bytes) + (moe_lora_activation_bytes(shape) if lora else 0)
    if checkpointing:
        return tokens * (shape.layers * 4 * shape.hidden + max(per_moe, per_block if shape.dense_count else 0))
    return tokens * (shape.dense_count * per_block + shape.moe_layers * per_moe)


def logits_bytes(shape: ModelShape, rows: int, resp_len: int, compute_bytes: int) -> int:
    """The ELBO head's peak: c V (b + 8) + V h (4 + b') + 8 K h.

    The head projects only the K <= rows x L masked response positions (all L for diffu-GRPO's
    one step), c = min(K, LOGIT_CHUNK // V) rows at a time, each chunk's logits recomputed in the
    backward (dlrl.models.output_head). Its peak is a chunk's backward: the head's output (b) and,
    in float32, logsumexp's exponentials and the gradient through the gather (4 + 4), beside the
    head weight's gradient of that chunk before it is added to .grad (V h x 4, plus b' = b for the
    compute-dtype copy's own gradient when b < 4). The gathered hidden rows are float32 (the
    residual stream's dtype through the final norm): kept for the backward, and their gradient
    scattered back (4 + 4 per element of K x h). Counted with K = rows x L, the most that can be
    masked. Measured on the CPU at LLaDA's vocabulary (hidden 256, 512 rows): 12.2 (float32) and
    14.1 (bfloat16 autocast) bytes per chunk logit with the weight's gradient, against 12 and 11.9
    here (tests/test_plan.py checks the whole step to 25%).
    """
    k = rows * resp_len
    chunk = min(k, logit_chunk_rows(shape.vocab))
    weight_grad = shape.vocab * shape.hidden * (4 + (compute_bytes if compute_bytes < 4 else 0))
    return chunk * shape.vocab * (compute_bytes + 8) + weight_grad + 8 * k * shape.hidden


def bd3_tokens(shape: ModelShape, seq_len: int, resp_len: int) -> int:
    """Positions a row forwards: T for a full-attention family; for a block family its cropped
    BD3-LM layout (dlrl.block_elbo.bd3_columns), the noisy half from the block that holds the
    first response token (at most L + B - 1 columns) and the clean half (at most T: it drops the
    last block's), capped at the whole 2T. An upper bound: left padding can only crop more."""
    if not shape.bd3:
        return seq_len
    return min(2 * seq_len, seq_len + resp_len + shape.bd3_block - 1)


def bd3_mask_bytes(shape: ModelShape, rows: int, seq_len: int, resp_len: int, compute_bytes: int,
                   checkpointing: bool) -> int:
    """The BD3 layout's attention mask: rows x S^2 x (1 + b x blocks kept), S = `bd3_tokens`; 0 for
    other layouts.

    The boolean (B, 1, S, S) mask (dlrl.models.block_mask.bd3_mask, one byte an entry, all rows
    counted: left-padded rows each have their own), and the additive compute-dtype copy SDPA makes
    of it in every block and saves for that block's backward (the memory-efficient kernel takes a
    bias, not a boolean): n copies, or one with activation checkpointing (only the recomputed
    block's is alive). A block-sparse kernel (flex attention) would need neither.
    """
    if not shape.bd3:
        return 0
    kept = 1 if checkpointing else shape.layers
    return rows * bd3_tokens(shape, seq_len, resp_len) ** 2 * (1 + compute_bytes * kept)


def learner_memory(
    shape: ModelShape,
    *,
    gpus: int,
    master_bytes: int,
    compute_bytes: int,
    rows: int,
    seq_len: int,
    resp_len: int,
    checkpointing: bool = False,
    lora_r: int | None = None,
) -> LearnerMemory:
    """Per-GPU learner memory at the peak of a step (the last MC chunk's backward, grads present).

    Full fine-tuning, P params stored in m = master_bytes: weights m P / N, grads m P / N, AdamW's
    two moments 2 m P / N. LoRA of rank r: the frozen base m P / N, and A adapter params in float32
    (peft's default) with their grads and moments, 4 A / N each (x2 for the moments).
    Gathered: with N > 1, (2 blocks + root) x b; with N = 1 and autocast (b < m), one compute-dtype
    copy of every weight (autocast's cast cache, alive through the backward).
    """
    p_all = shape.params()
    if lora_r is None:
        trainable, state_bytes, weights = p_all, master_bytes, p_all * master_bytes
    else:
        trainable, state_bytes = shape.lora_params(lora_r), 4
        weights = p_all * master_bytes + trainable * 4
    if gpus > 1:
        gathered = (2 * shape.block_params() + shape.root_params()) * compute_bytes
    else:
        gathered = p_all * compute_bytes if compute_bytes < master_bytes else 0
    return LearnerMemory(
        weights=math.ceil(weights / gpus),
        grads=math.ceil(trainable * state_bytes / gpus),
        optimizer=math.ceil(2 * trainable * state_bytes / gpus),
        gathered=gathered,
        activations=activation_bytes(shape, rows, bd3_tokens(shape, seq_len, resp_len), compute_bytes, checkpointing,
                                     lora_r is not None)
        + bd3_mask_bytes(shape, rows, seq_len, resp_len, compute_bytes, checkpointing),
        logits=logits_bytes(shape, rows, resp_len, compute_bytes),
    )


@dataclass(frozen=True)
class RolloutMemory:
    """Peak bytes on one rollout GPU, by kind."""

    weights: int
    sampling: int
    transfer: int

    @property
    def total(self) -> int:
        return self.weights + self.sampling + self.transfer


def sampling_bytes(
    shape: ModelShape, batch: int, seq_len: int, weight_bytes: int, cfg: bool, temperature: float,
    block: int | None = None,
) -> int:
    """The sampler's peak per denoising step: batch x T x V x (2 b + 32), b = the weights' bytes.

    `block`: a block-diffusion engine's block size (rollout/engines/block.py): then only that
    block's positions are scored per step, over an exact KV cache of the whole sequence, and the
    peak per row is the cache, 2 x layers x kv x T x b, plus one block's logits and sampling
    buffers, B x V x (2 b + 32) (`block_sampling_bytes`).

    Every step scores all T positions (rollout/sampler.py): the logits (b) and their
    mask-excluded copy (b), then Gumbel-max in float64 (LLaDA's reference form: the float64
    logits, the noise, exp of the shifted logits and the quotient, 4 x 8 bytes). Greedy decoding
    skips the noise but keeps a float32 softmax (8). CFG runs a doubled batch and keeps both halves
    (2 b more). The blocks' own activations (no_grad, freed layer by layer) are small beside this.
    """
    per = 2 * weight_bytes + (32 if temperature > 0 else 8) + (2 * weight_bytes if cfg else 0)
    if block is not None:
        return batch * block_sampling_bytes(shape, seq_len, weight_bytes, block, per)
    return batch * seq_len * shape.vocab * per


def block_sampling_bytes(shape: ModelShape, seq_len: int, weight_bytes: int, block: int, per_logit: int) -> int:
    """One row of a block-diffusion sampler: its K/V cache over all seq_len positions (every layer,
    K and V, kv width each, in the weights' dtype) plus one block's scores (`per_logit` bytes per
    vocabulary entry, as `sampling_bytes` counts them). The prompt is prefilled in chunks without
    logits, so the cache is what grows with the sequence."""
    return 2 * shape.layers * shape.kv * seq_len * weight_bytes + block * shape.vocab * per_logit


def rollout_memory(
    shape: ModelShape, *, batch: int, seq_len: int, weight_bytes: int, cfg: bool = False,
    temperature: float = 0.6, bucket_bytes: int = 0, block: int | None = None,
) -> RolloutMemory:
    """Per-GPU rollout worker memory: its weights (P x b) + the sampler's peak + a broadcast bucket."""
    return RolloutMemory(
        weights=shape.params() * weight_bytes,
        sampling=sampling_bytes(shape, batch, seq_len, weight_bytes, cfg, temperature, block),
        transfer=bucket_bytes,
    )


def largest_batch(shape: ModelShape, budget: int, *, seq_len: int, weight_bytes: int, cfg: bool,
                  temperature: float, bucket_bytes: int = 0, block: int | None = None) -> int:
    """The largest rollout batch whose worker fits `budget` bytes (0 if not even one sequence)."""
    fixed = rollout_memory(shape, batch=0, seq_len=seq_len, weight_bytes=weight_bytes, cfg=cfg,
                           temperature=temperature, bucket_bytes=bucket_bytes, block=block).total
    per_seq = sampling_bytes(shape, 1, seq_len, weight_bytes, cfg, temperature, block)
    return max(0, (budget - fixed) // per_seq)


# -- a layout for a job ----------------------------------------------------------------------

GraphCopies = Callable[[int, int], int]
"""An objective's memory term, (n_mc, mc_chunk) -> the MC copies of a row whose forward graph is
alive at once in a backward: mc_chunk for BGPO (each chunk backwarded alone), n_mc for the naive
ELBO ratio (one backward through all of them), 1 for diffu-GRPO (one pass, no MC). The caller
passes its objective's (learner.objectives: Objective.graph_copies); the core reads no objective."""

USABLE = 0.9
"""Share of a GPU's memory a plan fills: the rest is the CUDA context, NCCL buffers and the
allocator's fragmentation."""


@dataclass(frozen=True)
class Plan:
    """A learner/rollout split of `gpus` GPUs and what each kind of GPU holds at its peak."""

    gpus: int
    gpu_bytes: int
    learner_gpus: int
    rollout_gpus: int
    checkpointing: bool
    learner: LearnerMemory
    rollout: RolloutMemory
    rollout_batch: int
    colocated: bool
    mc_chunk: int
    """The MC chunk the learner is sized for (train.mc_chunk, or what "auto" picks here)."""
    graph_copies: int
    """MC copies per row whose graphs the objective keeps alive at once with that chunk."""

    @property
    def budget(self) -> int:
        return int(self.gpu_bytes * USABLE)

    @property
    def fits(self) -> bool:
        if self.colocated:
            return self.learner.total + self.rollout.total <= self.budget
        return self.learner.total <= self.budget and self.rollout.total <= self.budget and self.rollout_batch >= 1


def job_shape(spec: JobSpec) -> ModelShape:
    """The model shape of a JobSpec (see `model_config`)."""
    return shape_from_config(model_config(spec.model.path))


def job_learner_memory(
    spec: JobSpec, shape: ModelShape, gpus: int, checkpointing: bool, prompt_len: int,
    mc_chunk: int | None = None, *, graph_copies: GraphCopies,
) -> LearnerMemory:
    """`learner_memory` for a JobSpec: dtypes from model.dtype / train.compute_dtype, rows from
    train.micro_batch x the objective's graph copies at the chunk (`mc_chunk`, default
    train.mc_chunk, which must then be a number), T from prompt_len + rollout.gen_length."""
    t, m = spec.train, spec.model
    chunk = t.mc_chunk if mc_chunk is None else mc_chunk
    if chunk == "auto":
        raise ValueError("train.mc_chunk = 'auto': pass the chunk to size (largest_mc_chunk picks one)")
    on_cpu = spec.runtime.device == "cpu"
    compute = t.compute_dtype
    compute_bytes = BYTES[compute] if compute != "auto" else BYTES[m.dtype] if on_cpu else BYTES["bfloat16"]
    rows = min(t.micro_batch, spec.rollout.prompts_per_step * spec.rollout.group_size) * graph_copies(t.n_mc, chunk)
    return learner_memory(
        shape, gpus=gpus, master_bytes=BYTES[m.dtype], compute_bytes=min(compute_bytes, BYTES[m.dtype]),
        rows=rows, seq_len=prompt_len + spec.rollout.gen_length, resp_len=spec.rollout.gen_length,
        checkpointing=checkpointing, lora_r=m.lora.r if m.lora is not None else None,
    )


def largest_mc_chunk(
    spec: JobSpec, shape: ModelShape, budget: int, *, gpus: int, checkpointing: bool, prompt_len: int,
    graph_copies: GraphCopies,
) -> int:
    """train.mc_chunk = "auto": the largest chunk c in 1..n_mc whose learner peak fits `budget`
    bytes (1 when even that does not: the least memory a chunked step can take).

    Any c gives BGPO the same gradient (the loss is a sum over MC samples, each chunk backwarded
    on its own), so c only trades memory for fewer, larger passes. The peak does not shrink as c
    grows (rows of activations and logits: `graph_copies`), so the answer is found by bisection.
    An objective whose peak does not depend on c (the naive ELBO ratio keeps all n_mc graphs
    alive) gets n_mc when it fits at all.
    """
    def fits(c: int) -> bool:
        return job_learner_memory(spec, shape, gpus, checkpointing, prompt_len, mc_chunk=c,
                                  graph_copies=graph_copies).total <= budget

    lo, hi = 1, spec.train.n_mc
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def plan(spec: JobSpec, gpus: int, gpu_memory_gb: float, prompt_len: int = 256, *,
         graph_copies: GraphCopies) -> Plan:
    """The split that fits with the fewest learner GPUs (most left to rollout), without
    activation checkpointing if possible. One GPU: learner and rollout worker share it (sync mode
    takes turns, but both keep their weights). Rollout workers (weights in the rollout dtype,
    `rollout_dtype_on`, as rollout/worker.py loads them) run rollout.batch_size sequences, or the
    largest batch that fits.
    train.mc_chunk = "auto" is sized per layout: the largest chunk whose learner fits the budget
    (a colocated rollout worker's weights and one sequence of sampling taken out first).
    `graph_copies` is the job's objective's memory term. Returns the best failing layout when
    nothing fits (`fits` False)."""
    shape = job_shape(spec)
    r = spec.rollout
    gpu_bytes = int(gpu_memory_gb * GB)
    budget = int(gpu_bytes * USABLE)
    seq = prompt_len + r.gen_length
    wbytes = BYTES[rollout_dtype_on(spec, "cpu" if spec.runtime.device == "cpu" else "cuda")]
    bucket = int(spec.weights.bucket_mb * 2**20) if spec.weights.sync == "collective" else 0
    rollout_args = dict(seq_len=seq, weight_bytes=wbytes, cfg=r.cfg_scale > 0, temperature=r.temperature,
                        bucket_bytes=bucket, block=r.block_length if r.engine in PER_BLOCK_STEPS else None)
    candidates: list[Plan] = []
    splits = [(1, 0)] if gpus == 1 else [(n, gpus - n) for n in range(1, gpus)]
    for checkpointing in (False, True):
        for n_learn, n_roll in splits:
            chunk = spec.train.mc_chunk
            if chunk == "auto":
                worker = rollout_memory(shape, batch=1, **rollout_args).total if n_roll == 0 else 0
                chunk = largest_mc_chunk(spec, shape, budget - worker, gpus=n_learn,
                                         checkpointing=checkpointing, prompt_len=prompt_len,
                                         graph_copies=graph_copies)
            learner = job_learner_memory(spec, shape, n_learn, checkpointing, prompt_len, mc_chunk=chunk,
                                         graph_copies=graph_copies)
            room = budget - learner.total if n_roll == 0 else budget
            batch = min(r.batch_size, largest_batch(shape, room, **rollout_args))
            rollout = rollout_memory(shape, batch=max(batch, 1), **rollout_args)
            p = Plan(gpus, gpu_bytes, n_learn, n_roll, checkpointing, learner, rollout, batch, n_roll == 0, chunk,
                     graph_copies(spec.train.n_mc, chunk))
            if p.fits:
                return p
            candidates.append(p)
    return min(candidates, key=lambda p: p.learner.total + p.rollout.total)


def min_gpus_to_fit(spec: JobSpec, gpu_memory_gb: float, prompt_len: int = 256, limit: int = 64, *,
                    graph_copies: GraphCopies) -> int | None:
    """The fewest GPUs of this size on which `plan` finds a layout (None if more than `limit`)."""
    for g in range(1, limit + 1):
        if plan(spec, g, gpu_memory_gb, prompt_len, graph_copies=graph_copies).fits:
            return g
    return None


def _gb(n: int) -> str:
    """A size in the unit that shows it: GB down to 0.1 GB, then MB, then KB (a tiny model's
    memory is real, not "0.0 GB")."""
    for unit, scale in (("GB", GB), ("MB", 1e6), ("KB", 1e3)):
        if n >= 0.1 * scale or unit == "KB":
            return f"{n / scale:6.1f} {unit}"
    return ""


def _count(n: int) -> str:
    """A parameter count: 8.02 B, 0.82 M, 3.1 K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= 0.01 * scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def compute_dtype_on(spec: JobSpec, device_type: str) -> str:
    """train.compute_dtype as the learner resolves it on `device_type` ("cpu"/"cuda"): "auto" is
    bfloat16 on CUDA and the masters' dtype on the CPU (dlrl.precision.autocast_dtype)."""
    compute = spec.train.compute_dtype
    if compute != "auto":
        return compute
    return "bfloat16" if device_type == "cuda" else spec.model.dtype


def rollout_dtype_on(spec: JobSpec, device_type: str) -> str:
    """The dtype rollout workers hold the weights in on `device_type` (dlrl.precision.rollout_dtype):
    the learner's resolved compute dtype, which the config makes equal to model.dtype whenever
    it is not a low-precision autocast dtype (and float64 masters, which autocast leaves alone)."""
    return spec.model.dtype if spec.model.dtype == "float64" else compute_dtype_on(spec, device_type)


def sync_bytes(spec: JobSpec, shape: ModelShape, device_type: str) -> int:
    """Bytes of one weights version on the wire (dlrl.weights): every weight, or a LoRA run's
    adapter tensors only, cast once by the learner to the rollout dtype."""
    params = shape.lora_params(spec.model.lora.r) if spec.model.lora is not None else shape.params()
    return params * BYTES[rollout_dtype_on(spec, device_type)]


def describe(p: Plan, spec: JobSpec, host: bool = False) -> str:
    """The plan as the text `dlrl plan` prints; `host`: a CPU job, sized on this host's memory
    (one "GPU" of p.gpu_bytes that the learner and a rollout worker share)."""
    lm, rm = p.learner, p.rollout
    per = "" if host else " per GPU"
    what = f"LoRA r={spec.model.lora.r}" if spec.model.lora else f"full fine-tune, {spec.model.dtype} masters"
    compute = spec.train.compute_dtype
    device = "cpu" if host else "cuda"
    resolved = compute_dtype_on(spec, device)
    compute_text = f"compute {resolved}" + (f" (auto, on {'the CPU' if host else 'CUDA'})" if compute == "auto" else "")
    batch = f"batch {p.rollout_batch}" if p.rollout_batch >= 1 else "batch 0: not even one sequence fits"
    shape = job_shape(spec)
    moe = (f" ({_count(shape.active_params())} active per token: {shape.experts_per_token} of "
           f"{shape.experts} experts + {shape.shared_experts} shared)" if shape.experts else "")
    lines = [
        f"{spec.model.path}: {_count(shape.params())} params{moe}, {what}, {compute_text}",
        (f"this host: {p.gpu_bytes / GB:.1f} GB of memory, budget {_gb(p.budget).strip()} ({USABLE:.0%})" if host
         else f"{p.gpus} x {p.gpu_bytes / GB:.0f} GB GPUs, budget {_gb(p.budget).strip()} each ({USABLE:.0%})"),
        ("learner: on the CPU, sharing the host with the rollout worker" if host else
         f"learner: {p.learner_gpus} GPU(s){', sharing the GPU with the rollout worker' if p.colocated else ''}"
         f"{', FSDP-style sharded' if p.learner_gpus > 1 else ''}")
        + f", activation checkpointing {'on' if p.checkpointing else 'off'}",
        f"  weights    {_gb(lm.weights)}",
        f"  grads      {_gb(lm.grads)}",
        f"  optimizer  {_gb(lm.optimizer)}",
        f"  gathered   {_gb(lm.gathered)}   (compute-dtype copies)",
        f"  activations{_gb(lm.activations)}   (micro_batch x {p.graph_copies} MC copies alive per row, "
        f"mc_chunk {p.mc_chunk}{' picked by auto' if spec.train.mc_chunk == 'auto' else ''})",
        f"  logits     {_gb(lm.logits)}   (masked response rows only, {logit_chunk_rows(shape.vocab)} rows "
        f"of the vocabulary at a time)",
        f"  total      {_gb(lm.total)}{per}",
        f"rollout: {p.rollout_gpus if not p.colocated else 1} worker(s), {batch}"
        f" (spec: {spec.rollout.batch_size}), weights in {rollout_dtype_on(spec, device)}",
        f"  weights    {_gb(rm.weights)}",
        f"  sampling   {_gb(rm.sampling)}",
        f"  total      {_gb(rm.total)}{per}",
        f"weight sync  {_gb(sync_bytes(spec, shape, device)).strip()} per version, per worker "
        f"({'LoRA adapters' if spec.model.lora else 'every weight'} in {rollout_dtype_on(spec, device)})",
    ]
    if p.fits and p.rollout_batch < spec.rollout.batch_size:
        lines.append(f"set rollout.batch_size = {p.rollout_batch} (the spec's {spec.rollout.batch_size} "
                     f"does not fit a worker)")
    if p.fits and p.learner_gpus > 1:
        lines.append(f"set runtime.learner_ranks = {p.learner_gpus}, runtime.learner_gpus = 1 "
                     f"(the FSDP2 learner group)")
    if p.fits and p.checkpointing:
        lines.append("set train.activation_checkpointing = true")
    if p.fits and not p.colocated:
        lines.append(f"set rollout.num_workers = {p.rollout_gpus}, runtime.worker_gpus = 1")
    if spec.train.mc_chunk == "auto":
        lines.append(f"train.mc_chunk = 'auto' picks {p.mc_chunk} of n_mc {spec.train.n_mc} on "
                     f"{p.gpu_bytes / GB:.0f} GB (the learner decides at start from its free memory)")
    return "\n".join(lines)


def alternatives(spec: JobSpec, gpus: int, gpu_memory_gb: float, prompt_len: int = 256, *,
                 graph_copies: GraphCopies) -> list[str]:
    """What would fit instead, when `plan` finds nothing: LoRA on these GPUs, or more GPUs."""
    out = []
    if spec.model.lora is None:
        lora = spec.model_copy(update={"model": spec.model.model_copy(
            update={"lora": LoraSpec(), "dtype": "bfloat16"})})
        p = plan(lora, gpus, gpu_memory_gb, prompt_len, graph_copies=graph_copies)
        verdict = "fits" if p.fits else "does not fit either"
        out.append(f"LoRA r={lora.model.lora.r} over a bfloat16 base (model.lora, model.dtype = 'bfloat16') "
                   f"{verdict} on {gpus} x {gpu_memory_gb:g} GB: learner {p.learner.total / GB:.1f} GB, "
                   f"rollout {p.rollout.total / GB:.1f} GB at batch {p.rollout_batch}")
    need = min_gpus_to_fit(spec, gpu_memory_gb, prompt_len, graph_copies=graph_copies)
    if need is not None:
        p = plan(spec, need, gpu_memory_gb, prompt_len, graph_copies=graph_copies)
        out.append(f"this spec fits on {need} x {gpu_memory_gb:g} GB GPUs: {p.learner_gpus} learner "
                   f"(sharded, {p.learner.total / GB:.1f} GB each) + {p.rollout_gpus} rollout")
    return out
