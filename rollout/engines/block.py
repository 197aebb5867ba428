"""The block-diffusion rollout engine (`engine = "block"`): SDAR / TraDo and LLaDA2.x decoded as published.

Block-diffusion models (dlrl.models families with `attention = "block_causal"`) were trained
bidirectional inside a block and causal across blocks, so they are decoded one block at a time,
each block denoised in a few steps against an exact cache of the blocks before it. This engine
restates the published samplers on the KV-cache contract of `dlrl.models.kv_cache`:

* SDAR `block_diffusion_generate` (`JetAstra/SDAR@c2041a8:generate.py`, lines 57-202; the
  sampler TraDo, JetEngine, lmdeploy and DARE run, ../shared/reference/block-diffusion.md §3.1);
* LLaDA2.0 `generate` (`yjyddq/DARE@7016e0e:models/LLaDA2.0-mini/modeling_llada2_moe.py`,
  1233-1403) and LLaDA2.1 `generate` without token editing
  (`yjyddq/DARE@5877371:models/LLaDA2.1-mini/modeling_llada2_moe.py`, 1239-1434; §4.1).

What is decoded as published:

* **Global block grid.** Token k of the unpadded prompt + response (k from 0) is in block
  floor(k / block_length), so the last partial prompt block is decoded together with the first
  response tokens (its prompt tokens are never changed), as all three samplers do. The last block
  is decoded whole, as published (SDAR returns it; LLaDA2 cuts it at gen_length): response
  tokens past gen_length are decoded, then dropped.
* **Exact KV cache.** The full prompt blocks are prefilled; a denoising step forwards only the
  current block and attends to the cached blocks before it and bidirectionally inside the block;
  once the block has no masks left, one more forward over the clean block writes its keys and
  values (SDAR generate.py steps 1-7). Under a block-causal mask a committed block's keys and
  values are a function of the committed tokens alone, so the cache is exact: LLaDA2's generate,
  which recomputes the whole prefix at every step with no cache, decodes the same tokens
  (tests/test_block_engine.py). A step attends only to the committed prefix and its own block
  (`KVCache.prefix`: views of one preallocated cache, no copies).
* **Steps and commit rules** (`Decoding.block_remasking`): each block takes at most `steps`
  denoising steps (the published "denoising steps per block"); step s is scheduled n_s tokens,
  block_length shared over the steps as evenly as possible, the first steps taking the remainder
  (`rollout.sampler.num_transfer_tokens` of a full block, SDAR's `get_num_transfer_tokens`).
  - "sequential": the next n_s masked positions, left to right;
  - "low_confidence_static": the n_s masked positions of highest confidence;
  - "low_confidence_dynamic" (`threshold` tau): every masked position with confidence > tau if
    there are at least n_s of them, else the n_s most confident. This is SDAR's dynamic rule and
    LLaDA2.0's threshold rule (its `threshold`, 0.95 by default, with `steps` per block); LLaDA2.1's
    generate without editing is the same rule with steps = block_length (one scheduled token a
    step, as many steps as the threshold needs).
* **Sampling.** Logits are divided by the temperature (when it is not 1), then top-k, then top-p
  filtered (top-p's cumulative probabilities are those of the top-k-filtered logits), softmaxed,
  and each block position draws its token from that distribution (`torch.multinomial`, per row);
  the **confidence** is the drawn token's probability under that tempered, filtered
  distribution, as both published samplers define it. **Temperature 0 is greedy** as in
  LLaDA2.1: the argmax token, confidence = its softmax probability (LLaDA2.0's published
  generate samples at T = 1 when given T = 0 because it divides only by T > 0 and always draws;
  SDAR's divides by zero. Neither is followed).
* **EOS stop** after a block commits: a row whose generated part (through that block) holds an
  end-of-text id stops (SDAR lines 199-200, LLaDA2.0 likewise); tokens after the EOS in that
  block stay, the rest of the response is filled with EOS.

Where dlrl departs, deliberately:

* k = min(n_s, masked positions left). The published SDAR code asks `topk` for n_s positions
  even when fewer masks remain (a mixed prompt block, or a dynamic step that committed more than
  scheduled), and so re-writes prompt or committed positions with fresh samples; LLaDA2.0 takes
  the min, as here. Where masks >= n_s (always at steps = block_length) the two agree.
* The drawn token is never the mask token (its probability is set to 0 for the draw, argmax
  excludes it); confidences are the published ones. A trained model puts ~0 mass there; the
  published code could commit a mask and then fail or leave it in the output.
* Randomness: one seed is drawn from the caller's generator per call, and row i of the batch
  draws from its own generator seeded (seed + i), so a row's tokens do not depend on the other
  rows of the batch (their prompts, lengths or stopping). The published samplers draw from the
  global RNG, one prompt at a time.
* LLaDA2.1's token editing (T2T: re-writing committed tokens above an editing threshold) is not
  done: it makes a trajectory that is not an absorbing-state path (block-diffusion.md §4.1).

Batches (the published samplers take one prompt): rows are left-padded prompts of different
lengths. Each row is moved left by (its padding mod block_length) so that its first real token
starts a block column of the work array: all rows' blocks then align in array coordinates and a
batch decodes one block column at a time. Positions outside a row (its left padding, the columns
after its last block) are padding: never attended, never committed; a padding query attends only
to itself, so no attention row is empty. Every row of the batch is forwarded at each step of a
column while any row still has masks in it (a row done with the column recomputes keys that the
clean write gives it anyway); rows that stopped leave the cache. Position ids count from each
row's first real token, so a row decodes as it would alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from dlrl.decoding import Decoding
from dlrl.models import SpecialIds
from dlrl.models.block_mask import grid_blocks
from dlrl.models.families import model_family
from dlrl.models.kv_cache import KVCache
from rollout.rollout_stats import RolloutStats, eos_positions
from rollout.sampler import Sample, num_transfer_tokens, select_transfer

BLOCK_REMASKING = ("sequential", "low_confidence_static", "low_confidence_dynamic")


# --------------------------------------------------------------------------- sampling

def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Logits (..., V) with all but the k largest of each row set to -inf (ties at the k-th kept)."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Logits (..., V) keeping the smallest most-probable set whose probability reaches p (nucleus):
    a token is dropped when the probability of the tokens strictly more probable already exceeds p."""
    ordered, order = logits.sort(dim=-1, descending=True)
    before = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = torch.zeros_like(before, dtype=torch.bool)
    drop[..., 1:] = before[..., :-1] > p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample_tokens(
    logits: Tensor, *, temperature: float, top_k: int | None, top_p: float | None, mask_id: int,
    generators: list[torch.Generator] | None,
) -> tuple[Tensor, Tensor]:
    """Token (R, l) and confidence (R, l) of every position of logits (R, l, V); see the module docstring.

    T = 0: the argmax token (never mask_id) and its softmax probability. T > 0: a draw from the
    tempered, top-k / top-p filtered distribution with the mask token's probability zeroed (row r
    from generators[r]), and the drawn token's probability under the filtered distribution.
    """
    logits = logits.float()
    mask = torch.tensor([mask_id], device=logits.device)
    if temperature == 0:
        x0 = logits.index_fill(-1, mask, float("-inf")).argmax(dim=-1)
        return x0, logits.softmax(dim=-1).gather(-1, x0[..., None]).squeeze(-1)
    if temperature != 1.0:
        logits = logits / temperature
    filtered = logits
    if top_k is not None:
        filtered = top_k_filter(filtered, top_k)
    if top_p is not None:
        filtered = top_p_filter(filtered, top_p)
    probs = filtered.softmax(dim=-1)  # (R, l, V)
    draw = probs.index_fill(-1, mask, 0.0)
    empty = draw.sum(dim=-1) == 0  # the filters kept the mask token alone: draw from the rest
    if bool(empty.any()):
        draw[empty] = logits.index_fill(-1, mask, float("-inf")).softmax(dim=-1)[empty]
    x0 = torch.stack([
        torch.multinomial(draw[r], 1, generator=None if generators is None else generators[r]).squeeze(-1)
        for r in range(draw.shape[0])
    ])
    return x0, probs.gather(-1, x0[..., None]).squeeze(-1)


