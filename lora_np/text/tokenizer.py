"""A character-level tokenizer: one id per distinct character, in sorted order.

``CharTokenizer(chars)`` keeps the sorted unique characters of ``chars``; the id of a character
is its index in that string::

    tok = CharTokenizer.from_texts(austen, kjv)      # every character of both texts
    ids = tok.encode("Emma")                         # int32 array, shape (4,)
    tok.decode(ids) == "Emma"

The vocabulary is part of a model (the embedding has one row per id, the head one output per
id), so it is saved with the model's weights (``to_dict``/``from_dict``; see
``lora_np.text.checkpoint``). Encoding a character outside the vocabulary is an error, never a
silent replacement: it names the characters.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CharTokenizer"]

#: how many unknown characters an error message shows
_SHOWN = 10


class CharTokenizer:
    """Characters ↔ integer ids; ``chars[i]`` has id ``i``.

    Parameters
    ----------
    chars : str
        The characters of the vocabulary, in any order and with repeats (they are sorted and
        deduplicated, so equal sets give equal tokenizers). At least one character.
    """

    def __init__(self, chars: str):
        if not isinstance(chars, str):
            raise TypeError(f"chars must be a str, got {type(chars).__name__}")
        if not chars:
            raise ValueError("chars must hold at least one character, got ''")
        self._chars = "".join(sorted(set(chars)))
        # code points in ascending order (sorted str order is code-point order): encode is a
        # binary search of the text's code points in this array, decode an index into it
        self._codes = np.frombuffer(self._chars.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).copy()

    @classmethod
    def from_texts(cls, *texts: str) -> "CharTokenizer":
        """The tokenizer whose vocabulary is every character that occurs in ``texts``."""
        if not texts:
            raise ValueError("from_texts needs at least one text, got none")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        return cls("".join(set().union(*map(set, texts))))

    @property
    def chars(self) -> str:
        """The vocabulary, sorted: the character of id ``i`` is ``chars[i]``."""
        return self._chars

    @property
    def vocab_size(self) -> int:
        """V, the number of ids (the embedding's rows, the head's outputs)."""
        return len(self._chars)

    def encode(self, text: str) -> np.ndarray:
        """``text`` as ids: an int32 array of shape (len(text),).

        Raises ValueError naming the characters of ``text`` that are not in the vocabulary (and
        where the first one is); nothing is replaced or dropped.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, points)
        known = self._codes[np.minimum(ids, len(self._codes) - 1)] == points
        if not known.all():
            bad = np.flatnonzero(~known)
            unknown = sorted(set(text[i] for i in bad))
            shown = "".join(unknown[:_SHOWN])
            more = f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
            raise ValueError(f"encode: {len(unknown)} character(s) not in the vocabulary of "
                             f"{self.vocab_size}: {shown!r}{more} (first at position {bad[0]}); "
                             "build the tokenizer from texts that contain them")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        """The text of ``ids``: a 1-D sequence of integers in [0, vocab_size)."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"decode: ids must be a 1-D sequence, got shape {arr.shape}")
        if arr.size == 0:
            return ""
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"decode: ids must be integers, got dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"decode: ids must lie in [0, {self.vocab_size}), got range "
                             f"[{arr.min()}, {arr.max()}]")
        return self._codes[arr].tobytes().decode("utf-32-le", "surrogatepass")

    def to_dict(self) -> dict:
        """``{"chars": chars}``, JSON-able; ``from_dict`` rebuilds the same tokenizer."""
        return {"chars": self._chars}

    @classmethod
    def from_dict(cls, d) -> "CharTokenizer":
        """The tokenizer ``to_dict`` described. Raises ValueError if ``d`` is not such a dict
        (the characters must already be sorted and unique: anything else was not written by
        ``to_dict``, and its ids would not be the ones a model was trained with)."""
        if not (isinstance(d, dict) and set(d) == {"chars"} and isinstance(d["chars"], str) and d["chars"]):
            raise ValueError(f"a tokenizer is a dict {{'chars': <non-empty str>}}, got {d!r:.80}")
        tok = cls(d["chars"])
        if tok.chars != d["chars"]:
            raise ValueError("the tokenizer's characters are not sorted and unique; the ids they "
                             "define would differ from the ones the model was trained with")
        return tok

    def __eq__(self, other):
        if not isinstance(other, CharTokenizer):
            return NotImplemented
        return self._chars == other._chars

    def __hash__(self):
        return hash(self._chars)

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"
