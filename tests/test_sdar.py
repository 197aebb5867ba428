"""Native SDAR against a restatement of its published forward (tests/reference_models/sdar_published.py).

Same random weights in both, fp32: logits agree to 1e-4 (in practice ~1e-6) under the block-causal
mask the published sampler builds, with and without left padding, through the published
`store_kv` cache and through ours, and in the BD3-LM [x_t ; x_0] training layout under the
published `block_diff_mask`. Published-layout checkpoints (single and sharded safetensors) load
strictly; the published configs give the published tensor counts and sizes. Qwen3's details (the
per-head q/k norms, head_dim apart from hidden / heads) are broken on purpose to show the
comparison catches them.

Run: .venv/bin/pytest tests/test_sdar.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dlrl.footprint import model_config, shape_from_config
from dlrl.models import SDARConfig, SDARForCausalLM, build_tiny_sdar, diffusion_logits, family_of, load_model
from dlrl.models.block_mask import bd3_mask, block_causal_mask
from dlrl.models.forward import cached_diffusion_logits
from dlrl.models.kv_cache import KVCache
from dlrl.models.padding import padding_positions
from dlrl.models.published import check_checkpoint, published_names
from tests.chat_tokenizers import llada_tokenizer
from tests.published_layout import write_published_layout
from tests.reference_models.sdar_published import (
    PublishedCache,
    PublishedSDARForCausalLM,
    block_attn_mask,
    generate_block_mask,
)

CONFIGS = Path(__file__).parent / "data" / "model-configs"
TOL = 1e-4
BLOCK = 4


def tiny_config(**overrides) -> SDARConfig:
    """head_dim 12 != 32 / 4 (as Qwen3-4B's 128 != 2560 / 32), GQA 4 / 2."""
    fields = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_hidden_layers=2,
                  intermediate_size=48, vocab_size=104, mask_token_id=99, pad_token_id=0, bos_token_id=0,
                  eos_token_id=1)
    return SDARConfig(**(fields | overrides))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights big enough that every term moves the logits well above the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def pair(seed: int = 0, **overrides) -> tuple[SDARForCausalLM, PublishedSDARForCausalLM]:
    """(native, published restatement) with the same weights; a tied native model has no lm_head,
    the published one's is the embedding (transformers ties it)."""
    cfg = tiny_config(**overrides)
    native, ref = randomize(SDARForCausalLM(cfg), seed), PublishedSDARForCausalLM(cfg)
    state = native.state_dict()
    if cfg.tie_word_embeddings:
        state = state | {"lm_head.weight": native.model.embed_tokens.weight}
    ref.load_state_dict(state, strict=True)  # same published names
    return native, ref.eval()


