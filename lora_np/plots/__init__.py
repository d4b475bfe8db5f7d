"""Every figure of lora_np: each function draws one figure from numbers the library computed,
returns the matplotlib ``Figure`` and, given ``path``, saves it there as a PNG.

Nothing here computes the math a notebook teaches; the figures only show it, and a formula a
figure needs (the Eckart–Young tail, subspace similarity, parameter and byte counts) is called
from ``lora_np.analysis``, ``lora_np.counting`` or ``lora_np.experiments``. Every public name is
importable from here, ``from lora_np.plots import plot_loss_vs_rank``. The modules, in the order
a reader meets them:

* ``style``       — ``TEACHING_STYLE`` and ``teaching_figure``, the one way every figure is made,
  laid out and saved (no pyplot; the same PNG bytes on every rerun);
* ``checks``      — argument checks only the figures need;
* ``sweep``       — the rank sweep (``lora_np.experiments``): loss vs rank, loss curves, spectra
  of ΔW, subspace similarity, parameter counts; ``save_figures`` (``python -m lora_np``);
* ``foundations`` — notebooks 01–03: images, Eckart–Young, counts, heat maps, spectra,
  finite-difference and gradient-check errors;
* ``finetuning``  — notebooks 04–05: the Eckart–Young floor vs trained LoRA, forgetting vs the
  leak of ΔW into the old task's inputs, the fixed-budget dot plot of Hu et al. Table 5;
* ``delta_w``     — notebook 06: intruder dimensions, a full-rank change where LoRA is not enough;
* ``variants``    — notebook 07 (``lora_np.variants``): rsLoRA, LoRA+, PiSSA, DoRA;
* ``quant``       — notebook 09 (``lora_np.quant``): the NF4 codes, bits vs error, the quantisation
  error's spectrum, LoftQ, QLoRA vs LoRA on the character model;
* ``deploy``      — notebook 10 (``lora_np.deploy``): merge/unmerge round trips, training memory by term;
* ``bench``       — the benchmark (``python -m lora_np.bench``);
* ``text``        — the real-text experiment (``python -m lora_np --task text``): loss vs rank,
  the learning–forgetting plane, ΔW spectra against a random matrix, subspace similarity.

The library below (analysis, experiments, counting, variants, …) never imports this package;
``lora_np.__main__`` and ``lora_np.bench`` do.
"""

from .bench import plot_bench
from .deploy import plot_round_trips, plot_training_memory
from .delta_w import plot_intruder_dimensions, plot_when_lora_is_not_enough
from .finetuning import plot_budget_bars, plot_forgetting_vs_leak, plot_rank_floor
from .foundations import (plot_eckart_young, plot_fd_error_vs_h, plot_gradcheck_errors, plot_heatmaps,
                          plot_images, plot_param_count_comparison, plot_scale_vs_rank,
                          plot_softmax_jacobian, plot_spectra)
from .quant import plot_bits_vs_error, plot_error_spectrum, plot_loftq, plot_nf4_codes, plot_qlora_vs_lora
from .style import TEACHING_STYLE
from .sweep import (FIGURE_NAMES, plot_delta_spectra, plot_loss_curves, plot_loss_vs_rank,
                    plot_param_counts, plot_subspace_similarity, save_figures)
from .text import (TEXT_FIGURE_NAMES, plot_learning_forgetting, plot_text_delta_spectra, plot_text_loss_vs_rank,
                   plot_text_subspace_similarity, save_text_figures)
from .variants import (LOSS_FLOOR, plot_dora, plot_dora_detached, plot_first_update_size, plot_loraplus,
                       plot_pissa, plot_rank_scaling, plot_weight_decomposition)

__all__ = ["TEACHING_STYLE", "FIGURE_NAMES", "LOSS_FLOOR", "save_figures",
           # rank sweep
           "plot_loss_vs_rank", "plot_loss_curves", "plot_delta_spectra", "plot_subspace_similarity",
           "plot_param_counts",
           # notebooks 01-03
           "plot_images", "plot_eckart_young", "plot_param_count_comparison", "plot_scale_vs_rank",
           "plot_heatmaps", "plot_softmax_jacobian", "plot_spectra", "plot_fd_error_vs_h",
           "plot_gradcheck_errors",
           # notebooks 04-05
           "plot_rank_floor", "plot_forgetting_vs_leak", "plot_budget_bars",
           # notebook 06
           "plot_intruder_dimensions", "plot_when_lora_is_not_enough",
           # notebook 07
           "plot_first_update_size", "plot_rank_scaling", "plot_loraplus", "plot_pissa", "plot_dora",
           "plot_dora_detached", "plot_weight_decomposition",
           # notebook 09
           "plot_nf4_codes", "plot_bits_vs_error", "plot_error_spectrum", "plot_loftq", "plot_qlora_vs_lora",
           # notebook 10
           "plot_round_trips", "plot_training_memory",
           # benchmark
           "plot_bench",
           # the real-text experiment
           "TEXT_FIGURE_NAMES", "save_text_figures", "plot_text_loss_vs_rank", "plot_learning_forgetting",
           "plot_text_delta_spectra", "plot_text_subspace_similarity"]
