"""Real text for lora_np: a GPT-style character language model, its tokenizer, the two
committed corpora and checkpoints of the pretrained model.

* ``model``      — ``LanguageModel`` (token + position embeddings, causal pre-LN blocks, final
  LayerNorm, linear head) and ``generate``
* ``tokenizer``  — ``CharTokenizer``
* ``corpus``     — the committed texts, splits by position, training windows, ``lm_loss``
* ``checkpoint`` — ``save_lm`` / ``load_lm``
"""

from .checkpoint import load_lm, save_lm
from .corpus import NATS_TO_BITS, Splits, corpus_tokenizer, lm_loss, load_splits, load_text, split_ids, windows
from .model import LanguageModel, generate
from .tokenizer import CharTokenizer

__all__ = ["LanguageModel", "generate", "CharTokenizer", "NATS_TO_BITS", "Splits", "load_text",
           "corpus_tokenizer", "split_ids", "load_splits", "windows", "lm_loss", "save_lm", "load_lm"]
