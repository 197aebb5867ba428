"""Native LLaDA2.x (dlrl.models.llada2) against a restatement of its published forward
(tests/reference_models/llada2_published.py, yjyddq/DARE@7016e0e:models/LLaDA2.0-mini/modeling_llada2_moe.py).

Same random weights in both, fp32: logits agree to 1e-4 under the block-causal mask of
dlrl.models.block_mask (which is the published `generate`'s block-lower-triangular mask on the
absolute grid), with and without left padding, in eval (`moe_infer`) and train (per-expert masked
assignment) mode; the KV cache reproduces the uncached block-causal forward exactly; checkpoints in
the published layout load strictly (single file and sharded), a missing or an extra tensor is
refused; the published 2.0-mini config builds 16.26 B parameters with 1.43 B active per token
("16B-A1.4B"), exactly the published index's byte count, and the family's shape reader agrees.
Each routing detail that matters is broken on purpose once to show the comparison catches it.

Run: .venv/bin/pytest tests/test_llada2.py -q
"""

from __future__ import annotations

from dataclasses import replace

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dlrl.models.llada2 as llada2_module
from dlrl import footprint as fp
from dlrl.models import LLaDA2MoeConfig, LLaDA2MoeModelLM, build_tiny_llada2, diffusion_logits, load_model
from dlrl.models.block_mask import block_causal_mask
from dlrl.models.families import family_of
from dlrl.models.kv_cache import KVCache
from dlrl.models.padding import padding_positions
from dlrl.models.published import check_checkpoint, published_names
from dlrl.models.special_ids import special_ids
from dlrl.models.tokenizer import build_char_tokenizer
from tests.published_layout import write_published_layout
from tests.reference_models.llada2_published import PublishedLLaDA2MoeModelLM, published_block_mask

CONFIGS = Path(__file__).parent / "data" / "model-configs"
TOL = 1e-4
BLOCK = 4  # tiny blocks, so a 11-token row spans several and padding shifts the grid


def tiny_config(**overrides) -> LLaDA2MoeConfig:
    """Every published feature at toy size: one dense layer then two MoE layers, 8 experts in 2
    groups (1 eligible), 2 per token, 1 shared, q/k norm, RoPE on half of each 8-wide head, GQA."""
    fields = dict(vocab_size=104, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
                  num_experts_per_tok=2, num_shared_experts=1, n_group=2, topk_group=1,
                  moe_intermediate_size=16, first_k_dense_replace=1, rotary_dim=None,
                  pad_token_id=0, eos_token_id=1, mask_token_id=99)
    return LLaDA2MoeConfig(**(fields | overrides))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights big enough that every term moves the logits well above the tolerance; the router
    bias too, so routing differs from routing by the unbiased scores."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name
                    else 0.3 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
    return model.eval()


def native_and_reference(seed: int = 0, **overrides):
    cfg = tiny_config(**overrides)
    native = randomize(LLaDA2MoeModelLM(cfg), seed)
    ref = PublishedLLaDA2MoeModelLM(cfg)
    state = native.state_dict()
    if cfg.tie_word_embeddings:
        state = state | {"lm_head.weight": native.model.word_embeddings.weight}
    ref.load_state_dict(state, strict=True)  # same published names, same weights
    return native, ref.eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 99, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


