"""Fusion modules, chosen by name from config (`FUSIONS`).

Every fusion takes per-modality features and boolean masks:

  fusion(features: dict[str, [B, D_m]], masks: dict[str, [B]], train=...)

and returns a fused representation [B, D] that the model's head maps to logits.
A fusion whose class sets `returns_logits = True` (late fusion) combines
per-modality predictions itself and returns logits [B, num_classes]. A fusion
whose class sets `takes_inputs = True` (early fusion) receives the
modalities' low-level inputs instead of encoder features. A masked modality
contributes nothing to the output.
"""

import functools

from mmjax.models.fusion.basic import (ConcatFusion, LateFusion, Unimodal,
                                       WeightedFusion)
from mmjax.models.fusion.early import EarlyFusion

FUSIONS = {
    "image_only": functools.partial(Unimodal, modality="image"),
    "audio_only": functools.partial(Unimodal, modality="audio"),
    "early": EarlyFusion,
    "concat": ConcatFusion,
    "late": LateFusion,
    "weighted": WeightedFusion,
}

__all__ = ["FUSIONS", "ConcatFusion", "EarlyFusion", "LateFusion", "Unimodal",
           "WeightedFusion"]
