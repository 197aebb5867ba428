"""`dlrl plan`: the footprint formulas, checked against a measured learner step and known model
sizes; the paper spec's plan on 8 x 80 GB; a layout that cannot fit exits non-zero."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dlrl import footprint as fp
from dlrl.batch import collate
from dlrl.config import JobSpec, LoraSpec
from dlrl.models import load_model
from dlrl.trajectory import TrajectoryGroup
from learner.objectives import OBJECTIVES, objective_for
from learner.step import train_step
from services.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "deploy/jobs/llada-gsm8k.toml"


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measured_peak_bytes(step) -> int:
    """Peak bytes of live CPU tensors while `step()` runs (what CUDA's max_memory_allocated counts).

    torch's profiler records every allocation and free of the CPU allocator (+/- bytes, with a
    timestamp); tensors alive before it starts (weights, last step's grads, AdamW's moments) are
    added as a baseline by the caller. Peak = baseline + the largest running sum of the events.
    RSS would also count the allocator's cached pages, thread arenas and lazily loaded kernels,
    which at this size swamp the tensors; tracemalloc does not see torch's allocator at all.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")  # only CPU is profiled
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def _groups(vocab: int, prompt: int, length: int, n: int = 2, g: int = 4) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(0)
    return [
        TrajectoryGroup(group_id=f"g{k}", task="t", prompt_id=str(k),
                        prompt_ids=rng.integers(3, vocab, size=prompt),
                        completion_ids=rng.integers(3, vocab, size=(g, length)),
                        rewards=np.array([1.0, 0.0, 0.5, 0.0][:g]), policy_version=0, mask_seed=k)
        for k in range(n)
    ]


@pytest.mark.parametrize("compute, algorithm, chunk", [
    ("auto", "bgpo", 2), ("bfloat16", "bgpo", 2),
    ("auto", "naive_elbo", 1),  # all 4 MC graphs alive whatever the chunk: sized as 4, not 1
    ("auto", "diffu_grpo", 2),  # one pass, no MC copies: sized as 1
])
def test_plan_for_the_tiny_model_is_within_25_percent_of_a_measured_step(compute, algorithm, chunk):
    prompt, length = 24, 64
    spec = JobSpec.model_validate({
        "runtime": {"device": "cpu"},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "gen_length": length, "block_length": 32, "steps": 64},
        "train": {"n_mc": 4, "mc_chunk": chunk, "micro_batch": 8, "compute_dtype": compute, "algorithm": algorithm},
    })
    model, tok = load_model(spec.model.path, dtype=spec.model.dtype)
    vocab = model.get_input_embeddings().num_embeddings
    batch = collate(_groups(vocab, prompt, length), pad_id=tok.pad_token_id, eos_ids=(tok.eos_token_id,), n_mc=4)
    t = spec.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    train_step(model, opt, batch, t, tok.mask_token_id)  # AdamW's moments now exist
    opt.zero_grad(set_to_none=True)  # as the step starts: frees outside the profile would be missed

    def step():
        train_step(model, opt, batch, t, tok.mask_token_id)

    baseline = (_tensor_bytes(model.parameters())
                + _tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)))
    measured = baseline + measured_peak_bytes(step)
    planned = fp.job_learner_memory(spec, fp.job_shape(spec), gpus=1, checkpointing=False, prompt_len=prompt,
                                    graph_copies=objective_for(t).graph_copies)
    print(f"tiny learner step, {algorithm}, compute {compute}: planned {planned.total / 1e6:.1f} MB "
          f"(activations {planned.activations / 1e6:.1f}), measured peak {measured / 1e6:.1f} MB")
    assert abs(planned.total - measured) <= 0.25 * measured


# -- formulas ------------------------------------------------------------------------------------

def test_parameter_counts_match_the_models():
    model, _ = load_model("builtin:tiny-sudoku")
    tiny = fp.shape_from_config(fp.model_config("builtin:tiny-sudoku"))
    assert tiny.params() == sum(p.numel() for p in model.parameters())
    lora, _ = load_model("builtin:tiny-sudoku", lora=LoraSpec(r=4))
    assert tiny.lora_params(4) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    # Published sizes: LLaDA-8B 8.02 B; Dream-7B has Qwen2.5-7B's shape, 7.61 B.
    llada = fp.shape_from_config(fp.model_config("GSAI-ML/LLaDA-8B-Instruct"))
    dream = fp.shape_from_config(fp.model_config("Dream-org/Dream-v0-Instruct-7B"))
    assert round(llada.params() / 1e9, 2) == 8.02 and llada.kv == 4096
    assert abs(dream.params() - 7.61e9) < 0.01e9 and dream.kv == 512 and dream.qkv_bias


