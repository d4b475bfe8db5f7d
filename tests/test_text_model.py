"""Tests for lora_np.text.model: the GPT-style LanguageModel (names, shapes, causality, gradient
checks of every parameter, with and without LoRA on every linear layer and the token embedding,
float32, bad input) and generate (reproducible; a merged adapter generates the same text)."""

import json

import numpy as np
import pytest
from conftest import GRAD_RECORDS, THRESHOLD, Snapshot, _current_test

import lora_np
from lora_np import Adam, LoRAEmbedding, LoRALinear, add_lora, lora_layers, merge_lora, no_grad, unmerge_lora
from lora_np import functional as F
from lora_np.gradcheck import _randomize_norms, check_gradients
from lora_np.text import LanguageModel, generate
from lora_np.text.model import EMBEDDING_STD

TINY = dict(vocab_size=7, d_model=8, n_heads=2, n_layers=2, d_hidden=12, context=5)
LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "head"]
#: (2, 5) ids in which every id of the vocabulary occurs, some twice
IDS = np.array([[3, 0, 6, 1, 3], [5, 2, 4, 0, 6]])


def tiny(**kwargs):
    return LanguageModel(**{**TINY, "rng": 0, **kwargs})


def lora_tiny():
    """LoRA r=2 (s = 2.5) on every linear layer and on tok_emb, B random: a non-degenerate point."""
    model = add_lora(tiny(), LINEAR_TARGETS + ["tok_emb"], r=2, alpha=5.0, rng=1)
    return lora_np.randomize_lora(model, rng=2)


class StubTokenizer:
    """The duck type generate needs: ids are the positions of the characters in ``chars``."""

    def __init__(self, chars="abcdefg"):
        self.chars, self.vocab_size = chars, len(chars)

    def encode(self, text):
        return np.array([self.chars.index(c) for c in text], dtype=np.int32)

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids)


def assert_lm_grads(model, ids, expect_count):
    """Every trainable parameter checked on its own; none all-zero except the structural zeros."""
    rows = check_gradients(model, ids, threshold=THRESHOLD, check_input=False)
    assert len(rows) == expect_count and {r.name for r in rows} == set(model.trainable_parameters())
    for r in rows:
        assert r.passed, f"{r.name}: {r.reason}"
        if not r.structural_zero:
            GRAD_RECORDS.append((_current_test(), r.name, r.rel_error))
            assert r.grad_norm > 0, r.name
    return rows


# ---------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------


def test_children_are_named_as_in_gpt2():
    model = tiny()
    assert list(model.named_children()) == ["tok_emb", "pos_emb", "blocks", "ln_f", "head"]
    paths = {p for p, _ in model.named_modules()}
    assert {"blocks.0", "blocks.1", "blocks.1.attn.q_proj", "blocks.0.mlp.fc2", "blocks.1.ln2"} <= paths
    assert "blocks.2" not in paths
    assert model.tok_emb.W.shape == (7, 8) and model.pos_emb.W.shape == (5, 8)
    assert model.head.W.shape == (7, 8)
    assert all(model.blocks[i].attn.causal for i in range(2))


def test_one_dotted_target_adapts_one_layer_and_a_last_name_every_block():
    one = add_lora(tiny(), ["blocks.1.attn.q_proj"], r=2, alpha=4.0)
    assert set(lora_layers(one)) == {"blocks.1.attn.q_proj"}
    every = add_lora(tiny(n_layers=3), ["q_proj", "fc1"], r=2, alpha=4.0)
    assert set(lora_layers(every)) == {f"blocks.{i}.{n}" for i in range(3) for n in ("attn.q_proj", "mlp.fc1")}
    emb = add_lora(tiny(), ["tok_emb"], r=2, alpha=4.0)
    assert isinstance(emb.tok_emb, LoRAEmbedding) and sorted(emb.trainable_parameters()) == ["tok_emb.A", "tok_emb.B"]


