"""Loading a learner group's model without N copies (dlrl.models.shard_load): each rank builds the
model empty, shards it, and reads only its own shards, which are exactly the rows of the whole
checkpoint that FSDP2 gives it.

The reference is `load_model` (the whole load the single learner keeps), run in the same rank
process from the same seed: every local shard must equal the corresponding slice of its tensor,
bit for bit, in every family (the built-in model, LLaDA, Dream, SDAR and LLaDA2's routed experts,
each untied and tied where the family ties its head), with LoRA adapters, and from a checkpoint
split over several files. Buffers (LLaDA2's router bias) are whole on every rank. The sharded
model's logits then equal the whole model's.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from dlrl.config import LoraSpec
from dlrl.models import build_char_tokenizer, diffusion_logits, load_empty_model, load_model, save_checkpoint
from dlrl.models.shard_load import DeferredWeights, parameters_on_meta
from learner import sharding
from learner.sharding import Rank
from tests.test_families import CASES, build

SEED = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint(root: Path, name: str, i: int, *, split: bool = False) -> Path:
    """Case (name, i) of tests/test_families.py saved with random buffers too (a loaded LLaDA2's
    router bias is not zero); `split`: as a two-file indexed checkpoint."""
    _, model = build(name, i)
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.normal_(generator=torch.Generator().manual_seed(1))
    path = root / f"{name}-{i}{'-split' if split else ''}"
    if split:
        path.mkdir()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        names = sorted(state)
        weight_map = {}
        for part, chunk in enumerate((names[::2], names[1::2])):
            fname = f"model-{part + 1:05d}-of-00002.safetensors"
            save_file({k: state[k] for k in chunk}, path / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(chunk, fname))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        model.config.save_pretrained(path)
    else:
        model.save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return path


def _compare(path: str, lora: bool) -> dict:
    """On one rank: the sharded, shard-loaded model against the whole load of the same checkpoint."""
    spec = LoraSpec(r=2) if lora else None
    torch.manual_seed(SEED)
    whole, _ = load_model(path, lora=spec)
    torch.manual_seed(SEED)
    model, _, deferred = load_empty_model(path, lora=spec)
    assert deferred is not None and all(p.is_meta for n, p in model.named_parameters() if "lora_" not in n)
    sharding.shard(model, "float32", torch.device("cpu"))
    deferred.load(model, torch.device("cpu"))
    reference = whole.state_dict()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out = {"unequal": [], "sharded": 0}
    for name, value in model.state_dict().items():
        full = reference[name]
        if isinstance(value, DTensor):  # FSDP2's split: torch.chunk along dim 0, trailing ranks may be empty
            out["sharded"] += 1
            chunks = torch.chunk(full, world, dim=0)
            expected = chunks[rank] if rank < len(chunks) else full[:0]
            value = value.to_local()
        else:
            expected = full
        if value.dtype != full.dtype or not torch.equal(value, expected):
            out["unequal"].append(name)
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        out["logits_equal"] = torch.equal(diffusion_logits(model.eval(), ids, mask),
                                          diffusion_logits(whole.eval(), ids, mask))
    return out


def _rank_main(rank: int, port: int, cases: list[tuple[str, bool]], out: str) -> None:
    torch.set_num_threads(1)
    sharding.join(Rank(rank, 2), "127.0.0.1", port, torch.device("cpu"))
    try:
        results = {f"{path}|{lora}": _compare(path, lora) for path, lora in cases}
        Path(out, f"rank-{rank}.json").write_text(json.dumps(results))
        torch.distributed.barrier()
    finally:
        sharding.leave()


def test_each_rank_holds_exactly_its_rows_of_the_checkpoint(tmp_path):
    cases = [(str(_checkpoint(tmp_path, name, i)), False) for name, i in CASES]
    cases.append((str(_checkpoint(tmp_path, "llada2", 0, split=True)), False))
    cases += [(cases[0][0], True), (str(_checkpoint(tmp_path, "llada2", 1, split=True)), True)]  # LoRA
    mp.start_processes(_rank_main, args=(_free_port(), cases, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for key in ranks[0]:
        zero, one = ranks[0][key], ranks[1][key]
        assert zero["unequal"] == one["unequal"] == [], key
        assert zero["logits_equal"] and one["logits_equal"], key
        assert zero["sharded"] > 0


def test_empty_model_holds_no_parameter_storage_and_real_buffers(tmp_path):
    """Before sharding nothing of the checkpoint is read: the parameters are meta, a buffer is its
    `__init__` value (LLaDA2's router bias: zeros) until the load fills it from the checkpoint."""
    path = _checkpoint(tmp_path, "llada2", 0)
    model, tokenizer, deferred = load_empty_model(path, lora=LoraSpec(r=2))
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert base and all(p.is_meta and not p.requires_grad for p in base)
    assert adapters and all(not p.is_meta and p.requires_grad for p in adapters)
    buffers = [b for n, b in model.named_buffers() if n.endswith("expert_bias")]
    assert buffers and all(not b.is_meta and not b.any() for b in buffers)
    assert tokenizer.padding_side == "left" and set(deferred.slots) == set(load_model(path)[0].state_dict())


class Rotary(nn.Module):
    """A layer with a buffer no checkpoint holds (none of the native families has one: they compute
    RoPE per forward), as remote-code and Llama-style models keep `inv_freq`."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8), persistent=False)


def test_a_buffer_the_checkpoint_lacks_keeps_its_init_value(tmp_path):
    whole = Rotary()
    save_file(whole.state_dict(), tmp_path / "model.safetensors")
    with parameters_on_meta():
        empty = Rotary()
    assert empty.proj.weight.is_meta and not empty.inv_freq.is_meta
    deferred = DeferredWeights.of(empty, tmp_path)
    assert set(deferred.slots) == {"proj.weight", "proj.bias"}
    deferred.load(empty, torch.device("cpu"))
    assert torch.equal(empty.inv_freq, whole.inv_freq)
    assert torch.equal(empty.proj.weight, whole.proj.weight) and torch.equal(empty.proj.bias, whole.proj.bias)


def test_an_adapter_checkpoint_loads_over_its_empty_base(tmp_path):
    """model.path may be an adapter-only checkpoint (a LoRA run's): its trained adapters load over
    the empty base as `load_model` loads them, and the base's tensors are read later as any."""
    base = _checkpoint(tmp_path, "sdar", 0)
    model, tokenizer = load_model(base, lora=LoraSpec(r=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))  # "trained": not the init
    save_checkpoint(model, tokenizer, tmp_path / "adapter")
    whole, _ = load_model(tmp_path / "adapter")
    empty, _, deferred = load_empty_model(tmp_path / "adapter")
    assert any(p.is_meta for p in empty.parameters())
    deferred.load(empty, torch.device("cpu"))
    expected = whole.state_dict()
    assert empty.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in empty.state_dict().items())
    trainable = {n for n, p in empty.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in whole.named_parameters() if p.requires_grad} and trainable
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in expected.items() if "lora_" in k)


def test_a_renamed_or_missing_tensor_is_the_whole_loads_error(tmp_path):
    path = _checkpoint(tmp_path, "llada", 0)
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    state["model.transformer.blocks.0.att_proj.weight"] = state.pop("model.transformer.blocks.0.q_proj.weight")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    for load in (load_model, load_empty_model):
        with pytest.raises(ValueError, match=r"published llada layout.*missing 1 tensors.*q_proj.*unexpected 1.*att_proj"):
            load(path)
    del state["model.transformer.blocks.0.att_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    for load in (load_model, load_empty_model):
        with pytest.raises(ValueError, match=r"published llada layout.*missing 1 tensors.*q_proj"):
            load(path)


def test_a_tensor_of_another_shape_is_an_error(tmp_path):
    path = _checkpoint(tmp_path, "tiny", 0)
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    state["norm.weight"] = torch.ones(7)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    model, _, deferred = load_empty_model(path)
    with pytest.raises(ValueError, match=r"norm.weight has shape \(7,\), the model's \(32,\)"):
        deferred.load(model, torch.device("cpu"))

