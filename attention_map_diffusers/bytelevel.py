"""The byte-level table of GPT-2 / CLIP BPE vocabularies (standard library only)."""

from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    """Byte value -> the printable character that stands for it in the vocabulary, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))
