"""A GPT-style character language model built from lora_np's modules, and sampling from it.

``LanguageModel`` (Radford et al. 2019's GPT-2 layout, at toy size)::

    x₀ = tok_emb(idx) + pos_emb(0 … T−1)            (B, T, d_model)
    x_l = blocks.l(x_{l−1})    l = 0 … n_layers−1     causal pre-LN TransformerBlocks
    logits = head(ln_f(x_L))                          (B, T, vocab_size)

Position t's logits predict token t+1 and, through the causal mask, depend only on tokens
0 … t, so one forward scores every position of every sequence (cross-entropy over all
(batch, position) pairs). Children are named ``tok_emb``, ``pos_emb``, ``blocks.0`` …
``blocks.{n−1}`` (each with ``ln1``, ``attn.q_proj`` … ``attn.o_proj``, ``ln2``, ``mlp.fc1``,
``mlp.fc2``), ``ln_f`` and ``head``, so ``add_lora(model, ["q_proj", "v_proj"], ...)`` adapts
every block and ``"blocks.1.attn.q_proj"`` one layer.

``generate(model, tokenizer, prompt, n_chars, temperature, rng)`` samples a continuation.
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from ..modules import Embedding, LayerNorm, Linear, Module, ModuleList, TransformerBlock, make_rng, no_grad
from ..validate import check_dtype, check_int, check_number

__all__ = ["LanguageModel", "generate", "EMBEDDING_STD"]

#: std of the token and position embeddings' N(0, std²) init (GPT-2's 0.02; see LanguageModel)
EMBEDDING_STD = 0.02


class LanguageModel(Module):
    """Decoder-only transformer over integer token ids.

    Parameters
    ----------
    vocab_size : int    number of token ids V (ids lie in [0, V))
    d_model : int       residual width (divisible by n_heads)
    n_heads : int       attention heads per block
    n_layers : int      number of causal ``TransformerBlock``s
    d_hidden : int      MLP hidden width (4 · d_model in GPT-2)
    context : int       longest sequence T the position table covers
    rng, dtype          as everywhere in lora_np (float32 or float64)

    Shapes: ``forward(idx)`` with idx (B, T) integers, 1 ≤ T ≤ context -> logits (B, T, V);
    ``backward(dlogits)`` with dlogits (B, T, V) -> None (token ids have no gradient).

    Backward, with ``G = dL/dx₀`` (B, T, d) from the first block::

        dW_tok[v] = Σ_{(b,t) : idx[b,t] = v} G[b, t]     (a scatter-add: see Embedding)
        dW_pos[t] = Σ_b G[b, t]                           (position t is looked up once per sequence)

    Init: every ``Linear`` (q, k, v, o, fc1, fc2, head) ``N(0, 1/d_in)`` with zero bias, as
    everywhere in lora_np; LayerNorms γ = 1, β = 0; both embedding tables
    ``N(0, EMBEDDING_STD²)`` = GPT-2's N(0, 0.02²). Small embeddings are harmless in a pre-LN
    model — every block reads its input through a LayerNorm, which rescales it — and they
    keep the residual stream at init dominated by the blocks' O(1) outputs rather than by a
    random unit-scale table, which trained faster than N(0, 1) tables in our runs.
    """

    takes_token_ids = True

    def __init__(self, vocab_size, d_model=96, n_heads=4, n_layers=3, d_hidden=384, context=64,
                 rng=None, dtype=np.float64):
        super().__init__()
        self.vocab_size = check_int("vocab_size", vocab_size, minimum=1)
        self.d_model = check_int("d_model", d_model, minimum=1)
        self.n_heads = check_int("n_heads", n_heads, minimum=1)
        self.n_layers = check_int("n_layers", n_layers, minimum=1)
        self.d_hidden = check_int("d_hidden", d_hidden, minimum=1)
        self.context = check_int("context", context, minimum=1)
        self.dtype = check_dtype("dtype", dtype)
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model}, "
                             f"n_heads={n_heads}")
        rng = make_rng(rng)
        self.tok_emb = Embedding(vocab_size, d_model, rng=rng, dtype=dtype, std=EMBEDDING_STD)
        self.pos_emb = Embedding(context, d_model, rng=rng, dtype=dtype, std=EMBEDDING_STD)
        self.blocks = ModuleList([TransformerBlock(d_model, n_heads, d_hidden, causal=True, rng=rng,
                                                   dtype=dtype) for _ in range(n_layers)])
        self.ln_f = LayerNorm(d_model, dtype=dtype)
        self.head = Linear(d_model, vocab_size, rng=rng, dtype=dtype)

    def config(self) -> dict:
        """The constructor's arguments (but rng) as a JSON-able dict: ``LanguageModel(**config)``
        builds a model of the same shape and dtype."""
        return {"vocab_size": self.vocab_size, "d_model": self.d_model, "n_heads": self.n_heads,
                "n_layers": self.n_layers, "d_hidden": self.d_hidden, "context": self.context,
                "dtype": self.dtype.name}

    def _check_idx(self, idx):
        if not isinstance(idx, np.ndarray):
            idx = np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"LanguageModel expects idx of shape (batch, T), got a {idx.ndim}-D "
                             f"array of shape {idx.shape}")
        if not 1 <= idx.shape[1] <= self.context:
            raise ValueError(f"LanguageModel: sequence length T must be in [1, {self.context}] "
                             f"(the context), got T={idx.shape[1]}")
        return idx

    def forward(self, idx):
        idx = self._check_idx(idx)
        T = idx.shape[1]
        x = self.tok_emb(idx)                          # (B, T, d); the ids are checked here
        x = x + self.pos_emb(np.arange(T))             # (T, d) broadcast over the batch
        for block in self.blocks:
            x = block(x)                               # (B, T, d)
        return self.head(self.ln_f(x))                 # (B, T, V); nothing of its own to _store

    def backward(self, dout):
        _, dout = self._check_backward(dout)
        dx = self.ln_f.backward(self.head.backward(dout))   # (B, T, d)
        blocks = list(self.blocks)
        for block in reversed(blocks[1:]):
            dx = block.backward(dx)
        if not (self.tok_emb._has_trainable() or self.pos_emb._has_trainable()):
            # frozen embeddings (LoRA on the blocks): nobody reads the first block's input
            # gradient, so it is not computed, and the lookups' forwards are just released
            blocks[0].backward(dx, need_input_grad=False)
            self.pos_emb._release()
            self.tok_emb._release()
            return None
        dx = blocks[0].backward(dx)
        self.pos_emb.backward(dx.sum(axis=0))          # (T, d): Σ over the batch, see docstring
        self.tok_emb.backward(dx)
        return None

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self.config().items())


def generate(model: LanguageModel, tokenizer, prompt: str, n_chars: int, temperature: float = 1.0,
             rng=None) -> str:
    """``prompt`` followed by ``n_chars`` tokens sampled one at a time from ``model``.

    At each step the last ``model.context`` ids are fed (eval mode, inside ``no_grad()``; the
    modules' modes are restored afterwards) and the next id is drawn from the last position's
    ``softmax(logits / temperature)`` by inverting its CDF at one ``rng.random()`` draw;
    ``temperature=0`` takes the argmax instead (greedy, no draw). The same model, prompt and
    rng give the same text; so do a merged and an unmerged LoRA model, whose logits differ
    only by round-off.

    ``tokenizer`` is anything with ``encode(str) -> int array`` and ``decode(ids) -> str``
    (e.g. ``lora_np.text.CharTokenizer``). ``rng``: a Generator or an int seed (None: seed 0).
    """
    if not isinstance(model, LanguageModel):
        raise TypeError(f"generate: model must be a LanguageModel, got {type(model).__name__}")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"generate: prompt must be a non-empty string, got {prompt!r}")
    n_chars = check_int("n_chars", n_chars, minimum=0)
    temperature = check_number("temperature", temperature, nonnegative=True)
    vocab = getattr(tokenizer, "vocab_size", model.vocab_size)
    if vocab != model.vocab_size:
        raise ValueError(f"generate: the tokenizer has {vocab} ids, the model {model.vocab_size}")
    rng = make_rng(rng)
    ids = [int(i) for i in np.asarray(tokenizer.encode(prompt)).reshape(-1)]
    modes = [(m, m.training) for _, m in model.named_modules()]
    model.eval()
    try:
        with no_grad():
            for _ in range(n_chars):
                context = np.array(ids[-model.context:], dtype=np.int64)[None]   # (1, T)
                logits = np.asarray(model(context)[0, -1], dtype=np.float64)   # (V,)
                ids.append(_sample(logits, temperature, rng))
    finally:
        for m, mode in modes:
            m.training = mode
    return prompt + tokenizer.decode(np.array(ids[-n_chars:] if n_chars else [], dtype=np.int64))


def _sample(logits, temperature, rng) -> int:
    """One id from ``softmax(logits / temperature)`` (the argmax at temperature 0)."""
    if temperature == 0:
        return int(np.argmax(logits))
    p, _ = F.softmax_forward(logits / temperature)
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(p) - 1))