VARIANTS = {
    "published": {},
    "biases": {"use_qkv_bias": True, "use_bias": True},
    "no_qk_norm": {"use_qk_norm": False},
    "wide_heads": {"head_dim": 16},  # heads x head_dim = 64 != hidden 32
    "full_rotary": {"partial_rotary_factor": 1.0},
    "top1": {"num_experts_per_tok": 1},  # unnormalised weights (published: only when top_k > 1)
    "no_shared": {"num_shared_experts": None},
    "four_groups": {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
    "tied": {"tie_word_embeddings": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_published_forward_under_the_published_block_mask(variant):
    native, ref = native_and_reference(**VARIANTS[variant])
    ids, _ = batch()
    b, t = ids.shape
    ours = block_causal_mask(None, t, BLOCK)  # (1, 1, T, T)
    with torch.no_grad():
        expected = ref(ids, published_block_mask(t, BLOCK).expand(b, 1, t, t))  # the additive mask of `generate`
        assert max_diff(native(ids, attention_mask=ours).logits, expected) <= TOL
        assert max_diff(ref(ids, ours.expand(b, 1, t, t)), expected) <= 1e-6  # the same mask, as booleans


@pytest.mark.parametrize("variant", ["published", "wide_heads", "no_shared"])
def test_matches_published_forward_with_left_padding(variant):
    """Left-padded rows under the global-grid block-causal mask: positions and blocks count from
    each row's first real token, as the published code sees the row alone."""
    native, ref = native_and_reference(**VARIANTS[variant])
    ids, mask = batch()
    t, real = ids.shape[1], mask.bool()
    bc, pos = block_causal_mask(mask, t, BLOCK), padding_positions(mask)
    with torch.no_grad():
        padded = native(ids, attention_mask=bc, position_ids=pos).logits
        assert max_diff(padded[real], ref(ids, bc, pos)[real]) <= TOL
        for row in range(ids.shape[0]):
            alone = ids[row, real[row]][None]
            n = alone.shape[1]
            published_alone = ref(alone, published_block_mask(n, BLOCK))
            assert max_diff(padded[row, -n:], published_alone[0]) <= TOL


def test_diffusion_logits_scores_a_sequence_block_causally_with_block_32():
    """The generic forward (dlrl.models.forward) gives a LLaDA2 model the family's block-causal
    mask, block 32 on each row's own grid: a left-padded 70-token batch equals the published
    forward of each row alone under the mask `generate` builds."""
    native, ref = native_and_reference()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 99, (2, 70), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        scored = diffusion_logits(native, ids, mask)
        for row in range(2):
            alone = ids[row, mask[row].bool()][None]
            n = alone.shape[1]
            assert max_diff(scored[row, -n:], ref(alone, published_block_mask(n, 32))[0]) <= TOL


def test_cached_block_step_equals_the_block_causal_forward():
    """The sampler's cached path (dlrl.models.forward.cached_diffusion_logits) on a LLaDA2 model:
    fill the cache with two committed blocks of 32, then step the last block alone, asking only for
    its logits (logits_to_keep): equal to scoring the whole sequence at once. Row 0 is padded by a
    whole block, so column 64 starts a block in both rows."""
    from dlrl.models.forward import cached_diffusion_logits

    native, _ = native_and_reference()
    ids = torch.randint(2, 99, (2, 70), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :32] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        full = diffusion_logits(native, ids, mask)
        cache = KVCache()
        first = cached_diffusion_logits(native, ids[:, :64], mask[:, :64], kv_cache=cache, start=0, end=64)
        step = cached_diffusion_logits(native, ids, mask, kv_cache=cache, start=64, end=70, keep=(66, 70))
    real = mask[:, :64].bool()
    assert max_diff(first[real], full[:, :64][real]) <= 1e-5
    assert max_diff(step, full[:, 66:70]) <= 1e-5


def test_train_mode_matches_the_published_training_branch_and_reaches_every_part():
    """In train mode the published block routes by masked assignment, not `moe_infer`: the same
    logits. One backward reaches the router (through the weights), the experts a token was sent
    to, the shared expert and the attention; the routing bias gets no gradient (it is a buffer)."""
    native, ref = native_and_reference()
    native.train()
    ref.train()
    ids, _ = batch()
    mask = block_causal_mask(None, ids.shape[1], BLOCK).expand(ids.shape[0], -1, -1, -1)
    out = native(ids, attention_mask=mask).logits
    assert max_diff(out.detach(), ref(ids, mask).detach()) <= TOL
    out.logsumexp(-1).sum().backward()
    moe = native.model.layers[1].mlp
    assert moe.gate.weight.grad.abs().sum() > 0 and moe.shared_experts.down_proj.weight.grad.abs().sum() > 0
    used = sum(int(e.down_proj.weight.grad is not None and e.down_proj.weight.grad.abs().sum() > 0)
               for e in moe.experts)
    assert used >= 2 and not moe.gate.expert_bias.requires_grad
    assert native.model.layers[0].attention.query_key_value.weight.grad.abs().sum() > 0


def test_block_causal_mask_is_what_makes_it_block_causal():
    """A token in a later block does not change an earlier block's logits; one in the same block
    does. (Up to rounding, not bit for bit: a changed token may be routed to other experts, which
    changes the size of each expert's matmul.)"""
    native, _ = native_and_reference()
    ids, _ = batch()
    t = ids.shape[1]
    mask = block_causal_mask(None, t, BLOCK)
    later, same = ids.clone(), ids.clone()
    later[:, 8] = 98  # block 2
    same[:, 5] = 98  # block 1
    with torch.no_grad():
        base = native(ids, attention_mask=mask).logits
        assert max_diff(native(later, attention_mask=mask).logits[:, :8], base[:, :8]) <= 1e-5
        assert max_diff(native(same, attention_mask=mask).logits[:, 4:8], base[:, 4:8]) > 1e-3
        assert max_diff(native(later).logits[:, :8], base[:, :8]) > 1e-3  # no mask: full attention


def test_kv_cache_block_steps_equal_the_uncached_forward():
    """Decoding on the global grid: the committed prefix's K/V are cached once; each denoising step
    forwards only the current block (its queries see the cached prefix and the block itself), and a
    later step with new tokens in that block overwrites its K/V in place. With block-causal
    attention the prefix's K/V never depend on later tokens, so every cached step equals the full
    forward of the sequence up to the end of the block: exact, not an approximation (equal up to
    the rounding of differently sized expert matmuls). Row 0 is left-padded by one block, so column
    8 starts a block in every row (the engine keeps each row's own grid)."""
    native, _ = native_and_reference()
    ids, mask = batch()
    mask[:] = 1
    mask[0, :BLOCK] = 0
    ids = ids.masked_fill(mask == 0, 0)
    t = ids.shape[1]
    bc, pos = block_causal_mask(mask, t, BLOCK), padding_positions(mask)
    step_ids = ids.clone()
    step_ids[:, 8:] = 99  # the last block, still masked
    with torch.no_grad():
        cache = KVCache()
        s = 8
        prefix = native(ids[:, :s], attention_mask=bc[:, :, :s, :s], position_ids=pos[:, :s], kv_cache=cache)
        for x in (step_ids, ids):  # a first denoising step on the masked block, then the committed block
            step = native(x[:, s:], attention_mask=bc[:, :, s:, :], position_ids=pos[:, s:],
                          kv_cache=cache, cache_start=s).logits
            full = native(x, attention_mask=bc, position_ids=pos).logits
            assert max_diff(step, full[:, s:]) <= 1e-5
        assert max_diff(prefix.logits, full[:, :s]) <= 1e-5 and len(cache) == t


def test_logits_to_keep_slices_the_head():
    native, _ = native_and_reference()
    ids, _ = batch()
    with torch.no_grad():
        assert max_diff(native(ids, logits_to_keep=3).logits, native(ids).logits[:, -3:]) <= 1e-5
        assert max_diff(native(ids, logits_to_keep=slice(2, 5)).logits, native(ids).logits[:, 2:5]) <= 1e-5


# --- each published routing detail, broken on purpose --------------------------------------------


def test_routing_details_are_caught(monkeypatch):
    native, ref = native_and_reference()
    ids, _ = batch()
    mask = block_causal_mask(None, ids.shape[1], BLOCK).expand(ids.shape[0], -1, -1, -1)
    with torch.no_grad():
        expected = ref(ids, mask)
        assert max_diff(native(ids, attention_mask=mask).logits, expected) <= TOL
        # Routing by the unbiased scores (the bias ignored) picks other experts.
        for layer in native.model.layers[1:]:
            layer.mlp.gate.expert_bias.zero_()
        assert max_diff(native(ids, attention_mask=mask).logits, expected) > 1e-2
    native, _ = native_and_reference()
    with torch.no_grad():
        # No group limit (every group eligible) routes some tokens elsewhere.
        monkeypatch.setattr(llada2_module, "group_limited_topk",
                            lambda scores, n_group, topk_group, top_k: scores.topk(top_k, dim=-1).indices)
        assert max_diff(native(ids, attention_mask=mask).logits, expected) > 1e-2
        monkeypatch.undo()
        # RoPE on the whole head instead of its first half.
        monkeypatch.setattr(native.config, "partial_rotary_factor", 1.0)
        assert max_diff(native(ids, attention_mask=mask).logits, expected) > 1e-2


def test_group_limited_topk_by_hand():
    """4 experts in 2 groups, 1 group eligible: group scores are the sums of each group's top 2."""
    scores = torch.tensor([[0.9, 0.1, 0.6, 0.5],    # group 0: 1.0, group 1: 1.1 -> experts 2, 3
                           [0.9, 0.3, 0.6, 0.5]])   # group 0: 1.2, group 1: 1.1 -> experts 0, 1
    idx = llada2_module.group_limited_topk(scores, n_group=2, topk_group=1, top_k=2)
    assert idx.tolist() == [[2, 3], [0, 1]]


# --- published config, layout, checkpoints --------------------------------------------------------


def published_config() -> dict:
    return json.loads((CONFIGS / "llada2.0-mini-config.json").read_text())


def test_published_config_gives_the_published_size_and_layout():
    """LLaDA2.0-mini on the meta device: every tensor name the published model.safetensors.index.json
    lists (yjyddq/DARE@7016e0e:models/LLaDA2.0-mini/, md5 af58ec1268e65420b06187e436d6e391: 14,813
    tensors, total_size 32,511,286,784 bytes of bf16) and exactly that many bytes; 16.26 B
    parameters, 1.43 B of them active per token (8 of 256 experts): the published "16B-A1.4B"."""
    cfg = LLaDA2MoeConfig.from_dict(published_config())
    assert (cfg.use_qk_norm, cfg.rope_dim, cfg.head_dim, cfg.rope_theta) == (True, 64, 128, 600000)
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(cfg)
    state = model.state_dict()
    assert set(state) == set(published_names(cfg)) and len(state) == 14813
    assert tuple(state["model.layers.0.attention.query_key_value.weight"].shape) == (3072, 2048)  # (16 + 2x4) x 128
    assert tuple(state["model.layers.0.mlp.gate_proj.weight"].shape) == (5120, 2048)  # the dense first layer
    assert tuple(state["model.layers.19.mlp.experts.255.down_proj.weight"].shape) == (2048, 512)
    assert tuple(state["model.layers.1.mlp.shared_experts.up_proj.weight"].shape) == (512, 2048)
    assert tuple(state["model.layers.1.mlp.gate.expert_bias"].shape) == (256,)
    assert 2 * sum(t.numel() for t in state.values()) == 32_511_286_784
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.model.layers[1].mlp.experts[0].parameters())
    active = total - 19 * (256 - 8) * expert  # 19 MoE layers, each token skips 248 experts
    assert total == 16_255_638_528 and round(total / 1e9) == 16
    assert active == 1_432_968_192 and round(active / 1e9, 1) == 1.4
    shape = family_of(published_config()).shape(published_config())
    assert (shape.params(), shape.active_params()) == (total, active)
    # the plan's shape is the family's, scored on the BD3-LM layout at the family's block (32: the
    # published config has no block_size)
    assert fp.shape_from_config(fp.model_config("inclusionAI/LLaDA2.0-mini")) == replace(shape, bd3_block=32)


def test_family_record_holds_the_published_conventions():
    family = family_of(published_config())
    assert family.name == "llada2" and family.native and family.model_class is LLaDA2MoeModelLM
    assert (family.attention, family.block_size, family.logit_shift, family.padding_mask) == (
        "block_causal", 32, 0, "4d")
    cfg = LLaDA2MoeConfig.from_dict(published_config())
    assert family.block_size_for(cfg) == 32  # config.json carries no block size: the family's
    assert family.mask_token == "<|mask|>" and cfg.pad_token_id == 156892
    assert family_of({"architectures": ["LLaDA2MoeModelLM"]}) is family


def test_tiny_builder_reads_the_tokenizers_special_ids():
    model, tokenizer = build_tiny_llada2()
    ids = special_ids(model, tokenizer)
    assert (ids.mask_id, ids.pad_id) == (tokenizer.mask_token_id, tokenizer.pad_token_id)
    assert tokenizer.eos_token_id in ids.eos_ids
    again, _ = build_tiny_llada2()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert model.model.layers[1].mlp.gate.expert_bias.abs().sum() > 0


def write_published_checkpoint(root: Path, *, shards: bool) -> tuple[Path, LLaDA2MoeModelLM]:
    """A random-init checkpoint in the hub layout (`tests.published_layout`); `use_qk_norm`,
    absent from the published config.json, is kept explicit for the tiny sizes."""
    native, _ = native_and_reference()
    ckpt = write_published_layout(root / f"llada2-{'sharded' if shards else 'single'}", published_config(), native,
                                  "modeling_llada2_moe.py", build_char_tokenizer(), shards=shards, use_qk_norm=True)
    return ckpt, native


@pytest.mark.parametrize("shards", [False, True], ids=["single", "sharded"])
def test_published_layout_loads_natively(tmp_path, shards):
    ckpt, native = write_published_checkpoint(tmp_path, shards=shards)
    model, tokenizer = load_model(ckpt)  # trust_remote_code off: the modeling file would raise
    assert type(model) is LLaDA2MoeModelLM and tokenizer.padding_side == "left"
    ids, mask = batch()
    bc, pos = block_causal_mask(mask, ids.shape[1], BLOCK), padding_positions(mask)
    loaded, original = model.state_dict(), native.state_dict()
    assert set(loaded) == set(original) and all(torch.equal(loaded[k], original[k]) for k in original)
    with torch.no_grad():  # equal weights; strides of loaded tensors may round matmuls differently
        assert max_diff(model.eval()(ids, attention_mask=bc, position_ids=pos).logits,
                        native(ids, attention_mask=bc, position_ids=pos).logits) <= 1e-5
        assert max_diff(diffusion_logits(model, ids, mask), diffusion_logits(native, ids, mask)) <= 1e-5


def test_missing_or_extra_tensor_is_refused(tmp_path):
    ckpt, native = write_published_checkpoint(tmp_path, shards=False)
    state = {k: v.contiguous() for k, v in native.state_dict().items()}
    missing = dict(state)
    del missing["model.layers.2.mlp.experts.7.up_proj.weight"]
    save_file(missing, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 tensors.*experts\.7\.up_proj"):
        check_checkpoint(ckpt, native.config)
    with pytest.raises(ValueError, match="published llada2_moe layout"):
        load_model(ckpt)
    extra = state | {"model.layers.2.mlp.experts.8.up_proj.weight": state["model.layers.2.mlp.experts.7.up_proj.weight"].clone()}
    save_file(extra, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected 1.*experts\.8\.up_proj"):
        load_model(ckpt)
    no_bias = {k: v for k, v in state.items() if not k.endswith("expert_bias")}
    save_file(no_bias, ckpt / "model.safetensors")  # the routing bias is part of the layout
    with pytest.raises(ValueError, match="missing 2 tensors"):
        load_model(ckpt)


# --- dlrl plan: weights by total parameters, activations by active ones ---------------------------


def test_moe_shape_counts_total_and_active_parameters_and_lora_of_a_model():
    """On a tiny model: total = every parameter, active = without the experts a token skips, and
    with every layer MoE (no fused-gate approximation left) the LoRA count is peft's exactly."""
    from dlrl.config import LoraSpec
    from dlrl.models.lora import apply_lora

    cfg = tiny_config(first_k_dense_replace=0)
    model = LLaDA2MoeModelLM(cfg)
    shape = family_of(cfg).shape(cfg.to_dict())
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.model.layers[0].mlp.experts[0].parameters())
    assert shape.params() == total and shape.moe_layers == 3 and shape.dense_count == 0
    assert shape.active_params() == total - 3 * (8 - 2) * expert
    wrapped = apply_lora(model, LoraSpec(r=2))
    assert shape.lora_params(2) == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def test_moe_block_activation_formula_by_hand():
    s = fp.ModelShape(vocab=10, hidden=8, layers=3, heads=2, kv_heads=1, ffn=16, experts=4, experts_per_token=2,
                      shared_experts=1, expert_ffn=4, dense_layers=1)
    # 16h + b (6h + 3kv + 4 (k + shared) fe) + k h (2b + 4) + 8E, h 8, kv 4, k 2, fe 4, E 4:
    assert fp.moe_block_activation_bytes(s, 2) == 128 + 2 * (48 + 12 + 48) + 16 * 8 + 32
    dense, moe = fp.block_activation_bytes(s, 2), fp.moe_block_activation_bytes(s, 2)
    assert fp.activation_bytes(s, rows=3, seq_len=5, compute_bytes=2, checkpointing=False) == 15 * (dense + 2 * moe)
    assert fp.activation_bytes(s, rows=3, seq_len=5, compute_bytes=2, checkpointing=True) == 15 * (3 * 32 + max(dense, moe))


def test_plan_sizes_llada2_weights_by_total_and_activations_by_active():
    """LLaDA2.0-mini: every expert is stored, trained and gathered (16.26 B), but a token runs 8 of
    256: four times the experts nearly quadruple the weights but change the activations by the router's 8 bytes
    per expert only."""

    shape = fp.shape_from_config(fp.model_config("inclusionAI/LLaDA2.0-mini"))
    wide = replace(shape, experts=4 * shape.experts)
    kw = dict(gpus=1, master_bytes=4, compute_bytes=2, rows=2, seq_len=768, resp_len=512)
    mem, wide_mem = fp.learner_memory(shape, **kw), fp.learner_memory(wide, **kw)
    assert mem.weights == 4 * shape.params() and mem.optimizer == 8 * shape.params()
    assert 3.8 < wide_mem.weights / mem.weights < 4.0  # the experts are 93% of the weights
    # a block-causal family: the learner forwards [x_t ; x_0] cropped to the noisy half from the
    # first response block (at most 512 + 32 - 1 columns) and the clean half (768): 1311 a row
    assert shape.bd3 and fp.bd3_tokens(shape, 768, 512) == 1311
    assert wide_mem.activations - mem.activations == 2 * 1311 * 19 * 8 * 3 * shape.experts
    assert fp.rollout_memory(shape, batch=1, seq_len=768, weight_bytes=2).weights == 2 * shape.params()
    four = fp.learner_memory(shape, **(kw | {"gpus": 4}))
    assert four.gathered == 2 * (2 * shape.moe_block_params() + shape.root_params())  # a MoE block is the largest


def test_dlrl_plan_prints_total_and_active_parameters(tmp_path, capsys):
    from services.cli import main

    spec = tmp_path / "llada2.toml"
    spec.write_text('name = "llada2-plan"\n[model]\npath = "inclusionAI/LLaDA2.0-mini"\ndtype = "bfloat16"\n'
                    '[model.lora]\nr = 16\n')
    main(["plan", str(spec), "--gpus", "8", "--gpu-memory", "80"])
    out = capsys.readouterr().out
    assert "16.26 B params (1.43 B active per token: 8 of 256 experts + 1 shared)" in out
