"""Per-modality encoders, chosen by name (`ENCODERS`), and audio front ends.

Every encoder maps its modality's input to tokens [B, N, D] (a pooled encoder
gives [B, 1, D]) and is called as `encoder(x, train=...)`.

  name               module                        input
  lenet              image.LeNet                   image or spectrogram [B, H, W(, C)]
  resnet             resnet.ResNet                 image [B, H, W(, C)]
  vit                vit.ViT                       image [B, H, W(, C)]
  patches            patches.PatchEncoder          image [B, H, W(, C)]
  ast                audio.AudioSpectrogramTransformer  spectrogram [B, F, T]
  frames             video.FrameEncoder            video [B, T, H, W(, C)]
  bert               text.BertEncoder              token ids [B, L]
  bag_of_embeddings  text.BagOfEmbeddings          token ids [B, L]
  text_transformer   text.TextTransformer          token ids [B, L]

`FRONTENDS` turn raw signals into encoder inputs: `logmel`, waveform [B, T]
-> log-mel spectrogram or MFCC [B, F, T']; `pixels`, image [B, H, W, C] in
[0, 1] -> normalised pixels (CLIP's statistics by default).
"""

from mmjax.models.encoders.audio import (AUDIO_FRONTENDS,
                                         AudioSpectrogramTransformer,
                                         LogMelSpectrogram)
from mmjax.models.encoders.image import LeNet, PixelNormalize
from mmjax.models.encoders.patches import PatchEncoder
from mmjax.models.encoders.resnet import ResNet
from mmjax.models.encoders.text import (BagOfEmbeddings, BertEncoder,
                                        TextTransformer)
from mmjax.models.encoders.video import FrameEncoder
from mmjax.models.encoders.vit import ViT

FRONTENDS = {**AUDIO_FRONTENDS, "pixels": PixelNormalize}

ENCODERS = {
    "lenet": LeNet,
    "resnet": ResNet,
    "vit": ViT,
    "patches": PatchEncoder,
    "ast": AudioSpectrogramTransformer,
    "frames": FrameEncoder,
    "bert": BertEncoder,
    "bag_of_embeddings": BagOfEmbeddings,
    "text_transformer": TextTransformer,
}

__all__ = ["ENCODERS", "FRONTENDS", "AudioSpectrogramTransformer",
           "BagOfEmbeddings", "BertEncoder", "FrameEncoder", "LeNet",
           "LogMelSpectrogram", "PatchEncoder", "PixelNormalize", "ResNet", "TextTransformer", "ViT"]
