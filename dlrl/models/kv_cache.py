"""Keys and values of a whole sequence, kept between block steps of a cached sampler.

The contract between the cached rollout engine (`rollout/`) and every native model family
(`dlrl/models/`): a model's `forward(input_ids, attention_mask, position_ids, kv_cache=cache,
cache_start=s)` treats `input_ids` (B, q) as the sequence positions [s, s + q). Each attention
layer `i` projects its keys/values for those positions, applies RoPE to the keys, calls
`k, v = kv_cache.update(i, k, v, s)` and attends its q queries to the returned (B, H_kv, T, D)
keys/values, under a 4-D boolean mask (B, 1, q, T) (True = may attend) or None.

- The first call on an empty cache (s = 0, q = T) is a full forward that fills the cache:
  Fast-dLLM's "refresh".
- A later call writes the fresh keys/values of [s, s + q) in place and attends to the rest as
  cached. A prefix cache forwards [s, T) (the current block and everything after it), so only the
  prefix is stale-free-cached; a dual cache forwards [s, e) only, so the suffix is cached too
  (approximate: the suffix's keys are those of the last refresh).
- A call with s equal to the cached length appends.

Under a bidirectional model a cache is exact only for positions whose inputs did not change since
they were written and whose own attention saw no changed token; the engine decides when to
refresh. Inference only: updates write in place (run under `torch.no_grad`).
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer keys and values (B, H_kv, T, D) of one batch of sequences."""

    def __init__(self) -> None:
        self.keys: list[Tensor | None] = []
        self.values: list[Tensor | None] = []

    def __len__(self) -> int:
        """Cached sequence length (0 when empty)."""
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H_kv, q, D) of positions [start, start + q); return the layer's full k, v."""
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        cached_k, cached_v = self.keys[layer], self.values[layer]
        q = k.shape[2]
        if cached_k is None or (start == 0 and q >= cached_k.shape[2]):
            if start != 0:
                raise ValueError(f"layer {layer}: an empty cache must be filled from position 0, not {start}")
            self.keys[layer], self.values[layer] = k, v
            return k, v
        length = cached_k.shape[2]
        if start == length:
            cached_k, cached_v = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
            self.keys[layer], self.values[layer] = cached_k, cached_v
            return cached_k, cached_v
        if start < 0 or start + q > length:
            raise ValueError(f"layer {layer}: positions [{start}, {start + q}) outside the cached {length}")
        cached_k[:, :, start:start + q] = k
        cached_v[:, :, start:start + q] = v
        return cached_k, cached_v

    def reserve(self, length: int) -> None:
        """Extend every layer to `length` positions (zeros past the cached ones), so that later
        writes anywhere in [0, length) are in place and `prefix` can hand out views of it."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None and k.shape[2] < length:
                pad = (*k.shape[:2], length - k.shape[2], k.shape[3])
                self.keys[i] = torch.cat([k, k.new_zeros(pad)], dim=2)
                self.values[i] = torch.cat([v, v.new_zeros((*pad[:3], v.shape[3]))], dim=2)

    def prefix(self, length: int) -> KVCache:
        """A cache of positions [0, length) that shares this one's storage (views, no copy): a
        forward through it writes its positions in place here and attends to those `length`
        positions only. A block-diffusion step uses it to see exactly the committed blocks and
        its own block (rollout/engines/block.py)."""
        view = KVCache()
        view.keys = [None if k is None else k[:, :, :length] for k in self.keys]
        view.values = [None if v is None else v[:, :, :length] for v in self.values]
        return view

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only batch rows `rows` (1-D index or bool mask): finished rows leave the compute."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[rows], v[rows]

    def clear(self) -> None:
        self.keys.clear()
        self.values.clear()
