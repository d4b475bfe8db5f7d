"""lora_np — LoRA (low-rank adaptation) from first principles in NumPy.

Every gradient is derived by hand (``lora_np.functional``), checked by finite differences
(``lora_np.gradcheck``) and taught in the notebooks. The architecture, the notation and the
forward/backward contract are in lora_np/README.md.
"""

from . import functional
from .lora import (DoRALinear, LoRAEmbedding, LoRALinear, add_lora, load_adapter, lora_layers, merge_lora,
                   randomize_lora, save_adapter, unmerge_lora)
from .modules import (MLP, Embedding, LayerNorm, Linear, Module, ModuleList, MultiHeadAttention,
                      TransformerBlock, no_grad)
from .optim import SGD, Adam, loraplus_multipliers

__version__ = "0.1.0"

__all__ = ["functional", "Module", "Linear", "Embedding", "ModuleList", "LayerNorm", "MLP",
           "MultiHeadAttention", "TransformerBlock", "no_grad", "LoRALinear", "DoRALinear",
           "LoRAEmbedding", "add_lora", "merge_lora",
           "unmerge_lora", "save_adapter", "load_adapter", "lora_layers", "randomize_lora", "SGD",
           "Adam", "loraplus_multipliers"]
