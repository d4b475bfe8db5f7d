"""The character tokenizer: ids are positions in the sorted vocabulary, text round-trips, an
unknown character is an error that names it, and the vocabulary survives a dict round trip."""

import numpy as np
import pytest

from lora_np.text.tokenizer import CharTokenizer


def test_sorted_unique_vocabulary_and_round_trip():
    tok = CharTokenizer("banana!\n")
    assert tok.chars == "\n!abn" and tok.vocab_size == 5
    ids = tok.encode("a nab!\n".replace(" ", "b"))
    assert ids.dtype == np.int32 and ids.shape == (7,)
    assert ids.tolist() == [2, 3, 4, 2, 3, 1, 0]
    assert tok.decode(ids) == "abnab!\n"
    assert tok.decode(ids.astype(np.int64).tolist()) == "abnab!\n"
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""


def test_from_texts_is_the_union_and_order_does_not_matter():
    a = CharTokenizer.from_texts("Emma", "£20,000")
    b = CharTokenizer.from_texts("£20,000", "Emma")
    assert a == b and hash(a) == hash(b) and a.chars == ",02Eam£"
    assert a.decode(a.encode("Emma £20,000".replace(" ", ""))) == "Emma£20,000"
    assert a.encode("£").tolist() == [a.vocab_size - 1]          # the one non-ASCII char sorts last


def test_unknown_characters_are_named():
    tok = CharTokenizer("abc ")
    with pytest.raises(ValueError, match=r"2 character\(s\) not in the vocabulary of 4: 'xz' .*position 4"):
        tok.encode("abc xzx")
    many = "".join(chr(ord("A") + i) for i in range(12))
    with pytest.raises(ValueError, match="'ABCDEFGHIJ' and 2 more"):
        tok.encode(many)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("a\ud800")                                    # a lone surrogate is just unknown


def test_decode_checks_its_ids():
    tok = CharTokenizer("ab")
    with pytest.raises(ValueError, match=r"lie in \[0, 2\), got range \[0, 2\]"):
        tok.decode([0, 2])
    with pytest.raises(ValueError, match=r"got range \[-1, 0\]"):
        tok.decode([-1, 0])                   # NumPy would quietly read the last character
    with pytest.raises(TypeError, match="integers"):
        tok.decode(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 2), dtype=int))


def test_bad_arguments():
    with pytest.raises(TypeError, match="chars must be a str"):
        CharTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="at least one character"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="at least one text"):
        CharTokenizer.from_texts()
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        CharTokenizer.from_texts("a", b"b")
    with pytest.raises(TypeError, match="text must be a str"):
        CharTokenizer("a").encode(b"a")


def test_dict_round_trip_and_refusals():
    tok = CharTokenizer.from_texts("Pride and Prejudice")
    assert CharTokenizer.from_dict(tok.to_dict()) == tok
    assert tok.to_dict() == {"chars": tok.chars}
    for bad in [{"chars": "ba"}, {"chars": "aab"}]:               # not what to_dict writes
        with pytest.raises(ValueError, match="sorted and unique"):
            CharTokenizer.from_dict(bad)
    for bad in [{"chars": ""}, {"chars": 3}, {"vocab": "ab"}, {"chars": "ab", "x": 1}, "ab", None]:
        with pytest.raises(ValueError, match="a tokenizer is a dict"):
            CharTokenizer.from_dict(bad)
    assert tok != "not a tokenizer" and repr(tok) == f"CharTokenizer(vocab_size={tok.vocab_size})"
