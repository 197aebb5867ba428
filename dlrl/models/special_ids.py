"""The token ids a masked-diffusion loop needs: mask, pad and every id that ends a completion.

They are read from the model config and the tokenizer, never hard-coded: LLaDA, Dream and the
built-in model all use different ids, and a fine-tuned checkpoint may move them. The config wins
over the tokenizer because it is what the model was trained with (LLaDA's tokenizer, for one,
does not declare its mask token). Where a family's mask token lives when neither declares it is the
family's (`Family.mask_token`, looked up by string in the tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from dlrl.models.families import family_of

# Chat models end an assistant turn with one of these before (or instead of) their EOS token;
# a completion that stops there is finished. Looked up by string so no id is hard-coded
# (LLaDA: <|eot_id|>, <|endoftext|>; Dream/Qwen: <|im_end|>, <|endoftext|>).
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<end_of_turn>")


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens of one model + tokenizer pair."""

    mask_id: int
    """Id of the [MASK] token that the forward process substitutes and the sampler unmasks."""
    pad_id: int
    """Id used to left-pad prompts and fill after EOS; never attended to."""
    eos_ids: tuple[int, ...]
    """Every id that ends a completion (EOS and chat end-of-turn tokens), config's first."""


def _ids(value: int | list[int] | tuple[int, ...] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """Id of `token` if the tokenizer really has it (not the unknown-token fallback), else None."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tokenizer.convert_ids_to_tokens(tid) != token:
        return None
    return int(tid)


def special_ids(model: object, tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """Read mask / pad / EOS ids from `model.config` (or a config passed directly) and `tokenizer`.

    mask: config.mask_token_id, else the id of the family's named mask token where the tokenizer
    has it, else tokenizer.mask_token_id, else ValueError (guessing would silently train on the
    wrong token). The family's token comes before the tokenizer's declaration because a published
    tokenizer may declare one it lacks: SDAR's tokenizer_config names `<|MASK|>`, not in its
    vocabulary, which transformers then adds as a fresh, untrained id (151670), while the model's
    mask is `<MASK>` = 151669 (block-diffusion.md §3). pad: config, else tokenizer, else the first EOS id. EOS: config.eos_token_id (int or list), tokenizer.eos_token_id, then any end-of-turn token
    in END_OF_TURN_TOKENS that the tokenizer has.
    """
    config = model if isinstance(model, PretrainedConfig) else getattr(model, "config", None)
    mask_id = getattr(config, "mask_token_id", None)
    mask_token = family_of(config).mask_token
    if mask_id is None and mask_token is not None:
        mask_id = token_id(tokenizer, mask_token)
    if mask_id is None:
        mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError(
            "no mask token id: set `mask_token_id` in the model config or a mask token on the tokenizer"
        )

    eos: list[int] = _ids(getattr(config, "eos_token_id", None)) + _ids(tokenizer.eos_token_id)
    eos += [tid for tok in END_OF_TURN_TOKENS if (tid := token_id(tokenizer, tok)) is not None]
    eos_ids = tuple(dict.fromkeys(eos))  # de-duplicate, keep order
    if not eos_ids:
        raise ValueError("no EOS token id in the model config or the tokenizer")

    pad_id = getattr(config, "pad_token_id", None)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0]
    return SpecialIds(mask_id=int(mask_id), pad_id=int(pad_id), eos_ids=eos_ids)
