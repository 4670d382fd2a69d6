"""Fusion modules, chosen by name from config (`FUSIONS`).

Every fusion takes per-modality encoder tokens and boolean masks:

  fusion(tokens: dict[str, [B, N_m, D_m]], masks: dict[str, [B]], train=...)

and returns a fused representation [B, D] that the model's head maps to logits.
A masked modality contributes nothing to the output. A fusion whose class sets
`returns_logits = True` (late, hybrid) combines per-modality predictions itself
and returns logits [B, num_classes]. A fusion whose class sets
`takes_inputs = True` (early) receives the modalities' low-level inputs
instead of encoder tokens.

Precision and memory: every fusion here declares the Flax fields `dtype`
(compute dtype, that of its output; default float32), `param_dtype` (the
dtype its parameters are stored in; default float32) and, where it has
transformer blocks (or an early-fusion encoder), `remat` (a
`mmjax.models.layers.REMAT_POLICIES` name; default "none"). Tokens arrive in
the model's compute dtype; a fusion computes its softmaxes and LayerNorm
statistics in float32 and may return its output in `dtype`, which the model
casts to float32 logits. The factory passes these fields only to a fusion
class that declares them, so a fusion from outside mmjax (an import string)
without them still works: flax layers with no `dtype` compute in the
promoted dtype of their inputs and float32 parameters.

  name             module                      paper
  image_only       basic.Unimodal              unimodal baseline
  audio_only       basic.Unimodal              unimodal baseline
  early            early.EarlyFusion           Baltrusaitis et al. 2019
  concat           basic.ConcatFusion          Baltrusaitis et al. 2019
  late             basic.LateFusion            Baltrusaitis et al. 2019
  weighted         basic.WeightedFusion        learned weighted sum
  hybrid           tensor.HybridFusion         Atrey et al. 2010
  tensor           tensor.TensorFusion         Zadeh et al. 2017 (TFN)
  low_rank_tensor  tensor.LowRankTensorFusion  Liu et al. 2018 (LMF)
  cross_attention  attention.CrossAttentionFusion
  coattention      attention.CoAttentionFusion  Lu et al. 2019 (ViLBERT)
  mult             attention.MulTFusion        Tsai et al. 2019 (MulT)
  perceiver        perceiver.PerceiverFusion   Alayrac et al. 2022 (Flamingo)
  bottleneck       bottleneck.BottleneckFusion  Nagrani et al. 2021 (MBT)
"""

import functools

from mmjax.models.fusion.attention import (CoAttentionFusion,
                                           CrossAttentionFusion, MulTFusion)
from mmjax.models.fusion.basic import (ConcatFusion, LateFusion, Unimodal,
                                       WeightedFusion)
from mmjax.models.fusion.bottleneck import BottleneckFusion
from mmjax.models.fusion.early import EarlyFusion
from mmjax.models.fusion.perceiver import (GatedCrossAttentionDense,
                                           PerceiverFusion, PerceiverResampler)
from mmjax.models.fusion.tensor import (HybridFusion, LowRankTensorFusion,
                                        TensorFusion)

FUSIONS = {
    "image_only": functools.partial(Unimodal, modality="image"),
    "audio_only": functools.partial(Unimodal, modality="audio"),
    "early": EarlyFusion,
    "concat": ConcatFusion,
    "late": LateFusion,
    "weighted": WeightedFusion,
    "hybrid": HybridFusion,
    "tensor": TensorFusion,
    "low_rank_tensor": LowRankTensorFusion,
    "cross_attention": CrossAttentionFusion,
    "coattention": CoAttentionFusion,
    "mult": MulTFusion,
    "perceiver": PerceiverFusion,
    "bottleneck": BottleneckFusion,
}

__all__ = ["FUSIONS", "BottleneckFusion", "CoAttentionFusion", "ConcatFusion",
           "CrossAttentionFusion", "EarlyFusion", "GatedCrossAttentionDense",
           "HybridFusion", "LateFusion", "LowRankTensorFusion", "MulTFusion",
           "PerceiverFusion", "PerceiverResampler", "TensorFusion", "Unimodal",
           "WeightedFusion"]
