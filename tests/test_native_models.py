"""Native LLaDA and Dream against restatements of their published forwards (tests/reference_models).

Same random weights in both, fp32: logits agree to 1e-5; left-padded batches equal rows alone;
attention is bidirectional; single-file and sharded checkpoints in the published layout load
strictly (and through plain transformers); the KV cache reproduces the full forward. Each
published detail that matters (Dream's one-position shift, LLaDA's linear-bias flags and key
padding bias, the half-split RoPE) is broken on purpose once to show the comparison catches it.

Run: .venv/bin/pytest tests/test_native_models.py -q
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

import dlrl.models.dream as dream_module
import dlrl.models.llada as llada_module
from dlrl.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM, diffusion_logits, families, load_model
from dlrl.models.forward import cached_diffusion_logits, padding_positions, padding_to_4d
from dlrl.models.kv_cache import KVCache
from dlrl.models.published import check_checkpoint, published_names
from tests.chat_tokenizers import llada_tokenizer
from tests.published_layout import write_published_layout
from tests.reference_models.dream_published import PublishedDreamModel, published_shift
from tests.reference_models.llada_published import PublishedLLaDAModelLM

CONFIGS = Path(__file__).parent / "data" / "model-configs"
TOL = 1e-5


def tiny_llada_config(**overrides) -> LLaDAConfig:
    fields = dict(d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=48, vocab_size=100,
                  embedding_size=104, mask_token_id=99, pad_token_id=0, eos_token_id=1)
    return LLaDAConfig(**(fields | overrides))


def tiny_dream_config(**overrides) -> DreamConfig:
    fields = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  intermediate_size=48, vocab_size=104, mask_token_id=99, pad_token_id=0,
                  bos_token_id=0, eos_token_id=1)
    return DreamConfig(**(fields | overrides))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights big enough that every term moves the logits well above the 1e-5 tolerance
    (the default 0.02 init gives logits of ~1e-3, too small to tell a broken model apart)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def native_and_reference(family: str, seed: int = 0, **overrides):
    if family == "llada":
        cfg = tiny_llada_config(**overrides)
        native, ref = LLaDAModelLM(cfg), PublishedLLaDAModelLM(cfg)
    else:
        cfg = tiny_dream_config(**overrides)
        native, ref = DreamModel(cfg), PublishedDreamModel(cfg)
    randomize(native, seed)
    ref.load_state_dict(native.state_dict(), strict=True)  # same published names, same weights
    return native, ref.eval()


def reference_logits(family: str, ref, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Aligned logits the published code gives (each family fed the way its generation code does)."""
    if family == "llada":
        return ref(ids, attention_mask=mask)
    if mask is None:
        return published_shift(ref(ids))
    return published_shift(ref(ids, attention_mask=padding_to_4d(mask), position_ids=padding_positions(mask)))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 99, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


LLADA_VARIANTS = {
    "published": {},
    "qkv_bias": {"include_qkv_bias": True},
    "all_bias": {"include_bias": True, "bias_for_layer_norm": None},
    "gqa": {"n_kv_heads": 2},
    "tied": {"weight_tying": True},
    "scaled": {"scale_logits": True},
}


@pytest.mark.parametrize("variant", LLADA_VARIANTS)
def test_llada_matches_published_forward(variant):
    native, ref = native_and_reference("llada", **LLADA_VARIANTS[variant])
    ids, mask = batch()
    with torch.no_grad():
        assert max_diff(native(ids).logits, ref(ids)) <= TOL
        assert max_diff(diffusion_logits(native, ids, mask)[mask.bool()],
                        reference_logits("llada", ref, ids, mask)[mask.bool()]) <= TOL


def dream_pair(**overrides):
    """(native, reference) Dream; a tied native model has no lm_head, the reference's is the embedding."""
    if not overrides.get("tie_word_embeddings"):
        return native_and_reference("Dream", **overrides)
    cfg = tiny_dream_config(**overrides)
    native, ref = randomize(DreamModel(cfg)), PublishedDreamModel(cfg)
    ref.load_state_dict(native.state_dict() | {"lm_head.weight": native.model.embed_tokens.weight}, strict=True)
    return native, ref.eval()


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 4}, {"tie_word_embeddings": True}],
                         ids=["published", "mha", "tied"])
def test_dream_matches_published_forward(overrides):
    native, ref = dream_pair(**overrides)
    ids, mask = batch()
    real = mask.bool()
    with torch.no_grad():
        assert max_diff(diffusion_logits(native, ids), reference_logits("Dream", ref, ids, None)) <= TOL
        assert max_diff(diffusion_logits(native, ids, mask)[real],
                        reference_logits("Dream", ref, ids, mask)[real]) <= TOL


@pytest.mark.parametrize("family", ["llada", "Dream"])
def test_left_padded_rows_equal_rows_alone(family):
    native, _ = native_and_reference(family)
    ids, mask = batch()
    with torch.no_grad():
        padded = diffusion_logits(native, ids, mask)
        for row in range(ids.shape[0]):
            alone = ids[row, mask[row].bool()][None]
            # Dream's first real token takes the logits of the position before it (a pad when
            # padded, itself when alone); it is a prompt token that is never predicted.
            n = alone.shape[1] - (1 if family == "Dream" else 0)
            assert max_diff(padded[row, -n:], diffusion_logits(native, alone)[0, -n:]) <= TOL