def test_block_activation_formula_by_hand():
    s = fp.ModelShape(vocab=10, hidden=8, layers=2, heads=2, kv_heads=1, ffn=16)
    assert s.kv == 4
    # 16h + b (6h + 3kv + 4f) with h 8, kv 4, f 16: fp32 128 + 4 * 124, bf16 128 + 2 * 124.
    assert fp.block_activation_bytes(s, 4) == 128 + 4 * 124
    assert fp.block_activation_bytes(s, 2) == 128 + 2 * 124
    full = fp.activation_bytes(s, rows=3, seq_len=5, compute_bytes=2, checkpointing=False)
    ckpt = fp.activation_bytes(s, rows=3, seq_len=5, compute_bytes=2, checkpointing=True)
    assert full == 15 * 2 * (128 + 248)
    assert ckpt == 15 * (2 * 4 * 8 + 128 + 248)


def test_sharding_divides_the_states_and_gathers_blocks():
    s = fp.shape_from_config(fp.model_config("GSAI-ML/LLaDA-8B-Instruct"))
    kw = dict(master_bytes=4, compute_bytes=2, rows=1, seq_len=768, resp_len=512)
    one, four = fp.learner_memory(s, gpus=1, **kw), fp.learner_memory(s, gpus=4, **kw)
    p = s.params()
    assert (one.weights, one.grads, one.optimizer) == (4 * p, 4 * p, 8 * p)  # 16 bytes / param: 128 GB
    assert four.optimizer == pytest.approx(one.optimizer / 4, abs=1)
    assert one.gathered == 2 * p  # autocast's bf16 copy of every weight
    assert four.gathered == 2 * (2 * s.block_params() + s.root_params())
    assert four.activations == one.activations
    lora = fp.learner_memory(s, gpus=1, lora_r=16, **{**kw, "master_bytes": 2, "compute_bytes": 2})
    assert lora.weights == 2 * p + 4 * s.lora_params(16) and lora.optimizer == 8 * s.lora_params(16)
    assert lora.gathered == 0


def test_largest_batch_is_the_largest_that_fits():
    s = fp.shape_from_config(fp.model_config("GSAI-ML/LLaDA-8B-Instruct"))
    kw = dict(seq_len=768, weight_bytes=2, cfg=False, temperature=0.6)
    budget = 72 * 10**9
    k = fp.largest_batch(s, budget, **kw)
    assert k >= 1
    assert fp.rollout_memory(s, batch=k, **kw).total <= budget < fp.rollout_memory(s, batch=k + 1, **kw).total


def test_model_config_sources():
    local = fp.model_config(str(fp.ASSETS / "tiny-sudoku"))  # a checkpoint directory's config.json
    assert local == fp.model_config("builtin:tiny-sudoku")
    with pytest.raises(FileNotFoundError, match="local checkpoint directory"):
        fp.model_config("someone/unknown-model")


# -- the command -----------------------------------------------------------------------------------

