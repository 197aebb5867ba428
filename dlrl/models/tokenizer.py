"""Character-level tokenizer for the built-in tiny models.

One token per printable ASCII character (plus newline), and the special tokens a masked
diffusion LM needs: pad, EOS and mask. It is a real `PreTrainedTokenizerFast`, saved beside the
model with `save_pretrained`, so the loading path is the same as for hub checkpoints. Tiny models
see task prompts in their "compact" style, where every character matters (Sudoku grids,
Countdown expressions), so characters are tokens.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = {"pad": "<pad>", "eos": "<eos>", "mask": "<mask>", "unk": "<unk>"}
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Tokenizer with ids: <pad>=0, <eos>=1, <mask>=2, <unk>=3, then one id per character."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS.values())}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk"]))
    # Any character, newline included: "." alone skips newlines, so "\n\n" would be one unknown piece.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIALS["pad"],
        eos_token=SPECIALS["eos"],
        mask_token=SPECIALS["mask"],
        unk_token=SPECIALS["unk"],
        padding_side="left",
    )
    return tok