def test_config_rebuilds_the_model():
    model = tiny(dtype=np.float32)
    cfg = model.config()
    assert cfg == {**TINY, "dtype": "float32"}
    assert json.loads(json.dumps(cfg)) == cfg
    again = LanguageModel(**cfg, rng=0)
    for name, p in model.parameters().items():
        np.testing.assert_array_equal(again.parameters()[name], p)
        assert again.parameters()[name].dtype == np.float32


def test_init_gpt2_embeddings_and_lora_np_linears():
    model = LanguageModel(50, d_model=64, n_heads=4, n_layers=1, d_hidden=128, context=64, rng=0)
    assert EMBEDDING_STD == 0.02
    for emb in (model.tok_emb, model.pos_emb):
        assert abs(emb.W.std() - 0.02) < 0.002
    assert abs(model.head.W.std() - 1 / 8) < 0.01                  # N(0, 1/d_in), d_in = 64
    assert np.all(model.head.b == 0)


# ---------------------------------------------------------------------------------------------
# forward and backward
# ---------------------------------------------------------------------------------------------


def test_forward_shapes_and_shorter_sequences():
    model = tiny()
    assert model(IDS).shape == (2, 5, 7)
    assert model(IDS[:, :2]).shape == (2, 2, 7)
    assert model.backward(np.ones((2, 2, 7))) is None            # ids have no gradient


@pytest.mark.parametrize("t", [0, 2, 3])
def test_logits_at_a_position_do_not_see_later_tokens(t):
    model = tiny()
    model.eval()
    changed = IDS.copy()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 7
    a, b = model(IDS), model(changed)
    np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1])
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def test_every_parameter_gradcheck():
    model = tiny()
    _randomize_norms(model, np.random.default_rng(3))           # biases and LayerNorms off their init
    rows = assert_lm_grads(model, IDS, expect_count=len(model.parameters()))
    assert {r.name for r in rows if r.structural_zero} == {"blocks.0.attn.k_proj.b", "blocks.1.attn.k_proj.b"}


def test_lora_on_every_linear_layer_and_the_token_embedding_gradcheck():
    model = lora_tiny()
    assert all(m.scale == 2.5 for m in lora_layers(model).values())
    rows = assert_lm_grads(model, IDS, expect_count=2 * (1 + 6 * 2 + 1))
    assert {"tok_emb.A", "tok_emb.B", "head.A", "head.B", "blocks.1.mlp.fc2.A"} <= {r.name for r in rows}


def test_pos_emb_gradient_sums_over_the_batch():
    """Two copies of one sequence give each position twice the gradient of one copy."""
    model = tiny()
    one = IDS[:1]
    model(one)
    dy = np.random.default_rng(0).standard_normal((1, 5, 7))
    model.backward(dy)
    g1 = model.gradients()["pos_emb.W"].copy()
    model.zero_grad()
    model(np.concatenate([one, one]))
    model.backward(np.concatenate([dy, dy]))
    np.testing.assert_allclose(model.gradients()["pos_emb.W"], 2 * g1, rtol=1e-12, atol=1e-14)


def test_a_validation_forward_does_not_change_what_backward_differentiates():
    model = tiny()
    dy = np.random.default_rng(0).standard_normal((2, 5, 7))
    model(IDS)
    model.backward(dy)
    want = {n: g.copy() for n, g in model.gradients().items()}
    model.zero_grad()
    model(IDS)
    with no_grad():
        model(IDS[::-1])
    model.eval()
    model(IDS[:, :3])
    model.train()
    model.backward(dy)
    for n, g in model.gradients().items():
        np.testing.assert_array_equal(g, want[n], err_msg=n)
    with pytest.raises(ValueError, match="already consumed"):
        model.backward(dy)


