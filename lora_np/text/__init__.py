"""Real text for lora_np: a GPT-style character language model (``model``) and, beside it, the
tokenizer, the corpora and checkpoints of the pretrained model.

``LanguageModel`` and ``generate`` are re-exported here.
"""

from .model import LanguageModel, generate

__all__ = ["LanguageModel", "generate"]
