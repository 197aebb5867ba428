"""Test tokenizers with LLaDA's, Dream's and SDAR's chat layouts (real special tokens, real ids if asked).

The published tokenizers cannot be downloaded here, so these are character-level fast tokenizers
carrying the published special tokens and an equivalent chat template (restated from the
published tokenizer_config.json files, checked against the copy of GSAI-ML/LLaDA-8B-Instruct's in
yinj66/support_basis@66e6761 `LLaDA-8B-Instruct-B&S-light/tokenizer_config.json`; Dream's is
Qwen2's layout with its default system message). With `published_ids=True` every special token
sits at its published id (filler tokens pad the vocab), so tests can assert exact ids.

- LLaDA: <|startoftext|> (126080, BOS) once, then per message
  <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT(trimmed)<|eot_id|>, then always
  <|start_header_id|>assistant<|end_header_id|>\\n\\n. <|endoftext|> 126081 is EOS and pad;
  <|start_header_id|> 126346, <|end_header_id|> 126347, <|eot_id|> 126348; mask 126336.
- Dream (Qwen2): <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n unless a system
  message is given, then <|im_start|>ROLE\\nCONTENT<|im_end|>\\n per message and
  <|im_start|>assistant\\n as generation prompt. <|endoftext|> 151643 (EOS, pad), <|im_start|>
  151644, <|im_end|> 151645, <|mask|> 151666.
- SDAR (Qwen3; JetAstra/SDAR@c2041a8:training/model/SDAR-4B-Chat/{added_tokens.json,
  chat_template.jinja}): Dream's layout without the default system message; <think> 151667,
  </think> 151668, <MASK> 151669.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dlrl.models.tokenizer import CHARACTERS

LLADA_SPECIALS = {126080: "<|startoftext|>", 126081: "<|endoftext|>", 126336: "<|mdm_mask|>",
                  126346: "<|start_header_id|>", 126347: "<|end_header_id|>", 126348: "<|eot_id|>"}
DREAM_SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151666: "<|mask|>"}
SDAR_SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151667: "<think>",
                 151668: "</think>", 151669: "<MASK>"}

LLADA_TEMPLATE = (
    "{{ bos_token if messages else '' }}"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    # An expression, not template text: Jinja drops a template's trailing newline.
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)
DREAM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _char_tokenizer(specials: dict[int, str], published_ids: bool, **roles: str) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    ordered = sorted(specials.items())
    if published_ids:
        for token_id, token in ordered:
            while len(vocab) < token_id:
                vocab[f"<|filler_{len(vocab)}|>"] = len(vocab)
            vocab[token] = token_id
    else:
        for _, token in ordered:
            vocab[token] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("\n|."), behavior="isolated")  # "." skips newlines
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in ordered])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", padding_side="left", **roles)

SDAR_TEMPLATE = (  # Qwen3's, without tools: no default system message; thinking off -> an empty think block
    "{% if messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] != 'system' or not loop.first %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def llada_tokenizer(published_ids: bool = False) -> PreTrainedTokenizerFast:
    """LLaDA-8B-Instruct's special tokens and chat layout over a character vocabulary."""
    tok = _char_tokenizer(LLADA_SPECIALS, published_ids, bos_token="<|startoftext|>",
                          eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = LLADA_TEMPLATE
    return tok


def dream_tokenizer(published_ids: bool = False) -> PreTrainedTokenizerFast:
    """Dream-v0-Instruct-7B's (Qwen2's) special tokens and chat layout over a character vocabulary."""
    tok = _char_tokenizer(DREAM_SPECIALS, published_ids, eos_token="<|endoftext|>",
                          pad_token="<|endoftext|>", mask_token="<|mask|>")
    tok.chat_template = DREAM_TEMPLATE
    return tok


def sdar_tokenizer(published_ids: bool = False) -> PreTrainedTokenizerFast:
    """SDAR-*-Chat's (Qwen3's) special tokens and chat layout over a character vocabulary. Like the
    published tokenizer it declares no usable mask token (its tokenizer_config names `<|MASK|>`,
    which is not in the vocabulary); the real one is `<MASK>`, found through the family record."""
    tok = _char_tokenizer(SDAR_SPECIALS, published_ids, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = SDAR_TEMPLATE
    return tok
