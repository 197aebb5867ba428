"""The family registry: every registered family is complete and right, and it is the only place
that knows families.

- every family's published names are exactly its model's tensors, a checkpoint saved in them loads
  back natively with the same logits, and its `dlrl plan` shape counts exactly its parameters
  (each untied and tied where the family can tie);
- its block class, its mask token and its Auto registration are real;
- unknown models get the generic record;
- no `model_type` comparison or family-keyed table exists outside dlrl/models/families/, and a
  family is one module with one registry line.

Run: .venv/bin/pytest tests/test_families.py -q
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, PretrainedConfig

from dlrl.config import LoraSpec
from dlrl.models import (
    BidirectionalConfig,
    DreamConfig,
    LLaDAConfig,
    SDARConfig,
    build_char_tokenizer,
    diffusion_logits,
    load_model,
    special_ids,
)
from dlrl.models import families as registry
from dlrl.models.blocks import transformer_blocks
from dlrl.models.families import FAMILIES, REMOTE, Family, family_of, model_family
from dlrl.models.lora import apply_lora
from dlrl.models.published import check_checkpoint, published_names
from dlrl.models.special_ids import token_id
from tests.chat_tokenizers import dream_tokenizer, llada_tokenizer, sdar_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FAMILIES_DIR = ROOT / "dlrl" / "models" / "families"
CONFIGS = Path(__file__).parent / "data" / "model-configs"


def tiny_configs() -> dict[str, list[PretrainedConfig]]:
    """Tiny configs of every registered family: untied, and tied where the family ties its head."""
    llada = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 48,
             "vocab_size": 100, "embedding_size": 104, "mask_token_id": 99, "pad_token_id": 0, "eos_token_id": 1}
    dream = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
             "intermediate_size": 48, "vocab_size": 104, "mask_token_id": 99, "pad_token_id": 0, "eos_token_id": 1}
    sdar = dream | {"head_dim": 12}  # Qwen3: head_dim apart from hidden / heads
    return {
        "tiny": [BidirectionalConfig(vocab_size=104, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48)],
        "llada": [LLaDAConfig(**llada), LLaDAConfig(**llada, weight_tying=True, include_qkv_bias=True)],
        "dream": [DreamConfig(**dream), DreamConfig(**dream, tie_word_embeddings=True)],
        "sdar": [SDARConfig(**sdar), SDARConfig(**sdar, tie_word_embeddings=True, attention_bias=True, block_size=8)],
    }


CASES = [(name, i) for name, configs in tiny_configs().items() for i in range(len(configs))]


def build(name: str, i: int) -> tuple[Family, torch.nn.Module]:
    config = tiny_configs()[name][i]
    family = family_of(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return family, family.model_class(config).eval()


def test_every_registered_family_is_tested_here():
    assert {f.name for f in FAMILIES} == set(tiny_configs())


@pytest.mark.parametrize(("name", "i"), CASES)
def test_published_names_round_trip(tmp_path, name, i):
    """The name map is exactly the model's tensors; saved under them, the checkpoint passes the
    strict check and loads back natively (no remote code) with identical logits."""
    family, model = build(name, i)
    assert family.name == name and family.native
    assert set(published_names(model.config)) == set(model.state_dict())
    model.save_pretrained(tmp_path)
    build_char_tokenizer().save_pretrained(tmp_path)
    check_checkpoint(tmp_path, model.config)
    loaded, _ = load_model(tmp_path)
    assert type(loaded) is family.model_class and model_family(loaded) is family
    ids = torch.randint(4, 104, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        assert torch.equal(diffusion_logits(loaded.eval(), ids, mask), diffusion_logits(model, ids, mask))


@pytest.mark.parametrize(("name", "i"), CASES)
def test_plan_shape_counts_the_parameters(name, i):
    """The numbers `dlrl plan` reads (the family's shape of config.json) give the model's exact
    parameter count."""
    family, model = build(name, i)
    assert family.shape(model.config.to_dict()).params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "i"), CASES)
def test_block_class_and_lora_targets_are_the_models(name, i):
    """The record's block class is what a forward runs layer by layer (peft wrapper or not), and
    its default LoRA targets put adapters in every block and nowhere else."""
    family, model = build(name, i)
    blocks = transformer_blocks(model)
    assert len(blocks) == family.shape(model.config.to_dict()).layers
    assert all(type(b) is family.block_class for b in blocks)
    wrapped = apply_lora(model, LoraSpec(r=2))
    assert isinstance(wrapped, PeftModel) and model_family(wrapped) is family
    assert [id(b) for b in transformer_blocks(wrapped)] == [id(b) for b in blocks]
    adapted = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    in_blocks = {n for n in adapted if any(n.startswith(f"{prefix}.") for prefix in _block_prefixes(wrapped, blocks))}
    assert adapted and adapted == in_blocks


def _block_prefixes(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> list[str]:
    ids = {id(b) for b in blocks}
    return [name for name, m in model.named_modules() if id(m) in ids]


def test_mask_tokens_are_the_published_ids():
    """Each record's mask token is the token at its published config's mask id."""
    llada = json.loads((CONFIGS / "llada-8b-instruct-config.json").read_text())
    dream = json.loads((CONFIGS / "dream-v0-instruct-7b-config.json").read_text())
    assert token_id(llada_tokenizer(published_ids=True), family_of(llada).mask_token) == llada["mask_token_id"]
    assert token_id(dream_tokenizer(published_ids=True), family_of(dream).mask_token) == dream["mask_token_id"]
    sdar = json.loads((CONFIGS / "sdar-1.7b-chat-training-config.json").read_text())
    assert token_id(sdar_tokenizer(published_ids=True), family_of(sdar).mask_token) == sdar["mask_token_id"]
    # the original inference config has no mask_token_id: the family's <MASK> gives the same id
    inference = SDARConfig.from_dict(json.loads((CONFIGS / "sdar-1.7b-chat-config.json").read_text()))
    assert special_ids(inference, sdar_tokenizer(published_ids=True)).mask_id == sdar["mask_token_id"]
    tiny = json.loads((ROOT / "dlrl" / "assets" / "tiny-sudoku" / "config.json").read_text())
    assert token_id(build_char_tokenizer(), family_of(tiny).mask_token) == tiny["mask_token_id"]


def test_mask_id_falls_back_to_the_familys_mask_token():
    """A config without mask_token_id and a tokenizer that declares no mask token (LLaDA's does
    not): the family's named token is found; an unknown family still fails loudly."""
    tokenizer = llada_tokenizer()
    assert tokenizer.mask_token_id is None
    config = LLaDAConfig(mask_token_id=None)
    assert special_ids(config, tokenizer).mask_id == tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    with pytest.raises(ValueError, match="no mask token id"):
        special_ids(PretrainedConfig(eos_token_id=1), tokenizer)


def test_native_families_are_registered_with_transformers():
    for family in FAMILIES:
        for model_type in family.model_types:
            assert type(AutoConfig.for_model(model_type)) is family.config_class


def test_lookup_by_model_type_architectures_or_the_generic_record():
    llada = json.loads((CONFIGS / "llada-8b-instruct-config.json").read_text())
    assert family_of(llada).name == "llada"
    assert family_of({"architectures": ["DreamModel"]}).name == "dream"  # a config.json without model_type
    assert family_of(DreamConfig()).name == "dream"
    for unknown in ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, {}, None):
        assert family_of(unknown) is REMOTE
    # Today's fallbacks for a remote-code model: 4-D mask, no shift, every linear, blocks from
    # _no_split_modules, full attention, Hugging Face config names.
    assert (REMOTE.padding_mask, REMOTE.logit_shift, REMOTE.lora_targets, REMOTE.block_class) == ("4d", 0, "all-linear", None)
    assert REMOTE.attention == "full" and not REMOTE.native
    qwen2 = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 16, "attention_bias": True}
    assert REMOTE.shape(qwen2).qkv_bias and not REMOTE.shape(qwen2 | {"attention_bias": False}).qkv_bias


