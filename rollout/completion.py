"""From task examples to scored completions: prompt encoding, batched sampling, decoding, rewards.

Used by the rollout worker (sampled groups) and by evaluation (greedy, held-out), so the two can
never disagree on how a prompt is built or a completion is read.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from dlrl.decoding import Decoding
from dlrl.models import SpecialIds
from dlrl.tasks import Example, Task
from rollout.engines import Engine, engine_class
from rollout.rollout_stats import RolloutStats

__all__ = ["decode_completion", "encode_prompt", "evaluate", "left_pad", "sample_completions", "sample_record", "score"]

log = logging.getLogger(__name__)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, task: Task, ex: Example, style: str) -> list[int]:
    """Token ids of the example's prompt; 'chat' style goes through the tokenizer's chat template.

    The template is rendered to text and then tokenized: `apply_chat_template(tokenize=True)`
    returns a list of ids on transformers 4 but a BatchEncoding (a dict) on 5, whose list() is its
    keys. add_special_tokens=False because the template already writes BOS where the model wants
    it (LLaDA's <|startoftext|>); a tokenizer that adds one itself would double it.
    """
    text = task.prompt(ex, style)
    if style == "chat" and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode_completion(tokenizer: PreTrainedTokenizerBase, ids: np.ndarray, ids_info: SpecialIds) -> str:
    """Text of a completion up to its first EOS (mask tokens, if any, are dropped)."""
    out: list[int] = []
    for t in ids.tolist():
        if t in ids_info.eos_ids:
            break
        if t != ids_info.mask_id and t != ids_info.pad_id:
            out.append(t)
    return tokenizer.decode(out, skip_special_tokens=True)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) token ids and 1/0 attention mask of left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[i, width - len(p):] = 1
    return ids, attn


def sample_completions(
    engine: Engine,
    prompts: list[list[int]],
    decoding: Decoding,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, RolloutStats]:
    """Completions (N, L) int32, their unmask steps (N, L) int16 and the sampler's stats.

    Sampled by `engine` (the one `decoding.engine` names) in batches of `batch_size` prompts.
    """
    if not isinstance(engine, engine_class(decoding.engine)):
        raise TypeError(f"decoding names engine {decoding.engine!r}, given {type(engine).__name__}")
    model, pad_id = engine.model, engine.ids.pad_id
    device = next(model.parameters()).device
    completions, steps, stats = [], [], RolloutStats()
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            prompt_ids, attn = left_pad(chunk, pad_id)
            sample, batch_stats = engine.generate(prompt_ids.to(device), attn.to(device), decoding, generator)
            stats.add(batch_stats)
            completions.append(sample.tokens[:, prompt_ids.shape[1]:].cpu().numpy().astype(np.int32))
            steps.append(sample.unmask_step.cpu().numpy().astype(np.int16))
    finally:
        model.train(was_training)
    return np.concatenate(completions), np.concatenate(steps), stats


def score(task: Task, text: str, ex: Example, errors: list[str] | None = None) -> float:
    """The task's reward; a reward function that raises scores 0 and is logged (never fatal).

    Rewards that run model text as code or maths bound their own time (dlrl.tasks.verify_process
    kills a checker that loops) and score 0 on timeout. `errors` collects the example ids that failed.
    """
    try:
        return float(task.reward(text, ex))
    except Exception:  # noqa: BLE001 - a broken reward must not kill a rollout worker
        log.exception("reward of task %s raised on example %s; scoring 0", task.name, ex.id)
        if errors is not None:
            errors.append(ex.id)
        return 0.0


EVAL_SEED = 1234
"""Seed of the held-out evaluation set; the tiny checkpoints' SFT curves use the same set."""


def evaluate(
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: list[Example],
    decoding: Decoding,
    batch_size: int,
    style: str,
    samples: int = 0,
) -> dict:
    """Greedy (temperature-0) mean reward on `examples`, exact-solve rate, timing and sampler stats;
    with `samples` > 0 also `samples`: the first that many examples' prompt, completion and reward
    (sample_record), what the run logs to samples.jsonl."""
    t0 = time.perf_counter()
    prompts = [encode_prompt(tokenizer, task, ex, style) for ex in examples]
    completions, _, stats = sample_completions(engine, prompts, decoding.decoding(temperature=0.0), batch_size)
    ids = engine.ids
    texts = [decode_completion(tokenizer, c, ids) for c in completions]
    rewards = [score(task, t, ex) for t, ex in zip(texts, examples)]
    out = {
        "eval_reward": float(np.mean(rewards)),
        "eval_solved": float(np.mean([r >= 1.0 for r in rewards])),
        "eval_seconds": time.perf_counter() - t0,
        **stats.metrics(prefix="eval_"),
    }
    if samples:
        out["samples"] = [sample_record(ex, task.prompt(ex, style), t, r)
                          for ex, t, r in list(zip(examples, texts, rewards))[:samples]]
    return out


def sample_record(ex: Example, prompt: str, completion: str, reward: float) -> dict:
    """One logged sample: the example's id, its prompt and completion as text, and the reward."""
    return {"id": str(ex.id), "prompt": prompt, "completion": completion, "reward": float(reward)}