@pytest.mark.parametrize("family", ["llada", "Dream"])
def test_later_token_changes_earlier_logits(family):
    native, _ = native_and_reference(family)
    ids, _ = batch()
    edited = ids.clone()
    edited[:, -1] = 99
    with torch.no_grad():
        assert max_diff(native(ids).logits[:, 0], native(edited).logits[:, 0]) > 1e-3


@pytest.mark.parametrize("family", ["llada", "Dream"])
def test_kv_cache_block_step_equals_full_forward(family):
    native, _ = native_and_reference(family)
    ids, mask = batch()
    with torch.no_grad():
        full = diffusion_logits(native, ids, mask)
        cache = KVCache()
        first = cached_diffusion_logits(native, ids, mask, kv_cache=cache, start=0, end=ids.shape[1])
        step = cached_diffusion_logits(native, ids, mask, kv_cache=cache, start=5, end=8)
    real = mask.bool()
    assert max_diff(first[real], full[real]) <= TOL
    assert max_diff(step, full[:, 5:8]) <= TOL


def test_logits_to_keep_slices_the_head():
    native, _ = native_and_reference("llada")
    ids, _ = batch()
    with torch.no_grad():
        assert max_diff(native(ids, logits_to_keep=3).logits, native(ids).logits[:, -3:]) <= 1e-6


# --- each published detail, broken on purpose ---------------------------------------------------


def test_dream_without_its_shift_is_caught(monkeypatch):
    native, ref = native_and_reference("Dream")
    ids, _ = batch()
    monkeypatch.setitem(families._BY_MODEL_TYPE, "Dream", replace(families.dream.FAMILY, logit_shift=0))
    with torch.no_grad():
        assert max_diff(diffusion_logits(native, ids), reference_logits("Dream", ref, ids, None)) > 1e-2


def test_llada_padding_bias_convention_is_caught(monkeypatch):
    """The published code masks padded keys; a model that ignored the mask would differ."""
    native, ref = native_and_reference("llada")
    ids, mask = batch()
    monkeypatch.setattr(llada_module, "sdpa_mask", lambda m, dtype: None)
    with torch.no_grad():
        broken = diffusion_logits(native, ids, mask)
    assert max_diff(broken[mask.bool()], reference_logits("llada", ref, ids, mask)[mask.bool()]) > 1e-2


def test_llada_linear_bias_flags_are_caught():
    """include_qkv_bias adds q/k/v biases only; include_bias adds them everywhere (published rule)."""
    qkv = published_names(tiny_llada_config(include_qkv_bias=True))
    assert "model.transformer.blocks.0.q_proj.bias" in qkv
    assert "model.transformer.blocks.0.attn_out.bias" not in qkv
    assert "model.transformer.blocks.0.ff_out.bias" in published_names(tiny_llada_config(include_bias=True))
    # Dropping the q/k/v biases (a model that read include_qkv_bias as off) moves the logits.
    native, ref = native_and_reference("llada", include_qkv_bias=True)
    ids, _ = batch()
    with torch.no_grad():
        for block in native.model.transformer.blocks:
            for proj in (block.q_proj, block.k_proj, block.v_proj):
                proj.bias.zero_()
        assert max_diff(native(ids).logits, ref(ids)) > 1e-2


def interleaved_rope(x, cos, sin):
    """The other RoPE layout (pairs 2j, 2j+1), as the built-in model uses: wrong for LLaDA/Dream."""
    d = x.shape[-1]
    c, s = cos[..., : d // 2], sin[..., : d // 2]
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).to(x.dtype)


@pytest.mark.parametrize("family", ["llada", "Dream"])
def test_rope_variant_is_caught(family, monkeypatch):
    native, ref = native_and_reference(family)
    ids, _ = batch()
    module = llada_module if family == "llada" else dream_module
    with torch.no_grad():
        expected = reference_logits(family, ref, ids, None)
        monkeypatch.setattr(module, "apply_rope", interleaved_rope)
        assert max_diff(diffusion_logits(native, ids), expected) > 1e-2
        monkeypatch.undo()
        assert max_diff(diffusion_logits(native, ids), expected) <= TOL
        native.config.rope_theta = 10000.0  # the Llama-2 theta instead of the published one
        assert max_diff(diffusion_logits(native, ids), expected) > 1e-3


# --- published configs, layouts, checkpoints ----------------------------------------------------