def test_float32_stays_float32_through_a_training_step():
    model = add_lora(tiny(dtype=np.float32), ["q_proj", "v_proj", "tok_emb"], r=2, alpha=4.0)
    model.unfreeze()
    opt = Adam(model, lr=1e-3)
    for _ in range(2):
        logits = model(IDS)
        assert logits.dtype == np.float32
        loss, dlogits = F.cross_entropy_loss(logits, IDS)
        opt.zero_grad()
        model.backward(dlogits)
        assert all(g.dtype == np.float32 for g in model.gradients().values())
        opt.step()
    assert all(p.dtype == np.float32 for p in model.parameters().values())


def test_training_lowers_the_loss():
    model = tiny()
    opt = Adam(model, lr=1e-2)
    x, y = IDS[:, :-1], IDS[:, 1:]
    losses = []
    for _ in range(30):
        loss, dl = F.cross_entropy_loss(model(x), y)
        opt.zero_grad()
        model.backward(dl)
        opt.step()
        losses.append(loss)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("idx, exc, pattern", [
    (IDS[0], ValueError, r"expects idx of shape \(batch, T\), got a 1-D array of shape \(5,\)"),
    (np.zeros((2, 6), dtype=int), ValueError, r"T must be in \[1, 5\] \(the context\), got T=6"),
    (np.zeros((2, 0), dtype=int), ValueError, "got T=0"),
    (IDS.astype(float), TypeError, "idx must be an integer array of ids, got dtype float64"),
    (IDS + 1, ValueError, r"ids must lie in \[0, 7\), got ids in \[1, 7\]"),
], ids=["1d", "too-long", "empty", "float", "out-of-range"])
def test_bad_ids_raise_and_leave_the_model_unchanged(idx, exc, pattern):
    model = tiny()
    y = model(IDS)
    snap = Snapshot(model)
    with pytest.raises(exc, match=pattern):
        model(idx)
    model.backward(np.ones_like(y))                  # the earlier forward survived (checked first)
    model.zero_grad()
    model(IDS)
    snap = Snapshot(model)
    with pytest.raises(exc, match=pattern):
        model(idx)
    snap.assert_unchanged()


