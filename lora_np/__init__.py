"""lora_np — LoRA (low-rank adaptation) from first principles in NumPy.

Every gradient is derived by hand (``lora_np.functional``), checked by finite differences
(``lora_np.gradcheck``) and taught in the notebooks. See README.md and DESIGN.md.
"""

from . import functional
from .lora import (DoRALinear, LoRALinear, add_lora, load_adapter, lora_layers, merge_lora, save_adapter,
                   unmerge_lora)
from .modules import MLP, LayerNorm, Linear, Module, MultiHeadAttention, TransformerBlock
from .optim import SGD, Adam, loraplus_multipliers

__version__ = "0.1.0"

__all__ = ["functional", "Module", "Linear", "LayerNorm", "MLP", "MultiHeadAttention",
           "TransformerBlock", "LoRALinear", "DoRALinear", "add_lora", "merge_lora", "unmerge_lora",
           "save_adapter", "load_adapter", "lora_layers", "SGD", "Adam", "loraplus_multipliers"]
