"""Write a policy checkpoint in Hugging Face format, loadable again by `load_model`.

A LoRA-wrapped model writes only its adapter (adapter_config.json + adapter_model.safetensors,
a few MB) whose config points at the base model; a full model writes config + safetensors.
The tokenizer goes beside either, so the directory alone is enough to sample from. Atomicity is
the caller's: write into a temporary directory, add resume state, then rename.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def save_checkpoint(
    model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, path: str | Path,
    state_dict: dict | None = None,
) -> Path:
    """Save `model` (adapter only if it is a PeftModel) and `tokenizer` to `path`; returns path.

    `state_dict`: the weights to write instead of the model's own (a sharded learner group passes
    the whole weights gathered from its shards)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        base = model.peft_config[model.active_adapter].base_model_name_or_path
        if not base:
            # An adapter without its base cannot be loaded again; fail now, not at resume time.
            raise ValueError(
                "the LoRA base model has no name_or_path: save the base model and load it with "
                "load_model(dir, lora=...) so the adapter can point at it"
            )
    if state_dict is None:
        model.save_pretrained(path, safe_serialization=True)
    else:
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    return path


def load_trainable(model: PreTrainedModel | PeftModel, path: str | Path) -> None:
    """Load the tensors `save_checkpoint` wrote at `path` back into `model`, in place.

    Resuming builds the policy exactly as a fresh run does (base + LoRA from the spec) and then
    restores the trained tensors; the weights round-trip bit-exactly through safetensors.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {path}")
    state: dict = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
