"""Load a checkpoint into a sharded model without any process holding the whole of it.

A learner group of N ranks that each loaded the whole checkpoint before sharding would peak at N
copies of it in one node's RAM (32 GB of float32 per rank for LLaDA-8B). Instead every rank:

1. builds the model from its config with its *parameters* on the meta device (`parameters_on_meta`:
   shapes and dtypes, no storage) while its buffers are built for real by the model's own
   `__init__`, so a buffer the checkpoint does not hold (a rotary `inv_freq`, say) has exactly the
   value a normal load gives it. This is accelerate's `init_empty_weights(include_buffers=False)`
   (`init_on_device`: register_parameter moves each new parameter to meta), restated here;
2. wraps LoRA adapters around it (`standing_in` lets peft create and initialise the adapters
   for real, from the same random draws as on a loaded model);
3. shards it (FSDP2's `fully_shard` keeps meta parameters on meta);
4. `DeferredWeights.load`: gives the meta shards storage (`to_empty`; the tensors that were already
   real are put back) and reads from the safetensors only the rows of each tensor this rank owns
   (`safe_open(...).get_slice`, a row range of a row-major tensor is one contiguous byte range of
   the file), strictly by name as `load_model` does.

So each rank reads and holds 1/N of the checkpoint and the node about one copy of the weights in
all, whatever N; no collective is needed. (PyTorch's other route, `set_model_state_dict(...,
broadcast_from_rank0=True)`, has rank 0 read everything and scatter it: one whole copy on rank 0
plus every rank's shards, and the checkpoint's bytes on the wire.)

Where the whole load cost N copies: transformers maps the safetensors and, when the checkpoint's
dtype is the model's, its parameters are views of the mapped file (page cache, shared by a node's
ranks), so on the CPU only the rows FSDP2 copies into each shard are ever read. But a load that
converts -- the published LLaDA-8B is bfloat16 and the learner's masters float32 -- or moves the
model to a GPU makes each rank a private copy of the whole model first. bench/load_rss.py measures
both cases (bench/results/load_rss.json).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dlrl.models.published import checkpoint_names


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and their buffers for real.

    Every parameter goes through `nn.Module.register_parameter` (attribute assignment included);
    each is moved to meta as it is registered, so the CPU tensor it was made from (`torch.empty`
    in nn.Linear and nn.Embedding: untouched pages, no RSS) is dropped at once, and the module's
    initialisation then runs on meta (no work, no random draws)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@contextmanager
def standing_in(model: nn.Module) -> Iterator[None]:
    """Inside, the model's meta parameters look like real CPU tensors (zeros broadcast from one
    element: no memory); on exit the meta ones are back, with any `requires_grad` change made inside.

    For peft: it moves the adapters it creates to the device of the layer they wrap, and on meta
    their freshly initialised values would be lost; beside a stand-in they stay real."""
    swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    stand_ins: dict[int, nn.Parameter] = {}  # one stand-in per parameter (a tied one stays tied)
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in stand_ins:
                    zero = torch.zeros((), dtype=param.dtype).expand(param.shape)
                    stand_ins[id(param)] = nn.Parameter(zero, requires_grad=param.requires_grad)
                swapped.append((module, name, param, stand_ins[id(param)]))
    for module, name, _, stand_in in swapped:
        module._parameters[name] = stand_in
    try:
        yield
    finally:
        for module, name, meta, stand_in in swapped:
            meta.requires_grad_(stand_in.requires_grad)
            module._parameters[name] = meta


def own_region(tensor: torch.Tensor) -> tuple[slice, ...]:
    """The part of the whole tensor this rank holds: its shard's index ranges for a DTensor (FSDP2:
    a row range, torch.chunk's split, possibly empty), everything for a plain tensor."""
    if not isinstance(tensor, DTensor):
        return tuple(slice(0, n) for n in tensor.shape)
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


@dataclass
class DeferredWeights:
    """Where each tensor of an empty model (`parameters_on_meta`) is in its checkpoint, kept from
    before the model was wrapped or sharded; `load` fills them in once it is sharded.

    `slots`: checkpoint tensor name -> (owning module, attribute). The modules are the model's own
    objects, which LoRA (the wrapped layer stays the adapter's `base_layer`) and sharding (it
    replaces the attribute on the same module) keep, so the names need no rewriting."""

    directory: Path
    slots: dict[str, tuple[nn.Module, str]]
    files: dict[str, str]

    @classmethod
    def of(cls, model: nn.Module, directory: str | Path, optional: frozenset[str] = frozenset()) -> DeferredWeights:
        """The slots of every parameter and persistent buffer of `model` (its state_dict names),
        checked against the checkpoint's names: each must be there, and nothing else may be but
        the family's `optional` tensors. ValueError otherwise, as the whole load gives."""
        slots: dict[str, tuple[nn.Module, str]] = {}
        owner: dict[int, str] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            stored = [(n, t) for n, t in module._parameters.items() if t is not None]
            stored += [(n, t) for n, t in module._buffers.items()
                       if t is not None and n not in module._non_persistent_buffers_set]
            for name, tensor in stored:
                key = f"{prefix}.{name}" if prefix else name
                if owner.setdefault(id(tensor), key) != key:
                    # Every native family ties its head by computing from the embedding, never by
                    # sharing one Parameter; a shared one would need its aliases resolved here.
                    raise ValueError(f"{type(model).__name__} shares one tensor between {owner[id(tensor)]} "
                                     f"and {key}: the sharded load does not handle tied parameters")
                slots[key] = (module, name)
        files = checkpoint_names(directory)
        missing = sorted(set(slots) - set(files))
        unexpected = sorted(set(files) - set(slots) - optional)
        if missing or unexpected:
            raise ValueError(f"{directory} does not match the native {type(model).__name__}: missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}")
        return cls(Path(directory), slots, files)

    def load(self, model: nn.Module, device: torch.device) -> None:
        """Give the model's meta tensors storage on `device` and read this rank's part of each
        checkpoint tensor into them (cast to the model's dtype, as a whole load does). The tensors
        that were real already (buffers, LoRA adapters) keep their values."""
        with torch.no_grad():
            real = [(module, name, tensor.detach().clone())
                    for module in model.modules()
                    for name, tensor in [*module._parameters.items(), *module._buffers.items()]
                    if tensor is not None and not tensor.is_meta]
            model.to_empty(device=device)
            for module, name, value in real:
                getattr(module, name).copy_(value)
            for path, names in self._by_file().items():
                with safe_open(path, framework="pt") as f:
                    for name in names:
                        self._read(f, name)

    def _by_file(self) -> dict[str, list[str]]:
        by_file: dict[str, list[str]] = {}
        for name in self.slots:
            by_file.setdefault(self.files[name], []).append(name)
        return by_file

    def _read(self, f, name: str) -> None:
        module, attr = self.slots[name]
        target = getattr(module, attr)
        local = target.to_local() if isinstance(target, DTensor) else target
        if local.numel() == 0:
            return
        stored = f.get_slice(name)
        if tuple(stored.get_shape()) != tuple(target.shape):
            raise ValueError(f"{self.directory}: tensor {name} has shape {tuple(stored.get_shape())}, the model's "
                             f"{tuple(target.shape)}")
        region = own_region(target)
        if all(r.start == 0 and r.stop == n for r, n in zip(region, target.shape)):
            part = f.get_tensor(name)
        else:
            part = stored[region]
        local.copy_(part)