def test_paper_spec_on_8_x_80_gb_fits(capsys):
    assert main(["plan", str(PAPER), "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out.splitlines()[-1] and "8.02 B params" in out
    spec = JobSpec.from_toml(PAPER)
    plan = fp.plan(spec, 8, 80, graph_copies=OBJECTIVES["bgpo"].graph_copies)
    assert plan.fits and plan.learner_gpus + plan.rollout_gpus == 8
    assert plan.rollout_batch == spec.rollout.batch_size  # the shipped batch fits as it is
    # ... and is the largest that fits: bf16 rollout weights (half of fp32 masters) left room for 16
    more = spec.model_copy(update={"rollout": spec.rollout.model_copy(update={"batch_size": 1024})})
    assert fp.plan(more, 8, 80, graph_copies=OBJECTIVES["bgpo"].graph_copies).rollout_batch == spec.rollout.batch_size
    assert plan.rollout.weights == fp.job_shape(spec).params() * 2  # bf16 on the GPUs
    assert "weights in bfloat16" in out and "weight sync  16.0 GB per version" in out
    assert f"{plan.learner.total / 1e9:.1f} GB per GPU" in out


def test_full_finetune_of_8b_on_one_80_gb_gpu_is_refused_with_what_would_fit(capsys):
    assert main(["plan", str(PAPER), "--gpus", "1", "--gpu-memory", "80"]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out
    assert "LoRA r=16" in out and "fits on 1 x 80 GB" in out
    assert "this spec fits on 3 x 80 GB GPUs" in out


def test_plan_rejects_nonsense_sizes(capsys):
    assert main(["plan", str(PAPER), "--gpus", "0", "--gpu-memory", "80"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_plan_reports_what_auto_picks(capsys):
    assert main(["plan", str(PAPER), "--gpus", "8", "--gpu-memory", "80",
                 "--set", "train.mc_chunk=auto"]) == 0
    out = capsys.readouterr().out
    paper = JobSpec.from_toml(PAPER)
    spec = paper.model_copy(update={"train": paper.train.model_copy(update={"mc_chunk": "auto"})})
    bgpo = OBJECTIVES["bgpo"].graph_copies
    plan = fp.plan(spec, 8, 80, graph_copies=bgpo)
    assert plan.fits and 1 <= plan.mc_chunk <= 16
    assert f"train.mc_chunk = 'auto' picks {plan.mc_chunk} of n_mc 16 on 80 GB" in out
    bigger = fp.plan(spec, 8, 141, graph_copies=bgpo)  # an H200 fits a larger chunk
    assert bigger.mc_chunk > plan.mc_chunk


def test_plan_sizes_the_naive_elbo_ratio_for_all_n_mc_graphs(capsys):
    """The naive ratio keeps all n_mc MC graphs alive until its one backward, whatever mc_chunk:
    its plan holds n_mc copies' activations and projected rows, 16x BGPO's at chunk 1 in the paper spec
    (the head's one chunk of logits is the same for both: dlrl.models.output_head)."""
    paper = JobSpec.from_toml(PAPER)
    naive = paper.model_copy(update={"train": paper.train.model_copy(update={"algorithm": "naive_elbo"})})
    shape = fp.job_shape(paper)
    kw = {"gpus": 4, "checkpointing": True, "prompt_len": 256, "mc_chunk": 1}
    b = fp.job_learner_memory(paper, shape, graph_copies=OBJECTIVES["bgpo"].graph_copies, **kw)
    n = fp.job_learner_memory(naive, shape, graph_copies=OBJECTIVES["naive_elbo"].graph_copies, **kw)
    head = fp.logits_bytes(shape, rows=1, resp_len=shape.vocab, compute_bytes=2) - 8 * shape.vocab * shape.hidden
    # ^ one chunk of bf16 logits and the head's weight gradient: the same for both
    assert (n.activations, n.logits - head) == (16 * b.activations, 16 * (b.logits - head))
    assert (n.weights, n.grads, n.optimizer) == (b.weights, b.grads, b.optimizer)
    # The command reads the objective: on 8 x 80 GB BGPO needs no activation checkpointing (the
    # layout a plan sized as BGPO gave the naive ratio before), the naive ratio does.
    assert main(["plan", str(PAPER), "--gpus", "8", "--gpu-memory", "80",
                 "--set", "train.algorithm=naive_elbo"]) == 0
    out = capsys.readouterr().out
    assert "micro_batch x 16 MC copies alive per row" in out and "set train.activation_checkpointing = true" in out
    assert not fp.plan(paper, 8, 80, graph_copies=OBJECTIVES["bgpo"].graph_copies).checkpointing


def test_the_elbo_head_is_sized_by_one_chunk_of_logits_and_the_masked_rows():
    """The learner's ELBO head projects only masked response rows, LOGIT_CHUNK logits at a time
    (dlrl.models.output_head): its term is one chunk of logits and the head's weight gradient
    however many rows, plus 8 bytes per element of the projected hidden rows; never rows x T x V."""
    llada = fp.job_shape(JobSpec.from_toml(PAPER))
    assert llada.vocab == 126_464 and fp.logit_chunk_rows(llada.vocab) == 265
    head = 265 * 126_464 * (2 + 8) + 126_464 * 4096 * (4 + 2)  # one chunk of bf16 logits, the head's gradient
    assert fp.logits_bytes(llada, rows=1, resp_len=100, compute_bytes=2) == (
        100 * 126_464 * 10 + 126_464 * 4096 * 6 + 8 * 100 * 4096)
    for rows in (4, 64):
        assert fp.logits_bytes(llada, rows=rows, resp_len=256, compute_bytes=2) == head + 8 * rows * 256 * 4096
    # 64 rows of 512 tokens: 4.0 GB, where all positions' bf16 logits alone were 8.3 GB
    assert fp.logits_bytes(llada, rows=64, resp_len=256, compute_bytes=2) < 64 * 512 * 126_464 * 2 / 2
