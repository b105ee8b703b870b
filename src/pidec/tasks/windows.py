"""Overlapping windows over a document too long for the encoder.

A window is a character range of the document covering at most `size` tokens; consecutive
windows overlap by `overlap` tokens, so that an answer cut by one window's edge lies whole in
the next. Windows start at the beginning of a word, so that the window's text tokenizes as it
did inside the document; each window's token count is checked again on its own text.
"""

from __future__ import annotations

from .base import token_spans


def word_start(text: str, spans: list[tuple[int, int]], k: int) -> int:
    """The nearest token at or before k that begins a word (follows whitespace or starts the text)."""
    while k > 0 and spans[k][0] > 0 and not text[spans[k][0] - 1].isspace():
        k -= 1
    return k


def window_ranges(text: str, spans: list[tuple[int, int]], size: int, overlap: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) of the windows; the last one ends at the document's end."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"window size {size} and overlap {overlap}: need size >= 1 and 0 <= overlap < size")
    n, start, out = len(spans), 0, []
    while True:
        end = min(start + size, n)
        out.append((start, end))
        if end == n:
            return out
        nxt = word_start(text, spans, end - overlap)
        start = nxt if nxt > start else end - overlap  # a word longer than the step: cut inside it


def split(text: str, tokenizer, size: int, overlap: int, spans: list[tuple[int, int]] | None = None) -> list[str]:
    """The document's windows as text, each at most `size` tokens when tokenized alone.
    spans: the document's token spans, when the caller has them already."""
    spans = token_spans(tokenizer, [text])[0] if spans is None else spans
    ranges = window_ranges(text, spans, size, overlap)
    pieces = [text[spans[a][0] : spans[b - 1][1]] for a, b in ranges]
    for _ in range(4):  # re-tokenized alone, a window may differ by a token at its edges
        lengths = [len(ids) for ids in tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]]
        over = [i for i, n in enumerate(lengths) if n > size]
        if not over:
            return pieces
        for i in over:
            a, b = ranges[i]
            b = max(a + 1, b - (lengths[i] - size))
            ranges[i] = (a, b)
            pieces[i] = text[spans[a][0] : spans[b - 1][1]]
    raise ValueError(f"could not fit a window of the document into {size} tokens")
