"""Counting, not measuring: the arithmetic behind "10,000x fewer parameters" and a step's cost.

* ``params``    — parameters of one matrix (``lora_params``, ``full_params``), of a published
  Transformer (``MODEL_CONFIGS``, ``lora_param_count`` with the target names lora_np uses,
  ``q_proj`` … ``fc2``) and the paper's printed numbers next to the formula
  (``paper_comparison``);
* ``memory``    — bytes of checkpoints and of the training state (parameters, gradients,
  optimizer moments), as formulas and measured off a live model (``measured_*``); the whole of
  training memory by term and precision recipe (``training_memory``), and activations
  (Korthikanti et al. 2022's parts and formula, ``measured_activation_bytes``);
* ``step_cost`` — inference FLOPs of a linear and an unmerged LoRA layer; the FLOP model and byte
  model of one training step of the blocks that
  ``python -m lora_np.bench`` times (``mlp_step_flops``, ``attention_step_flops``,
  ``state_bytes_model``).

A leaf package: it imports only NumPy, the standard library and ``lora_np.validate``. Models
are handled by duck typing (``parameters()`` / ``trainable_parameters()`` / ``gradients()``
returning dicts of dotted name -> ndarray). Notation: lora_np/README.md.

Sources for the numbers
-----------------------
* Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685
  (Tables 2-5 and §4.2).
* Brown et al. 2020, "Language Models are Few-Shot Learners", arXiv:2005.14165, Table 2.1.
* Liu et al. 2019, "RoBERTa", arXiv:1907.11692 (architecture = BERT-base/large, Devlin et al. 2019).
* Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2), Table 2.
* Touvron et al. 2023, "Llama 2", arXiv:2307.09288 (7B: d_model 4096, 32 layers, 32 heads,
  SwiGLU MLP of width 11008, vocabulary 32000).
* Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  arXiv:2205.05198, §4.1 (activation bytes per layer).
"""

from .memory import *          # noqa: F401,F403
from .memory import __all__ as _memory_all
from .params import *          # noqa: F401,F403
from .params import __all__ as _params_all
from .step_cost import *       # noqa: F401,F403
from .step_cost import __all__ as _step_cost_all

__all__ = [*_params_all, *_memory_all, *_step_cost_all]
