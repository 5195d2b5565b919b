"""Where text may be cut so that its parts tokenize exactly as the whole: for reading it in
chunks (sources.py, `safe_cut`) and splitting it into train and validation pieces
(prepare.py). Every cut follows a non-whitespace character, where GPT-2's split pattern (which
the trained BPEs share) always ends a pre-token.

With `piece_bytes` > 0, a piece ends at the first paragraph break (a blank line) at least
`piece_bytes` into it, else at the first line break at least 2x that, else at the first space
at least 3x that, whichever comes first. `cut_pieces` is the rule on a string; `piece_end`
finds a cut in a buffer being streamed.
"""

from __future__ import annotations

import re

MIN_PIECE_BYTES = 64  # smaller pieces could not see the whole character before a cut
_VISIBLE_ASCII = range(0x21, 0x7F)


def safe_cut(data: bytes, limit: int) -> int:
    """Where to end a text chunk within data[:limit]: before an ASCII space or newline after a
    visible ASCII character, else the last whitespace, else a UTF-8 character boundary."""
    i = limit
    while i > 1:
        i = max(data.rfind(b" ", 1, i), data.rfind(b"\n", 1, i))
        if i <= 0:
            break
        if data[i - 1] in _VISIBLE_ASCII:
            return i
    for ws in (b"\n", b" ", b"\t"):
        j = data.rfind(ws, 1, limit)
        if j > 0:
            return j
    i = limit
    while i > 1 and 0x80 <= data[i] < 0xC0:  # step back over UTF-8 continuation bytes
        i -= 1
    return i


# (pattern, multiple of piece_bytes a piece must reach before it may end there)
_BREAKS = ((re.compile(rb"\r?\n\r?\n"), 1), (re.compile(rb"\r?\n"), 2), (re.compile(rb" "), 3))


def _after_text(buf: bytes, p: int) -> bool:
    """True when the character ending at buf[p - 1] is not whitespace."""
    b = buf[p - 1]
    if b < 0x80:
        return b in _VISIBLE_ASCII
    i = p - 1
    while i > 0 and p - i < 4 and 0x80 <= buf[i] < 0xC0:  # back to the character's first byte
        i -= 1
    try:
        return not buf[i:p].decode("utf-8").isspace()
    except UnicodeDecodeError:
        return False


def piece_end(buf: bytes, lo: int, hi: int, origin: int, piece_bytes: int) -> int | None:
    """The first point p in [lo, hi) of `buf` where a piece that began at buf index `origin`
    ends (see the module doc), or None. Breaks may look at bytes past `hi`."""
    best = None
    for pattern, times in _BREAKS:
        end = hi if best is None else best
        m = pattern.search(buf, max(lo, origin + times * piece_bytes, 1))
        while m is not None and m.start() < end:
            if _after_text(buf, m.start()):
                best = m.start()
                break
            m = pattern.search(buf, m.start() + 1)
    return best


def cut_pieces(text: str, piece_bytes: int) -> list[str]:
    """`text` cut into pieces by the rule in the module doc (one piece when piece_bytes is 0);
    joined, they are `text`."""
    data = text.encode("utf-8")
    starts = [0]
    hi = len(data.rstrip())  # no break where only whitespace follows: no blank last piece
    while piece_bytes and (p := piece_end(data, starts[-1], hi, starts[-1], piece_bytes)):
        starts.append(p)
    bounds = [*starts, len(data)]
    return [data[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:], strict=False)]