def row_generators(generator: torch.Generator | None, rows: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row, seeded (s + i) from one draw s of `generator` (the global RNG if None):
    row i's draws depend on the caller's seed and i only, not on the other rows."""
    gen_device = generator.device if generator is not None else device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(rows)]


def select_commits(
    todo: Tensor, confidence: Tensor, scheduled: int, *, rule: str, threshold: float | None,
) -> Tensor:
    """Which positions (R, l) bool to commit this step: todo (R, l) are the still-masked positions
    of the block, confidence (R, l) the drawn tokens' confidences, `scheduled` the step's n_s.

    k = min(n_s, masked left) per row (see the module docstring for SDAR's k = n_s)."""
    left = todo.sum(dim=1)  # (R,)
    k = left.clamp(max=scheduled)  # (R,)
    if rule == "sequential":
        return todo & (todo.long().cumsum(dim=1) <= k[:, None])
    ranked = select_transfer(confidence.masked_fill(~todo, float("-inf")), k) & todo
    if rule == "low_confidence_static":
        return ranked
    if rule != "low_confidence_dynamic":
        raise ValueError(f"block_remasking must be one of {BLOCK_REMASKING}, got {rule!r}")
    high = todo & (confidence > threshold)
    enough = high.sum(dim=1) >= scheduled  # (R,)
    return torch.where(enough[:, None], high, ranked)


# --------------------------------------------------------------------------- attention

def step_mask(real: Tensor, blocks: Tensor, q0: int, q1: int, width: int) -> Tensor:
    """(R, 1, q1 - q0, width) bool for queries at columns [q0, q1) against keys [0, width).

    The rows [q0, q1) of `dlrl.models.block_mask.block_causal_mask` on the work array (a key is
    seen iff it is real and its block is not after the query's), except that a padding query sees
    only itself: a row whose padding comes before its first block would otherwise have no key at
    all (NaN in SDPA, which the cache would carry into real queries)."""
    kb, qb = blocks[:, None, None, :width], blocks[:, None, q0:q1, None]
    keys = real[:, None, None, :width]
    allowed = keys & (kb <= qb) & real[:, None, q0:q1, None]
    idx = torch.arange(q1 - q0, device=real.device)
    allowed[:, 0, idx, q0 + idx] |= ~real[:, q0:q1]
    return allowed


# --------------------------------------------------------------------------- the loop

@torch.no_grad()
def generate_block(
    model: torch.nn.Module,
    prompt: Tensor,
    *,
    gen_length: int,
    block_length: int,
    steps: int,
    block_remasking: str,
    mask_id: int,
    pad_id: int,
    eos_ids: tuple[int, ...],
    threshold: float | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Sample, RolloutStats]:
    """Decode `gen_length` tokens after each left-padded prompt (B, P); see the module docstring.

    Returns the sample (tokens (B, P + gen_length): the prompt as given, then the response; the
    row's own denoising step at which each response token was committed, EOS fill at the row's
    last step) and the batch's RolloutStats (forwards: every model call, prefill and clean-block
    writes included; row steps: denoising steps summed over rows; committed and mean confidence
    over every token the model committed, the decoded positions past gen_length included).
    The model must take the KV-cache contract (a native family); options as `BlockEngine.check`.
    """
    if not eos_ids:
        raise ValueError("eos_ids is empty: the EOS stop needs the end-of-text ids")
    b, p = prompt.shape
    device = prompt.device
    size = block_length
    attention_mask = torch.ones_like(prompt) if attention_mask is None else attention_mask.to(device)
    length = attention_mask.long().sum(dim=1)  # (B,) real prompt tokens
    shift = (p - length) % size  # (B,) each row moves left by this: its first token starts a block column
    end = (p - shift - length) + -(-(length + gen_length) // size) * size  # (B,) end of the row's last block
    width = int(end.max())

    # The work array: row i's prompt at [s_i, s_i + P_i), its masks from there to end_i.
    col = torch.arange(width, device=device)[None]  # (1, W)
    src = col + shift[:, None]  # (B, W) column of the input each work column comes from
    is_prompt = (src >= p - length[:, None]) & (src < p)
    todo = (src >= p) & (col < end[:, None])  # (B, W) positions still to decode
    real = is_prompt | todo
    x = torch.where(todo, mask_id, pad_id)
    x = torch.where(is_prompt, prompt.gather(1, src.clamp(max=p - 1)), x)  # (B, W)
    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, W) from each row's first real token
    blocks = grid_blocks(real.long(), width, size)  # (B, W)
    step_of = torch.full((b, width), -1, dtype=torch.long, device=device)  # (B, W) commit step
    row_step = torch.zeros(b, dtype=torch.long, device=device)  # (B,) denoising steps taken
    schedule = num_transfer_tokens(torch.ones(1, size, dtype=torch.bool), steps)[0].tolist()
    generators = row_generators(generator, b, device) if temperature > 0 else None
    eos = torch.tensor(eos_ids, device=device)
    stats = RolloutStats(rows=b)
    kv = KVCache()
    live = torch.arange(b, device=device)  # rows still decoding; the cache holds exactly these

    def forward(q0: int, q1: int, logits: bool) -> Tensor:
        """Logits (R, q1 - q0, V) (or none) of the live rows' columns [q0, q1) through the cache."""
        if len(kv) == 0:
            window, keys = kv, q1  # the first call fills the cache from 0
        elif q0 == 0:
            window, keys = kv, width  # a write at 0 would replace a view's storage: write in place
        else:
            window, keys = kv.prefix(q1), q1  # committed blocks + this block, no copy
        out = model(x[live, q0:q1], attention_mask=step_mask(real[live], blocks[live], q0, q1, keys),
                    position_ids=positions[live, q0:q1], kv_cache=window, cache_start=q0,
                    logits_to_keep=slice(None) if logits else slice(0, 0)).logits
        kv.reserve(width)
        stats.forwards += 1
        return out

    start_col = int((p - shift.max()) // size)  # first block column where some row has masks
    if start_col > 0:  # prefill: every column before it is prompt or padding in every row
        forward(0, start_col * size, logits=False)
    for j in range(start_col, width // size):
        q0, q1 = j * size, (j + 1) * size
        for s in range(steps):
            block_todo = todo[live, q0:q1]  # (R, l)
            if not bool(block_todo.any()):
                break
            active = block_todo.any(dim=1)  # (R,) rows with masks here: only they draw (their own stream)
            logits = forward(q0, q1, logits=True)
            x0 = torch.full(block_todo.shape, mask_id, dtype=torch.long, device=device)
            confidence = torch.zeros(block_todo.shape, device=device)
            x0[active], confidence[active] = sample_tokens(
                logits[active], temperature=temperature, top_k=top_k, top_p=top_p, mask_id=mask_id,
                generators=None if generators is None else [generators[i] for i in live[active].tolist()])
            commit = select_commits(block_todo, confidence, schedule[s], rule=block_remasking, threshold=threshold)
            x[live, q0:q1] = torch.where(commit, x0, x[live, q0:q1])
            step_of[live, q0:q1] = torch.where(commit, row_step[live, None], step_of[live, q0:q1])
            todo[live, q0:q1] = block_todo & ~commit
            row_step[live] += active.long()
            stats.row_steps += int(active.sum())
            stats.committed += int(commit.sum())
            stats.confidence_sum += float(confidence[commit].sum())
            stats.confidence_count += int(commit.sum())
        if bool(todo[live, q0:q1].any()):
            raise RuntimeError("a block kept masks after its steps: the schedule must cover the block")
        # EOS stop once the block is committed; rows whose last block this was are done too.
        generated = ~is_prompt[live, :q1] & real[live, :q1]
        stopped = (torch.isin(x[live, :q1], eos) & generated).any(dim=1)  # (R,)
        if bool(stopped.any()):
            rows = live[stopped]
            fill = todo[rows]  # the rest of these responses
            x[rows] = torch.where(fill, eos_ids[0], x[rows])
            step_of[rows] = torch.where(fill, (row_step[rows] - 1)[:, None], step_of[rows])
            todo[rows] = False
        keep = ~stopped & (end[live] > q1)
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            kv.keep_rows(keep)
            live = live[keep]
        forward(q0, q1, logits=False)  # the clean block's keys and values
    kv.clear()

    # Back to the caller's layout: the prompt as given, then gen_length response tokens.
    response = (p - shift)[:, None] + torch.arange(gen_length, device=device)[None]  # (B, L) work columns
    completion = x.gather(1, response)
    stats.eos_position_sum = int(eos_positions(completion, eos_ids).sum())
    return Sample(tokens=torch.cat([prompt, completion], dim=1), unmask_step=step_of.gather(1, response)), stats


# --------------------------------------------------------------------------- the engine

def refuse_block_options(decoding: Decoding) -> None:
    """ValueError if `decoding` sets an option only the block engine takes (for the other engines' check)."""
    named = [name for name in ("top_k", "top_p", "block_remasking") if getattr(decoding, name) is not None]
    if named:
        raise ValueError(f"{' / '.join(named)} need engine = 'block', not {decoding.engine!r}")


def trained_block_size(model: torch.nn.Module) -> int | None:
    """The block size the model was trained with (Family.block_size_for its config); None for a
    full-attention family."""
    get_base = getattr(model, "get_base_model", None)
    config = (get_base() if callable(get_base) else model).config
    return model_family(model).block_size_for(config)


class BlockEngine:
    """`generate_block` behind the engine protocol (rollout.engines.Engine): block-diffusion models only.

    Options: `block_remasking` (required: "sequential", "low_confidence_static" or
    "low_confidence_dynamic"), `threshold` (tau, with "low_confidence_dynamic" only, and required
    there), `steps` (denoising steps per block, <= block_length, checked by Decoding),
    `temperature` (0 = LLaDA2.1's argmax), `top_k`, `top_p`. `block_length` must be the model's
    trained block size (checked at generate: `check` sees no model). Refused: `remasking =
    "random"` (LLaDA's rule; the LLaDA default "low_confidence", which evaluation sets, is not
    used), `factor`, `cfg_scale`. `cache` is not used: this engine's cache is exact and always on.
    """

    def __init__(self, model: torch.nn.Module, ids: SpecialIds) -> None:
        self.model, self.ids = model, ids

    @staticmethod
    def check(decoding: Decoding) -> None:
        d = decoding
        if d.block_remasking is None:
            raise ValueError(f"engine = 'block' needs block_remasking: one of {', '.join(BLOCK_REMASKING)}")
        if (d.threshold is not None) != (d.block_remasking == "low_confidence_dynamic"):
            raise ValueError("engine = 'block' takes threshold with block_remasking = 'low_confidence_dynamic', "
                             "and needs it there")
        if d.remasking == "random":
            raise ValueError("engine = 'block' commits by block_remasking: remasking = 'random' is the "
                             "LLaDA engines' option")
        if d.factor is not None:
            raise ValueError("engine = 'block' does not take factor (the cached engine's rule)")
        if d.cfg_scale > 0:
            raise ValueError("engine = 'block' does not do classifier-free guidance (cfg_scale > 0)")

    def generate(self, prompt: Tensor, attention_mask: Tensor | None, decoding: Decoding,
                 generator: torch.Generator | None = None) -> tuple[Sample, RolloutStats]:
        self.check(decoding)
        d = decoding
        family = model_family(self.model)
        trained = trained_block_size(self.model)
        if trained is None or family.logit_shift:
            raise ValueError(f"engine = 'block' decodes block-diffusion models; family {family.name!r} is not one "
                             f"(attention {family.attention!r}): use engine = 'reference' or 'cached'")
        if d.block_length != trained:
            raise ValueError(f"block_length {d.block_length} is not the model's trained block size {trained} "
                             f"(family {family.name!r}): decode with block_length = {trained}")
        return generate_block(
            self.model, prompt, gen_length=d.gen_length, block_length=d.block_length, steps=d.steps,
            block_remasking=d.block_remasking, threshold=d.threshold, temperature=d.temperature, top_k=d.top_k,
            top_p=d.top_p, mask_id=self.ids.mask_id, pad_id=self.ids.pad_id, eos_ids=self.ids.eos_ids,
            attention_mask=attention_mask, generator=generator,
        )

    def load_weights(self, state: Mapping[str, Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)