def test_attention_pattern_and_block_size():
    """Block-causal attention is a record field with its block size; `block_size_for` is the one
    lookup (the config's block_size, else the family's published default; None for full
    attention); a record that mixes the two up is refused when it is built."""
    block = {f.name for f in FAMILIES if f.attention == "block_causal"}
    assert block == {"sdar"}
    assert all(f.block_size is None for f in FAMILIES if f.name not in block)
    sdar = registry.sdar.FAMILY
    assert sdar.block_size == 4 and sdar.block_size_for(SDARConfig()) == 4  # the original HF config has none
    assert sdar.block_size_for(SDARConfig(block_size=16)) == 16 and sdar.block_size_for({"block_size": 8}) == 8
    assert sdar.block_size_for(None) == 4
    assert registry.dream.FAMILY.block_size_for(DreamConfig()) is None
    assert registry.llada.FAMILY.block_size_for({"block_size": 4}) is None  # full attention: no blocks
    with pytest.raises(ValueError, match="block size"):
        Family(name="broken", attention="block_causal")
    with pytest.raises(ValueError, match="block size"):
        Family(name="broken", block_size=4)
    assert Family(name="blocks", attention="block_causal", block_size=4).block_size == 4
    with pytest.raises(ValueError, match="native code"):
        Family(name="broken", config_class=LLaDAConfig)


# --- the registry is the only place that knows families -----------------------------------------

SCANNED = ("dlrl", "rollout", "learner", "services", "bench", "scripts")


def _sources() -> list[Path]:
    files = [p for d in SCANNED if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py")]
    return [p for p in files if FAMILIES_DIR not in p.parents]


def test_no_model_type_comparison_outside_the_families():
    """No `==`, `!=`, `in` or `not in` with a model_type on either side (the registry looks it up)."""
    hits = [f"{p.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"
            for p in _sources() for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.Compare) and "model_type" in ast.unparse(node)]
    assert hits == []


def test_no_family_name_is_spelled_outside_the_families():
    """No table keyed by a family's model_type outside the package: each registered model_type
    string occurs only as its config class's own `model_type` attribute."""
    names = {t for f in FAMILIES for t in f.model_types}
    hits = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    own = {f"{family.config_class.__module__.replace('.', '/')}.py" for family in FAMILIES}
    allowed = [h for h in hits if h.split(":")[0] in own]
    assert sorted(set(hits) - set(allowed)) == []
    assert len(allowed) == sum(len(f.model_types) for f in FAMILIES)  # one `model_type = "..."` each


def test_a_family_is_one_module_and_one_registry_line():
    """Every module in the package (bar the record type and the registry) builds exactly one
    registered record, and every registered record comes from its own module."""
    modules = sorted(p.stem for p in FAMILIES_DIR.glob("*.py") if p.stem not in ("__init__", "family"))
    assert modules == sorted(f.name for f in FAMILIES)
    for name in modules:
        assert getattr(registry, name).FAMILY in FAMILIES
    init = (FAMILIES_DIR / "__init__.py").read_text()
    assert all(init.count(f"{name}.FAMILY") == 1 for name in modules)
