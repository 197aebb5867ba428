"""Mixed precision: bf16 master weights do not learn at lr 5e-7, float32 masters with bf16 compute
do; the learner step runs that way on the CPU; the config refuses the configuration that cannot learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dlrl.batch import collate
from dlrl.config import JobSpec, LoraSpec, TrainSpec
from dlrl.models import load_model
from dlrl.precision import autocast, autocast_dtype, low_precision_masters
from dlrl.trajectory import TrajectoryGroup
from learner.step import train_step

LR = 5e-7
STEPS = 20


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    """Share (by element) of the trainable weights that differ from `before`."""
    changed = total = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            changed += int((p.detach() != before[name]).sum())
            total += p.numel()
    return changed / total


def _train_linear(master: torch.dtype, compute: str, size: int = 2048) -> float:
    """20 AdamW steps at lr 5e-7 on a size x size Linear regression; share of weights changed."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(size, size, bias=False).to(master)  # default init: |w| < 1/sqrt(size)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.AdamW(layer.parameters(), lr=LR, weight_decay=0.01)
    x, y = torch.randn(16, size), torch.randn(16, size)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), compute):
            out = layer(x.to(master))
        if compute == "bfloat16":
            assert out.dtype == torch.bfloat16  # the matmul really ran in bf16
        loss = (out.float() - y).pow(2).mean()
        loss.backward()
        assert layer.weight.grad.dtype == master
        opt.step()
    return _changed(before, layer)


def test_bf16_masters_lose_almost_every_update():
    frac = _train_linear(torch.bfloat16, "auto")
    print(f"bf16 masters: {frac:.2%} of weights changed")
    # A bf16 weight moves only if the update (~lr) exceeds ~|w| * 2^-9: here |w| < 2^-5.5, so
    # only weights within ~2.6e-4 of zero, about 1 % of them, can move at all.
    assert frac < 0.05


def test_fp32_masters_with_bf16_compute_learn():
    frac = _train_linear(torch.float32, "bfloat16")
    print(f"fp32 masters + bf16 compute: {frac:.2%} of weights changed")
    assert frac >= 0.99


def _groups(vocab: int, n: int = 4) -> list[TrajectoryGroup]:
    # Long random completions, so every embedding row is some row's input and gets a gradient.
    rng = np.random.default_rng(3)
    return [
        TrajectoryGroup(group_id=f"g{k}", task="t", prompt_id=str(k),
                        prompt_ids=rng.integers(3, vocab, size=6 + k),
                        completion_ids=rng.integers(3, vocab, size=(4, 32)),
                        rewards=np.array([1.0, 0.0, 0.5, 0.0]), policy_version=0, mask_seed=k)
        for k in range(n)
    ]


def _learn(model: torch.nn.Module, tok, spec: TrainSpec) -> float:
    vocab = model.get_input_embeddings().num_embeddings
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    batch = collate(_groups(vocab), pad_id=tok.pad_token_id, eos_ids=(tok.eos_token_id,), n_mc=spec.n_mc)
    for _ in range(STEPS):
        metrics = train_step(model, opt, batch, spec, tok.mask_token_id)
        assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    return _changed(before, model)


def test_learner_step_with_fp32_masters_and_bf16_compute_changes_the_weights():
    model, tok = load_model("builtin:tiny-sudoku", dtype="float32")
    spec = TrainSpec(n_mc=2, mc_chunk=1, micro_batch=8, lr=LR, compute_dtype="bfloat16")
    frac = _learn(model, tok, spec)
    print(f"tiny learner, fp32 masters + bf16 compute, {STEPS} steps at lr {LR}: {frac:.2%} changed")
    assert frac >= 0.99
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_learner_step_computes_in_bf16_when_asked():
    """The learner's forward is the autocast one: its logits come out bf16 on the CPU."""
    model, _ = load_model("builtin:tiny-sudoku", dtype="float32")
    ids = torch.randint(3, 100, (2, 10))
    with autocast(torch.device("cpu"), "bfloat16"):
        assert model(ids).logits.dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "auto"):  # the CPU default stays full precision
        assert model(ids).logits.dtype == torch.float32


def test_lora_over_a_bf16_base_keeps_fp32_adapters_and_learns():
    spec = JobSpec.model_validate({"model": {"dtype": "bfloat16", "lora": {"r": 4}},
                                   "train": {"compute_dtype": "bfloat16"}})
    model, tok = load_model("builtin:tiny-sudoku", dtype=spec.model.dtype, lora=spec.model.lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert low_precision_masters(list(model.parameters())) == []
    train = spec.train.model_copy(update={"n_mc": 2, "micro_batch": 8})
    # LoRA's B starts at zero, so A's first gradients are zero: count weights changed at all.
    assert _learn(model, tok, train) > 0.5


def test_full_finetune_with_bf16_masters_is_refused_with_the_remedy():
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate({"model": {"dtype": "bfloat16"}})
    text = str(err.value)
    assert "model.dtype" in text and "model.lora" in text
    assert "model.dtype = 'float32'" in text and "train.compute_dtype = 'bfloat16'" in text
    with pytest.raises(ValidationError, match="float16"):
        JobSpec.model_validate({"model": {"dtype": "float16"}})
    JobSpec.model_validate({"model": {"dtype": "bfloat16", "lora": LoraSpec().model_dump()}})


@pytest.mark.parametrize("patch", [
    {"model": {"dtype": "float64"}, "train": {"compute_dtype": "float32"}},  # autocast cannot widen or match
    {"model": {"dtype": "float64"}, "train": {"compute_dtype": "bfloat16"}},  # autocast skips float64
])
def test_compute_dtypes_that_autocast_cannot_give_are_refused(patch):
    with pytest.raises(ValidationError, match="train.compute_dtype"):
        JobSpec.model_validate(patch)


def test_train_step_refuses_low_precision_trainable_weights():
    """A model that reaches the learner with bf16 trainable weights (not via a spec) is stopped."""
    model, tok = load_model("builtin:tiny-sudoku", dtype="bfloat16")
    batch = collate(_groups(104, 1), pad_id=tok.pad_token_id, eos_ids=(tok.eos_token_id,), n_mc=2)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    with pytest.raises(ValueError, match="bfloat16.*model.dtype = 'float32'"):
        train_step(model, opt, batch, TrainSpec(n_mc=2), tok.mask_token_id)


def test_autocast_dtype_policy():
    assert autocast_dtype("auto", "cuda") == torch.bfloat16
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("bfloat16", "cpu") == torch.bfloat16
    assert autocast_dtype("float16", "cuda") == torch.float16
    assert autocast_dtype("float32", "cuda") is None
