"""The committed texts as ids: the 81-character vocabulary of both texts, held-out splits by
position (disjoint, in order, covering the text), training windows and the LM loss."""

import math

import numpy as np
import pytest

from lora_np import Linear, Module
from lora_np import functional as F
from lora_np.text.corpus import (NATS_TO_BITS, TEXTS, Splits, corpus_tokenizer, lm_loss, load_splits,
                                 load_text, split_ids, windows)


def test_texts_and_their_vocabulary():
    austen, kjv = load_text("austen"), load_text("kjv")
    assert (len(austen), len(kjv)) == (4_016_712, 4_139_730)          # lora_np/data/README.md
    tok = corpus_tokenizer()
    assert tok.vocab_size == 81 and set(kjv) <= set(austen) and tok.chars == "".join(sorted(set(austen)))
    assert tok.chars[0] == "\n" and tok.chars[-1] == "£"
    assert load_text("austen") is austen                               # read once
    assert TEXTS == ("austen", "kjv")
    with pytest.raises(ValueError, match=r"name must be one of \('austen', 'kjv'\)"):
        load_text("emma")


def test_split_by_position_is_disjoint_ordered_and_complete():
    ids = np.arange(1000, dtype=np.int32)
    s = split_ids(ids)
    assert isinstance(s, Splits) and [len(p) for p in s] == [900, 50, 50]
    np.testing.assert_array_equal(np.concatenate(s), ids)               # in order, nothing lost
    assert s.train[-1] < s.val[0] and s.val[-1] < s.test[0]             # by position: disjoint
    assert np.shares_memory(s.test, ids)                                # views, not copies
    s = split_ids(ids, val_frac=0.1, test_frac=0.2)
    assert [len(p) for p in s] == [700, 100, 200] and s.test[0] == 800


def test_splits_of_the_texts_hold_out_their_ends():
    tok = corpus_tokenizer()
    for name in TEXTS:
        text, s = load_text(name), load_splits(name, tok)
        n = len(text)
        assert [len(p) for p in s] == [n - 2 * int(0.05 * n), int(0.05 * n), int(0.05 * n)]
        assert tok.decode(s.test[-40:]) == text[-40:]
        assert tok.decode(s.val[:40]) == text[len(s.train):len(s.train) + 40]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"val_frac": 0.0}, ValueError, "val_frac must be a finite number > 0"),
    ({"test_frac": -0.1}, ValueError, "test_frac must be"),
    ({"val_frac": 0.5, "test_frac": 0.5}, ValueError, "val_frac \\+ test_frac must be < 1"),
    ({"val_frac": "0.1"}, TypeError, "val_frac must be a number"),
])
def test_split_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        split_ids(np.arange(100), **kwargs)


def test_split_refuses_bad_ids():
    with pytest.raises(ValueError, match="too few"):
        split_ids(np.arange(10))
    with pytest.raises(ValueError, match="1-D"):
        split_ids(np.zeros((10, 10), dtype=int))
    with pytest.raises(TypeError, match="integer token ids"):
        split_ids(np.zeros(100))
    with pytest.raises(ValueError, match=r"\[0, 2\*\*31\)"):
        split_ids(-np.arange(100))
    with pytest.raises(TypeError, match="CharTokenizer"):
        load_splits("kjv", "abc")


@pytest.mark.parametrize("n, context, stride, rows", [(11, 4, 1, 7), (11, 4, 4, 2), (10, 9, 1, 1),
                                                      (12, 4, 3, 3), (9, 4, 4, 2)])
def test_windows_shapes_and_next_characters(n, context, stride, rows):
    ids = np.arange(n, dtype=np.int32) + 100
    x, y = windows(ids, context, stride)
    assert x.shape == y.shape == (rows, context) and x.dtype == y.dtype == np.int32
    for i in range(rows):
        np.testing.assert_array_equal(x[i], ids[i * stride:i * stride + context])
        np.testing.assert_array_equal(y[i], ids[i * stride + 1:i * stride + context + 1])
    assert y[-1, -1] <= ids[-1]                         # every row has its next character
    assert not x.flags.writeable and np.shares_memory(x, ids)          # views
    assert x[[rows - 1, 0]].flags.writeable              # a batch of rows is an ordinary array


def test_windows_of_a_whole_text_cost_no_memory():
    s = load_splits("austen", corpus_tokenizer())
    x, y = windows(s.train, context=64, stride=1)
    assert x.shape == (len(s.train) - 64, 64) and np.shares_memory(x, s.train)


def test_windows_arguments():
    with pytest.raises(ValueError, match="too few for one row of context 4"):
        windows(np.arange(4), 4, 1)
    with pytest.raises(ValueError, match="context must be >= 1"):
        windows(np.arange(4), 0, 1)
    with pytest.raises(TypeError, match="stride must be an int"):
        windows(np.arange(10), 4, 1.0)
    x, _ = windows(np.arange(10, dtype=np.int64), 4, 2)
    assert x.dtype == np.int32


class _Bigram(Module):
    """A table of logits per current id: logits[b, t] = W[x[b, t]] (a model that ignores the
    past), enough to check lm_loss against the loss written out by hand."""

    def __init__(self, V, rng=0):
        super().__init__()
        self.table = Linear(V, V, bias=False, rng=rng)
        self.V = V

    def forward(self, idx):
        return self.table(np.eye(self.V)[idx])

    def backward(self, dout):
        self.table.backward(dout)


def test_lm_loss_is_the_mean_over_every_position_in_any_batching():
    rng = np.random.default_rng(0)
    V, ids = 7, rng.integers(0, 7, size=200).astype(np.int32)
    x, y = windows(ids, 8, 5)
    model = _Bigram(V)
    logits = model.table.W.T[x]                                     # (N, T, V)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    by_hand = -np.take_along_axis(log_p, y[..., None], -1).mean()
    for batch_size in (1, 7, 256):
        assert lm_loss(model, x, y, batch_size=batch_size) == pytest.approx(by_hand, rel=1e-12)
    assert lm_loss(model, x, y, 7) == lm_loss(model, x, y, 7)        # deterministic
    assert NATS_TO_BITS == pytest.approx(1 / math.log(2))


def test_lm_loss_keeps_nothing_and_restores_the_mode():
    x, y = windows(np.arange(50, dtype=np.int32) % 7, 8, 8)
    model = _Bigram(7)
    model.train()
    out = model(x)                                      # a pending training forward
    lm_loss(model, x[:2], y[:2])
    assert model.training
    model.backward(F.cross_entropy_loss(out, y)[1])      # still the forward of the whole x
    model.eval()
    lm_loss(model, x, y)
    assert not model.training


def test_lm_loss_arguments():
    x, y = windows(np.arange(50, dtype=np.int32) % 7, 8, 8)
    model = _Bigram(7)
    with pytest.raises(TypeError, match="lora_np Module"):
        lm_loss(lambda v: v, x, y)
    with pytest.raises(ValueError, match="same shape"):
        lm_loss(model, x, y[:, :-1])
    with pytest.raises(TypeError, match="integer ids"):
        lm_loss(model, x, y.astype(float))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        lm_loss(model, x, y, batch_size=0)