def published_logits(ref: PublishedSDARForCausalLM, ids: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """One unpadded row (1, T) as generate.py feeds it: its block mask over the whole grid, sliced."""
    t = ids.shape[1]
    mask = generate_block_mask(-(-t // block), block)[:, :t, :t]
    return ref(ids, attention_mask=mask, position_ids=torch.arange(t)[None])


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 99, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


VARIANTS = {"published": {}, "mha": {"num_key_value_heads": 4}, "bias": {"attention_bias": True},
            "tied": {"tie_word_embeddings": True}, "head_dim_8": {"head_dim": 8}, "block_3": {"block_size": 3}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_published_forward(variant):
    """Unpadded rows: `diffusion_logits` (block-causal by default, the config's block size else the
    family's 4) equals the published forward under generate.py's mask."""
    native, ref = pair(**VARIANTS[variant])
    block = VARIANTS[variant].get("block_size", BLOCK)
    ids, _ = batch()
    with torch.no_grad():
        ours = diffusion_logits(native, ids)
        for row in range(ids.shape[0]):
            assert max_diff(ours[row], published_logits(ref, ids[row:row + 1], block)[0]) <= TOL


@pytest.mark.parametrize("variant", ["published", "tied"])
def test_left_padded_rows_match_published_rows_alone(variant):
    """Left padding: every real position of a padded row has the logits the published code gives
    the row alone (blocks on the global grid from the row's first real token)."""
    native, ref = pair(**VARIANTS[variant])
    ids, mask = batch()
    with torch.no_grad():
        padded = diffusion_logits(native, ids, mask)
        for row in range(ids.shape[0]):
            alone = ids[row, mask[row].bool()][None]
            assert max_diff(padded[row, mask[row].bool()], published_logits(ref, alone)[0]) <= TOL
        # the same padded batch through the published forward, given our 4-D mask and positions
        fed = ref(ids, attention_mask=block_causal_mask(mask, ids.shape[1], BLOCK),
                  position_ids=padding_positions(mask))
    assert max_diff(padded[mask.bool()], fed[mask.bool()]) <= TOL


def test_block_causal_mask_is_generate_pys():
    for t in (4, 7, 12):
        expected = generate_block_mask(-(-t // BLOCK), BLOCK)[:, :t, :t].bool()
        assert torch.equal(block_causal_mask(None, t, BLOCK)[:, 0], expected)


def test_attention_is_block_causal_by_default():
    """A later block never moves an earlier block's logits; a token in the same block does."""
    native, _ = pair()
    ids, _ = batch()
    with torch.no_grad():
        base = diffusion_logits(native, ids)
        later = ids.clone()
        later[:, 8] = 98  # block 2
        assert max_diff(diffusion_logits(native, later)[:, :8], base[:, :8]) == 0
        same = ids.clone()
        same[:, 7] = 98  # block 1
        assert max_diff(diffusion_logits(native, same)[:, 4], base[:, 4]) > 1e-3
        # without a mask the model attends fully: block-causality is the caller's mask
        assert max_diff(native(later).logits[:, 0], native(ids).logits[:, 0]) > 1e-3


def test_kv_cache_matches_published_store_kv_and_the_uncached_forward():
    """generate.py's pattern: prefill the full prompt blocks with store_kv, then forward one block
    reading the cache (store_kv off). Ours through a KVCache gives the same logits, which are
    those of the uncached block-causal forward at that block: the cache is exact here."""
    native, ref = pair()
    ids, _ = batch()
    ids = ids[2:3]  # (1, 11): blocks [0, 4), [4, 8), [8, 11)
    t = ids.shape[1]
    full_mask = generate_block_mask(-(-t // BLOCK), BLOCK)[:, :t, :t]
    with torch.no_grad():
        uncached = diffusion_logits(native, ids)
        cache = PublishedCache()
        ref(ids[:, :8], attention_mask=full_mask[:, :8, :8], position_ids=torch.arange(8)[None],
            past_key_values=cache, store_kv=True)
        published = ref(ids[:, 8:], attention_mask=full_mask[:, 8:, :t], position_ids=torch.arange(8, t)[None],
                        past_key_values=cache, store_kv=False)
        ours_cache = KVCache()
        mask4 = block_causal_mask(None, t, BLOCK)
        native(ids[:, :8], attention_mask=mask4[:, :, :8, :8], kv_cache=ours_cache, cache_start=0)
        ours = native(ids[:, 8:], attention_mask=mask4[:, :, 8:, :], kv_cache=ours_cache, cache_start=8).logits
        # a second denoising step over the same block rewrites its keys in place: same logits
        again = native(ids[:, 8:], attention_mask=mask4[:, :, 8:, :], kv_cache=ours_cache, cache_start=8).logits
    assert max_diff(published, uncached[:, 8:]) <= TOL
    assert max_diff(ours, uncached[:, 8:]) <= TOL
    assert max_diff(again, ours) == 0


def test_kv_cache_with_left_padding_equals_the_uncached_forward():
    """Rows padded by 0 and 4 share block boundaries (columns 4, 8): the cache holds whole blocks."""
    native, _ = pair()
    ids, _ = batch()
    ids, mask = ids[:2].clone(), torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    ids[1, :4] = 0
    t = ids.shape[1]
    mask4 = block_causal_mask(mask, t, BLOCK)
    positions = padding_positions(mask)
    with torch.no_grad():
        uncached = diffusion_logits(native, ids, mask)
        cache = KVCache()
        native(ids[:, :8], attention_mask=mask4[:, :, :8, :8], position_ids=positions[:, :8],
               kv_cache=cache, cache_start=0)
        step = native(ids[:, 8:], attention_mask=mask4[:, :, 8:, :], position_ids=positions[:, 8:],
                      kv_cache=cache, cache_start=8).logits
    assert max_diff(step, uncached[:, 8:]) <= TOL


def test_cached_diffusion_logits_are_block_causal():
    """The generic cached step (`cached_diffusion_logits`) forwards a block against the cache under
    the rows of the block-causal mask: equal to the uncached forward, padded or not."""
    native, _ = pair()
    ids, _ = batch()
    ids, mask = ids[:2].clone(), torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    for m in (None, mask):
        with torch.no_grad():
            uncached = diffusion_logits(native, ids, m)
            cache = KVCache()
            first = cached_diffusion_logits(native, ids, m, kv_cache=cache, start=0, end=11)
            step = cached_diffusion_logits(native, ids, m, kv_cache=cache, start=8, end=11)
            block = cached_diffusion_logits(native, ids, m, kv_cache=cache, start=4, end=8, keep=(4, 8))
        assert max_diff(first, uncached) <= TOL
        assert max_diff(step, uncached[:, 8:]) <= TOL
        assert max_diff(block, uncached[:, 4:8]) <= TOL


def test_bd3_training_forward_matches_the_published_layout():
    """The training layout [x_t ; x_0] (2L tokens, the same position ids twice): our bd3_mask is the
    published block_diff_mask for one sample, and the native forward under it equals the published
    layers under the published mask (FlexAttention there; the same dense mask through SDPA here)."""
    native, ref = pair()
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randint(2, 99, (2, 10), generator=gen)
    xt = x0.masked_fill(torch.rand(x0.shape, generator=gen) < 0.5, 99)
    full = torch.cat([xt, x0], dim=1)
    positions = torch.arange(10).repeat(2)[None].expand(2, -1)
    published_mask = block_attn_mask([[10], [10]], BLOCK)  # (2, 20, 20)
    ours_mask = bd3_mask(None, 10, BLOCK)
    assert torch.equal(ours_mask[0, 0], published_mask[0])
    with torch.no_grad():
        ours = native(full, attention_mask=ours_mask.expand(2, -1, -1, -1), position_ids=positions).logits
        published = ref(full, attention_mask=published_mask[:, None], position_ids=positions)
    assert max_diff(ours, published) <= TOL
    # the noisy half at block b sees x_0 of earlier blocks only: editing x_0's last block leaves it
    edited = full.clone()
    edited[:, 18] = 98
    with torch.no_grad():
        moved = native(edited, attention_mask=ours_mask.expand(2, -1, -1, -1), position_ids=positions).logits
    assert max_diff(moved[:, :10], ours[:, :10]) == 0 and max_diff(moved[:, 10:], ours[:, 10:]) > 1e-3


def test_logits_to_keep_slices_the_head():
    native, ref = pair()
    ids, _ = batch()
    with torch.no_grad():
        assert max_diff(native(ids, logits_to_keep=3).logits, native(ids).logits[:, -3:]) <= 1e-6
        assert max_diff(native(ids, logits_to_keep=3).logits, ref(ids, attention_mask=torch.ones(1, 11, 11),
                                                                  logits_to_keep=3)) <= TOL


# --- each Qwen3 detail, broken on purpose -------------------------------------------------------


def test_qk_norm_and_head_dim_are_caught():
    native, ref = pair()
    ids, _ = batch()
    with torch.no_grad():
        expected = published_logits(ref, ids[:1])
        assert max_diff(diffusion_logits(native, ids[:1]), expected) <= TOL
        for layer in native.model.layers:  # a Qwen2-style model (no q/k norm) would differ
            layer.self_attn.q_norm.weight.fill_(1.0)
        assert max_diff(diffusion_logits(native, ids[:1]), expected) > 1e-2
    # head_dim is read from the config, not hidden / heads (8 here): the published shapes need 12
    assert native.model.layers[0].self_attn.q_proj.weight.shape == (4 * 12, 32)


def test_rms_norm_scales_in_float32_as_flash_attn_does():
    """bf16: (x_hat · w) in float32 then one cast (flash-attn's rms_norm_fn), not w · cast(x_hat)."""
    from dlrl.models.sdar import SDARRMSNorm

    norm = SDARRMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(64, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    xf = x.float()
    x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(norm.bfloat16()(x), (x_hat * norm.weight.float()).bfloat16())


# --- published configs, layouts, checkpoints ----------------------------------------------------


# SDAR-4B/8B-Chat: model.safetensors.index.json next to each training config
# (JetAstra/SDAR@c2041a8:training/model/SDAR-{4B,8B}-Chat/, md5 b78bceb7... / cd48fd85...):
# 399 tensors each, total_size in bf16 bytes.
PUBLISHED_INDEX = {"sdar-4b-chat-training-config.json": (399, 8_822_848_512),
                   "sdar-8b-chat-training-config.json": (399, 16_381_470_720)}
PUBLISHED_CONFIGS = ["sdar-1.7b-chat-config.json", "sdar-1.7b-chat-training-config.json", *PUBLISHED_INDEX]


@pytest.mark.parametrize("name", PUBLISHED_CONFIGS)
def test_published_configs_give_published_shapes(name):
    raw = json.loads((CONFIGS / name).read_text())
    cfg = SDARConfig.from_dict(raw)
    family = family_of(raw)
    assert family.name == "sdar" and family.block_size_for(cfg) == 4
    assert cfg.mask_token_id == raw.get("mask_token_id")  # 151669 in the training configs, absent otherwise
    with torch.device("meta"):
        model = SDARForCausalLM(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert set(shapes) == set(published_names(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    assert shape_from_config(raw).params() == n_params  # what `dlrl plan` reads
    layers, hidden, head_dim = raw["num_hidden_layers"], raw["hidden_size"], raw["head_dim"]
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (raw["num_attention_heads"] * head_dim, hidden)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (raw["num_key_value_heads"] * head_dim, hidden)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (head_dim,)
    assert len(shapes) == 11 * layers + 3
    if name in PUBLISHED_INDEX:
        tensors, total_bytes = PUBLISHED_INDEX[name]
        assert len(shapes) == tensors and 2 * n_params == total_bytes
    else:
        # SDAR-1.7B-Chat: Qwen3-1.7B's body with an untied head: 2.03 B parameters (1.72 B with the
        # head tied, as Qwen3-1.7B itself is; 151936 x 2048 = 0.31 B for the head).
        assert n_params == 2_031_739_904


def test_plan_knows_the_published_sdar_sizes(tmp_path):
    """`dlrl plan` reads the shipped configs by hub id, or a folder holding only config.json."""
    assert 2 * shape_from_config(model_config("JetLM/SDAR-4B-Chat")).params() == 8_822_848_512
    assert 2 * shape_from_config(model_config("JetLM/SDAR-8B-Chat")).params() == 16_381_470_720
    assert shape_from_config(model_config("JetLM/SDAR-1.7B-Chat")).params() == 2_031_739_904
    (tmp_path / "config.json").write_text((CONFIGS / "sdar-1.7b-chat-config.json").read_text())
    shape = shape_from_config(model_config(str(tmp_path)))
    assert shape.params() == 2_031_739_904 and shape.kv == 8 * 128 and shape.q == 2048


def write_published_checkpoint(root: Path, *, shards: bool, config: str = "sdar-1.7b-chat-training-config.json"):
    """A random-init checkpoint in the hub layout (`tests.published_layout`), with the training
    config's block_size and mask_token_id at the tiny vocab."""
    native, _ = pair()
    published = json.loads((CONFIGS / config).read_text())
    ckpt = write_published_layout(root / f"sdar-{'sharded' if shards else 'single'}", published, native,
                                  "modeling_sdar.py", llada_tokenizer(), shards=shards, block_size=4, mask_token_id=99)
    return ckpt, native


@pytest.mark.parametrize("shards", [False, True], ids=["single", "sharded"])
def test_published_layout_loads_natively(tmp_path, shards):
    ckpt, native = write_published_checkpoint(tmp_path, shards=shards)
    model, tokenizer = load_model(ckpt)  # trust_remote_code off: the modeling file would raise
    assert type(model) is SDARForCausalLM and tokenizer.padding_side == "left"
    assert model.config.block_size == 4 and model.config.mask_token_id == 99
    ids, mask = batch()
    with torch.no_grad():
        assert max_diff(diffusion_logits(model.eval(), ids, mask), diffusion_logits(native, ids, mask)) == 0


@pytest.mark.parametrize("change", ["missing", "extra", "renamed"])
def test_a_checkpoint_off_the_published_layout_is_refused(tmp_path, change):
    ckpt, native = write_published_checkpoint(tmp_path, shards=False)
    state = {k: v.contiguous() for k, v in native.state_dict().items()}
    if change == "missing":
        del state["model.layers.1.self_attn.k_norm.weight"]
    elif change == "extra":
        state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    else:
        state["model.layers.0.self_attn.key_norm.weight"] = state.pop("model.layers.0.self_attn.k_norm.weight")
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="published sdar layout"):
        check_checkpoint(ckpt, native.config)
    with pytest.raises(ValueError, match="published sdar layout"):
        load_model(ckpt)


def test_tiny_builder_is_a_real_sdar_checkpoint(tmp_path):
    """build_tiny_sdar: the char tokenizer's ids in the config, saved and reloaded natively."""
    from dlrl.models import save_checkpoint, special_ids

    model, tokenizer = build_tiny_sdar(hidden=32, layers=2, heads=4, kv_heads=2, block_size=4, seed=0)
    again, _ = build_tiny_sdar(hidden=32, layers=2, heads=4, kv_heads=2, block_size=4, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    ids = special_ids(model, tokenizer)
    assert ids.mask_id == tokenizer.mask_token_id and ids.pad_id == tokenizer.pad_token_id
    assert family_of(model.config).block_size_for(model.config) == 4
    out = save_checkpoint(model, tokenizer, tmp_path / "tiny-sdar")
    check_checkpoint(out, model.config)
    loaded, _ = load_model(out)
    x = torch.tensor([tokenizer("12.4\n3..1", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(diffusion_logits(loaded.eval(), x), diffusion_logits(model.eval(), x))