@pytest.mark.parametrize("kwargs, exc, pattern", [
    ({"vocab_size": 0}, ValueError, "vocab_size must be >= 1"),
    ({"d_model": 9}, ValueError, "d_model must be divisible by n_heads, got d_model=9, n_heads=2"),
    ({"context": 2.5}, TypeError, "context must be an int"),
    ({"dtype": "int32"}, TypeError, "float32 or float64"),
], ids=["vocab-0", "heads", "context-float", "dtype"])
def test_bad_constructor_arguments_raise(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        tiny(**kwargs)


# ---------------------------------------------------------------------------------------------
# merge and generate
# ---------------------------------------------------------------------------------------------


def test_merged_and_unmerged_lora_give_the_same_logits_and_the_same_text():
    model = lora_tiny()
    tok = StubTokenizer()
    model.eval()
    logits = model(IDS)
    text = generate(model, tok, "abc", 40, rng=5)
    merge_lora(model)
    assert all(m.merged for m in lora_layers(model).values())
    assert isinstance(model.tok_emb, LoRAEmbedding) and model.tok_emb.merged
    np.testing.assert_allclose(model(IDS), logits, rtol=0, atol=1e-12)
    assert generate(model, tok, "abc", 40, rng=5) == text
    unmerge_lora(model)
    np.testing.assert_allclose(model(IDS), logits, rtol=0, atol=1e-12)


def test_generate_is_reproducible_and_keeps_the_prompt():
    model, tok = tiny(), StubTokenizer()
    a = generate(model, tok, "gab", 20, rng=3)
    assert a == generate(model, tok, "gab", 20, rng=np.random.default_rng(3))
    assert a.startswith("gab") and len(a) == 23 and set(a) <= set(tok.chars)
    assert generate(model, tok, "gab", 0) == "gab"
    texts = {generate(model, tok, "gab", 20, rng=s) for s in range(5)}
    assert len(texts) > 1                                          # sampling, not argmax


def test_generate_at_temperature_0_is_greedy():
    model, tok = tiny(), StubTokenizer()
    text = generate(model, tok, "ab", 6, temperature=0.0)
    ids = list(tok.encode("ab"))
    model.eval()
    for _ in range(6):
        ids.append(int(np.argmax(model(np.array([ids[-5:]]))[0, -1])))
    assert text == tok.decode(ids)
    assert generate(model, tok, "ab", 6, temperature=0.0, rng=99) == text     # no draw at all


def test_generate_feeds_only_the_last_context_tokens():
    model, tok = tiny(), StubTokenizer()
    long_prompt = "gfedcba" * 3                                    # longer than the context (5)
    text = generate(model, tok, long_prompt, 3, temperature=0.0)
    assert text[:len(long_prompt)] == long_prompt
    assert text[len(long_prompt):] == generate(model, tok, long_prompt[-5:], 3, temperature=0.0)[5:]


def test_generate_restores_the_modes_and_keeps_nothing_for_backward():
    model, tok = lora_tiny(), StubTokenizer()
    model.blocks[0].eval()                                         # a mixed state must come back as it was
    modes = {p: m.training for p, m in model.named_modules()}
    generate(model, tok, "ab", 5)
    assert {p: m.training for p, m in model.named_modules()} == modes
    assert all(m.__dict__["_cache"] is None for _, m in model.named_modules())


@pytest.mark.parametrize("args, kwargs, exc, pattern", [
    (("", 3), {}, ValueError, "prompt must be a non-empty string, got ''"),
    (("ab", -1), {}, ValueError, "n_chars must be >= 0"),
    (("ab", 3), {"temperature": -0.5}, ValueError, "temperature must be a finite number >= 0"),
    (("ab", 3), {"rng": "x"}, TypeError, "Generator, an int seed or None"),
], ids=["empty-prompt", "n<0", "temperature<0", "rng"])
def test_generate_bad_arguments_raise(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        generate(tiny(), StubTokenizer(), *args, **kwargs)


def test_generate_refuses_a_tokenizer_of_another_vocabulary():
    with pytest.raises(ValueError, match="the tokenizer has 5 ids, the model 7"):
        generate(tiny(), StubTokenizer("abcde"), "ab", 3)
    with pytest.raises(TypeError, match="model must be a LanguageModel, got Linear"):
        generate(lora_np.Linear(2, 2), StubTokenizer(), "ab", 3)


def test_lora_linear_targets_stay_linear():
    model = lora_tiny()
    assert isinstance(model.head, LoRALinear) and isinstance(model.blocks[1].attn.k_proj, LoRALinear)


def test_lora_model_skips_the_first_blocks_input_gradient_with_the_same_gradients():
    """Frozen embeddings read no gradient, so backward skips the first block's input gradient;
    every LoRA gradient equals the one of a backward that computes it."""
    rng = np.random.default_rng(12)
    model = LanguageModel(11, d_model=8, n_heads=2, n_layers=2, d_hidden=16, context=6, rng=rng)
    add_lora(model, ["q_proj", "v_proj", "fc1", "fc2"], r=2, alpha=3, rng=rng)
    for name, p in model.parameters().items():
        if name.endswith(".B"):
            p[...] = rng.standard_normal(p.shape)
    idx = rng.integers(0, 11, size=(3, 6))
    dlogits = rng.standard_normal((3, 6, 11))
    model.zero_grad()
    model(idx)
    assert model.backward(dlogits) is None
    got = {k: g.copy() for k, g in model.gradients().items()}
    model.zero_grad()
    model(idx)                               # the same backward by hand, with every input gradient
    dx = model.ln_f.backward(model.head.backward(dlogits))
    for block in reversed(list(model.blocks)):
        dx = block.backward(dx)
    assert dx.shape == (3, 6, 8)
    for name, g in model.gradients().items():
        assert np.array_equal(got[name], g) and np.any(g != 0), name
