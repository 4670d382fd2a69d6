"""Per-modality encoders, chosen by name (`ENCODERS`), and audio front ends."""

from mmjax.models.encoders.audio import FRONTENDS, LogMelSpectrogram
from mmjax.models.encoders.image import LeNet

ENCODERS = {"lenet": LeNet}

__all__ = ["ENCODERS", "FRONTENDS", "LeNet", "LogMelSpectrogram"]
