"""Texts to CLIP token ids, each text first cut to what the tokenizer's context can hold."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

# A CLIP BPE token spans at most 32 characters (the longest vocabulary entry), and words are one
# space apart once whitespace is collapsed, so a text's first ``context_length`` tokens lie within
# its first 33 * context_length characters; 64 leaves room for a cut at a space (see below).
CHARS_PER_TOKEN = 64


def tokenizer_input(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters for a tokenizer that keeps only its first tokens.

    The tokenizer truncates a long text to its context length anyway, but tokenizes all of it first,
    and open_clip's BPE takes time quadratic in a word's length (a 32 kB word without spaces: 23 s of
    CPU here).
    Whitespace runs are collapsed (as the tokenizers do) and the cut falls on a space when one lies in
    the last quarter of the kept span, so a text with ordinary spacing keeps every token the tokenizer
    would keep; a "word" longer than that (a base64 blob, say) is cut inside the word.
    """
    if len(text) <= max_chars:
        return text
    words = " ".join(text.split())
    if len(words) <= max_chars:
        return words
    space = words.rfind(" ", max_chars - max_chars // 4, max_chars + 1)
    return words[:space] if space > 0 else words[:max_chars]


def tokenize_texts(tokenize: Callable[[list[str]], Tensor], texts: Sequence[str]) -> Tensor:
    """Token ids of ``texts``, each cut first to what the tokenizer's context can hold (``tokenizer_input``)."""
    max_chars = CHARS_PER_TOKEN * int(getattr(tokenize, "context_length", None) or 77)
    return tokenize([tokenizer_input(t, max_chars) for t in texts])