def test_published_configs_give_published_shapes():
    llada_cfg = LLaDAConfig.from_dict(json.loads((CONFIGS / "llada-8b-instruct-config.json").read_text()))
    dream_cfg = DreamConfig.from_dict(json.loads((CONFIGS / "dream-v0-instruct-7b-config.json").read_text()))
    assert (llada_cfg.rope_theta, llada_cfg.rms_norm_eps, llada_cfg.weight_tying) == (500000.0, 1e-5, False)
    assert (dream_cfg.rope_theta, dream_cfg.rms_norm_eps, dream_cfg.tie_word_embeddings) == (1e6, 1e-6, False)
    with torch.device("meta"):
        llada, dream = LLaDAModelLM(llada_cfg), DreamModel(dream_cfg)
    shapes = {n: tuple(p.shape) for n, p in llada.state_dict().items()}
    assert set(shapes) == set(published_names(llada_cfg)) and len(shapes) == 2 + 32 * 9 + 1
    assert shapes["model.transformer.wte.weight"] == (126464, 4096)
    assert shapes["model.transformer.blocks.31.ff_proj.weight"] == (12288, 4096)
    assert shapes["model.transformer.ff_out.weight"] == (126464, 4096)
    # bf16 bytes = the total_size of the published model.safetensors.index.json (LLaDA-8B-Instruct,
    # as in yinj66/support_basis@66e6761): every published tensor has the shape we build.
    assert 2 * sum(p.numel() for p in llada.parameters()) == 16_031_162_368
    shapes = {n: tuple(p.shape) for n, p in dream.state_dict().items()}
    assert set(shapes) == set(published_names(dream_cfg))
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (512, 3584)  # 4 kv heads x 128
    assert shapes["model.layers.0.self_attn.q_proj.bias"] == (3584,)
    assert shapes["lm_head.weight"] == (152064, 3584)
    assert 7.5e9 < sum(p.numel() for p in dream.parameters()) < 7.7e9  # "7B" (7.6B, as Qwen2.5-7B)


def write_published_checkpoint(root: Path, family: str, *, shards: bool) -> tuple[Path, torch.nn.Module]:
    """A random-init LLaDA or Dream checkpoint in the hub layout (`tests.published_layout`)."""
    native, _ = native_and_reference(family)
    published = "llada-8b-instruct-config.json" if family == "llada" else "dream-v0-instruct-7b-config.json"
    modeling = "modeling_llada.py" if family == "llada" else "modeling_dream.py"
    ckpt = write_published_layout(root / f"{family}-{'sharded' if shards else 'single'}",
                                  json.loads((CONFIGS / published).read_text()), native, modeling, llada_tokenizer(),
                                  shards=shards)
    return ckpt, native


@pytest.mark.parametrize("shards", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", ["llada", "Dream"])
def test_published_layout_loads_natively(tmp_path, family, shards):
    ckpt, native = write_published_checkpoint(tmp_path, family, shards=shards)
    model, tokenizer = load_model(ckpt)  # trust_remote_code off: the modeling file would raise
    assert type(model) is type(native) and tokenizer.padding_side == "left"
    ids, mask = batch()
    with torch.no_grad():
        assert max_diff(diffusion_logits(model.eval(), ids, mask), diffusion_logits(native, ids, mask)) == 0


def test_remote_tokenizer_class_is_not_run_for_a_native_family(tmp_path):
    """Dream's tokenizer_config names its own DreamTokenizer (tokenization_dream.py); the native
    path loads the fast tokenizer from tokenizer.json instead of running that file."""
    ckpt, _ = write_published_checkpoint(tmp_path, "Dream", shards=False)
    cfg_path = ckpt / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.update(tokenizer_class="DreamTokenizer",
                   auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]})
    cfg_path.write_text(json.dumps(tok_cfg))
    (ckpt / "tokenization_dream.py").write_text("raise RuntimeError('remote code ran')\n")
    _, tokenizer = load_model(ckpt)
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == tokenizer.eos_token_id
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == llada_tokenizer()("ab", add_special_tokens=False)["input_ids"]


def test_renamed_tensor_is_a_clear_error(tmp_path):
    ckpt, native = write_published_checkpoint(tmp_path, "llada", shards=False)
    state = dict(native.state_dict())
    state["model.transformer.blocks.0.att_proj.weight"] = state.pop("model.transformer.blocks.0.q_proj.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 tensors.*q_proj.*unexpected 1.*att_proj"):
        check_checkpoint(ckpt, native.config)
    with pytest.raises(ValueError, match="published llada layout"):
        load_model(ckpt)


@pytest.mark.parametrize("family", ["llada", "Dream"])
def test_saved_checkpoint_reloads_with_plain_transformers(tmp_path, family):
    from dlrl.models import save_checkpoint

    native, _ = native_and_reference(family)
    out = save_checkpoint(native, llada_tokenizer(), tmp_path / "ckpt")
    check_checkpoint(out, native.config)  # written in the published layout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    reloaded = AutoModel.from_pretrained(out)  # registered on `import dlrl.models`, no remote code
    assert type(reloaded) is type(native)
    ids, _ = batch()
    with torch.no_grad():
        assert max_diff(reloaded(ids).logits, native(ids).logits) == 0



def test_family_is_read_from_model_type_or_architectures():
    from dlrl.models.loading import native_family

    assert native_family({"model_type": "llada"}) is families.llada.FAMILY
    assert native_family({"architectures": ["DreamModel"]}) is families.dream.FAMILY  # no model_type
    assert native_family({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}) is None
