"""The two committed texts as token ids: held-out splits by position, training windows, and the
language-model loss in nats (and bits) per character.

::

    tok = corpus_tokenizer()                            # the 81 characters of both texts
    austen = load_splits("austen", tok)                 # Splits(train, val, test), 1-D int32
    x, y = windows(austen.train, context=64, stride=1)  # (N, 64) each, y[i, t] = x[i, t + 1]
    lm_loss(model, *windows(austen.test, 64, 64))       # nats/char; × NATS_TO_BITS for bits/char

**Splits by position.** The last ``val_frac + test_frac`` of a text (10 % by default) is held
out as one contiguous stretch: its first half is the validation split, its second the test
split. A random split of windows would put overlapping (nearly identical) stretches of text on
both sides; a split by position holds out text the model has never read a word of (for the
novels: the last chapters of *Persuasion*; for the Bible: the end of the New Testament).

**The loss.** The model predicts, at every position t of a window, the next character::

    L = −(1/(N T)) Σ_{n,t} ln p_θ(y[n, t] | x[n, 0..t])      nats per character

``ln V`` (ln 81 ≈ 4.39) is a uniform guess; ``L / ln 2`` is bits per character, the unit
compression results use.
"""

from __future__ import annotations

import functools
import gzip
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import functional as F
from ..modules import Module, batched_mean_loss
from ..validate import check_choice, check_int, check_number
from .tokenizer import CharTokenizer

__all__ = ["TEXTS", "DATA_DIR", "NATS_TO_BITS", "Splits", "load_text", "corpus_tokenizer", "split_ids",
           "load_splits", "windows", "lm_loss"]

#: the committed texts, lora_np/data/{name}.txt.gz (lora_np/data/README.md: sources, licences)
TEXTS = ("austen", "kjv")
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
#: bits per nat: a loss in nats/char times this is bits/char
NATS_TO_BITS = 1.0 / math.log(2.0)


class Splits(NamedTuple):
    """One text's ids cut by position: ``train`` (the first 90 % by default), then ``val``,
    then ``test`` (the last 5 %). Views of one 1-D int32 array."""
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def load_text(name: str) -> str:
    """The text of lora_np/data/{name}.txt.gz, ``name`` in TEXTS (read once, then cached)."""
    return _read_text(check_choice("name", name, TEXTS))


@functools.lru_cache(maxsize=None)
def _read_text(name: str) -> str:
    with gzip.open(DATA_DIR / f"{name}.txt.gz", "rt", encoding="utf-8", newline="") as fh:
        return fh.read()


def corpus_tokenizer() -> CharTokenizer:
    """The tokenizer of every character of every text in TEXTS (81 characters: the KJV's are
    a subset of Austen's)."""
    return CharTokenizer.from_texts(*(load_text(name) for name in TEXTS))


def split_ids(ids, val_frac: float = 0.05, test_frac: float = 0.05) -> Splits:
    """Cut the 1-D ``ids`` of one text by position into train | val | test.

    With n = len(ids): ``test`` is the last ⌊n · test_frac⌋ ids, ``val`` the ⌊n · val_frac⌋
    before them, ``train`` everything before that. The three are disjoint, in order, and
    together are ``ids`` (views of it, not copies). Every part must be non-empty.
    """
    ids = _check_ids("ids", ids)
    val_frac = check_number("val_frac", val_frac, positive=True)
    test_frac = check_number("test_frac", test_frac, positive=True)
    if val_frac + test_frac >= 1:
        raise ValueError(f"val_frac + test_frac must be < 1 (something must be left to train on), "
                         f"got {val_frac} + {test_frac}")
    n = len(ids)
    n_val, n_test = int(n * val_frac), int(n * test_frac)
    if n_val == 0 or n_test == 0:
        raise ValueError(f"split_ids: {n} ids are too few for val_frac={val_frac}, "
                         f"test_frac={test_frac} (a held-out part would be empty)")
    a, b = n - n_val - n_test, n - n_test
    return Splits(ids[:a], ids[a:b], ids[b:])


def load_splits(name: str, tokenizer: CharTokenizer, val_frac: float = 0.05,
                test_frac: float = 0.05) -> Splits:
    """``split_ids(tokenizer.encode(load_text(name)), val_frac, test_frac)``."""
    if not isinstance(tokenizer, CharTokenizer):
        raise TypeError(f"tokenizer must be a CharTokenizer, got {type(tokenizer).__name__}")
    return split_ids(tokenizer.encode(load_text(name)), val_frac, test_frac)


def windows(ids, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows from one stretch of text: inputs and their next characters.

    Row i starts at ``i · stride``::

        x[i] = ids[i·stride     : i·stride + context]        (N, context) int32
        y[i] = ids[i·stride + 1 : i·stride + context + 1]    (N, context) int32

    with N = ⌊(len(ids) − context − 1) / stride⌋ + 1, so every row has its next characters.
    ``stride = context`` gives disjoint rows (an evaluation reads each character once);
    ``stride = 1`` gives a row starting at every position (training draws rows at random).
    x and y are read-only views of ``ids`` (no copy, whatever the stride); indexing them with
    a batch of row numbers (``x[rows]``) gives ordinary arrays.
    """
    ids = _check_ids("ids", ids)
    context = check_int("context", context, minimum=1)
    stride = check_int("stride", stride, minimum=1)
    if len(ids) < context + 1:
        raise ValueError(f"windows: {len(ids)} ids are too few for one row of context {context} "
                         f"(need {context + 1}: the inputs and the next character)")
    rows = np.lib.stride_tricks.sliding_window_view(ids, context + 1)[::stride]
    return rows[:, :-1], rows[:, 1:]


def lm_loss(model: Module, x, y, batch_size: int = 256) -> float:
    """Mean next-character cross-entropy of ``model`` on (x, y), in nats per character.

    ``x``, ``y``: (N, T) integer ids (``windows``). Every one of the N·T positions counts
    once: ``Σ_batches (rows in batch) · mean loss of batch / N``, batches of ``batch_size``
    rows taken in order, so the value is deterministic. The model runs in eval mode (no
    dropout) inside ``no_grad()`` (nothing kept for backward); its mode is restored.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lora_np Module, got {type(model).__name__}")
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"lm_loss: x and y must be non-empty (N, T) arrays of the same shape, got "
                         f"{x.shape} and {y.shape}")
    for name, a in (("x", x), ("y", y)):
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"lm_loss: {name} must hold integer ids, got dtype {a.dtype}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    return batched_mean_loss(model, x, y, F.cross_entropy_loss, batch_size)


def _check_ids(name, ids) -> np.ndarray:
    """``ids`` as a non-empty 1-D int32 array of non-negative ids (int32 input is not copied)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of token ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{name} must hold token ids in [0, 2**31), got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int32, copy=False)
