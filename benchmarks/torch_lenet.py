"""The AV-MNIST LeNet models in PyTorch, layer for layer as mmjax's
(`mmjax.models.encoders.LeNet`, concat fusion, MLP head with 100 hidden
units): the same parameter count (260,922 for concat), initialisation aside.

Input images and spectrograms come as uint8 [B, H, W] and are scaled by
1/255 inside the model, as mmjax does.
"""

import torch
from torch import nn


class LeNet(nn.Module):
  """5x5 then `extra_layers` 3x3 bias-free convolutions doubling the channels,
  each followed by BatchNorm (momentum 0.1 = flax's 0.9, eps 1e-5), ReLU and
  2x2 max pooling. [B, 1, H, W] -> [B, features * 2**extra_layers]."""

  def __init__(self, features: int = 6, extra_layers: int = 3):
    super().__init__()
    layers, channels = [], 1
    for i in range(extra_layers + 1):
      out, size = features * 2**i, 5 if i == 0 else 3
      layers += [nn.Conv2d(channels, out, size, padding=size // 2, bias=False),
                 nn.BatchNorm2d(out, momentum=0.1, eps=1e-5), nn.ReLU(),
                 nn.MaxPool2d(2)]
      channels = out
    self.layers = nn.Sequential(*layers)

  def forward(self, x):
    return self.layers(x).flatten(1)


class AvMnistClassifier(nn.Module):
  """Image and/or spectrogram LeNets, concatenated, then Dense(100)-ReLU-Dense(10)."""

  def __init__(self, modalities=("image", "audio")):
    super().__init__()
    self.modalities = tuple(modalities)
    self.encoders = nn.ModuleDict(
        {m: LeNet(6, 3 if m == "image" else 5) for m in self.modalities})
    width = sum(48 if m == "image" else 192 for m in self.modalities)
    self.head = nn.Sequential(nn.Linear(width, 100), nn.ReLU(),
                              nn.Linear(100, 10))

  def forward(self, batch):
    features = [self.encoders[m](batch[m].unsqueeze(1).float() / 255.0)
                for m in self.modalities]
    return self.head(torch.cat(features, dim=1))


class TorchStep:
  """One AdamW step (lr 1e-3, weight decay 1e-4) of cross-entropy on a fixed
  batch: zero_grad, forward, backward, update; `run()` per step."""

  def __init__(self, model: nn.Module, batch: dict, labels):
    self.model, self.batch, self.labels = model, batch, labels
    self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3,
                                       weight_decay=1e-4)
    self.num_params = sum(p.numel() for p in model.parameters())

  def run(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(self.model(self.batch), self.labels)
    loss.backward()
    self.optimizer.step()
