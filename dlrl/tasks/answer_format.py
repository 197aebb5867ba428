"""The d1 `<reasoning>…</reasoning><answer>…</answer>` response format: the instruction that asks
for it and the extraction of the answer region that rewards score.

Kept in one place so every task's chat prompt asks for the same format its reward reads.
"""

from __future__ import annotations

REASONING_FORMAT = (
    "Respond in the following format:\n"
    "<reasoning>\n...\n</reasoning>\n"
    "<answer>\n...\n</answer>"
)
"""The d1 system instruction (used as the head of every chat prompt)."""

OPEN_TAG = "<answer>"
CLOSE_TAG = "</answer>"


def answer_region(text: str) -> str:
    """The text a reward reads: what follows the LAST `<answer>` up to the next `</answer>` (or the
    end of the text, so a completion cut off before its closing tag still counts, as in d1);
    the whole text when there is no `<answer>` tag (compact style has no tags).

    Uses `rfind`/`find` only, so it is linear and C-speed even on absurdly long completions.
    """
    start = text.rfind(OPEN_TAG)
    if start < 0:
        return text
    start += len(OPEN_TAG)
    end = text.find(CLOSE_TAG, start)
    return text[start:] if end < 0 else text[start:end]


def chat_answer(content: str) -> str:
    """`content` wrapped in answer tags: the minimal chat-style completion a reward accepts."""
    return f"{OPEN_TAG}\n{content}\n{CLOSE_TAG}"
