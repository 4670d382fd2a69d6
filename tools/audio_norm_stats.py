"""The log-mel statistics that AST normalises its input with, per dataset.

  python tools/audio_norm_stats.py [--split train]

Runs the log-mel front end of `configs/avmnist.py:clean` (its LOGMEL) over
every waveform of `avmnist/clean`'s split and prints JSON: the mean and the standard
deviation of the log-mel dB values, the recipe of AST (Gong et al.,
Interspeech 2021; YuanGongND/ast `src/get_norm_stats.py`, which averages
per-batch means and standard deviations of the training features; here
batch means and stds over batches of 500, averaged the same way). The AST
config writes the result down as constants, as AST's recipes do.
"""

import argparse
import importlib.util
import json
import pathlib

import jax
import numpy as np

from mmjax import configs
from mmjax.data import pipeline
from mmjax.models.encoders import LogMelSpectrogram

REPO = pathlib.Path(__file__).resolve().parents[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--split", default="train")
  parser.add_argument("--batch", type=int, default=500)
  args = parser.parse_args()
  spec = importlib.util.spec_from_file_location("avmnist_config",
                                                REPO / "configs/avmnist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = configs.load_config(f"{REPO}/configs/avmnist.py:clean")
  source = pipeline.data_source(config, args.split)
  frontend = LogMelSpectrogram(**{k: v for k, v in module.LOGMEL.items()
                                  if k != "name"})
  apply = jax.jit(lambda w: frontend.apply({}, w))
  means, stds = [], []
  for start in range(0, len(source), args.batch):
    waves = np.stack([pipeline.fit_length(np.asarray(source[i]["audio"]),
                                          config.audio_length)
                      for i in range(start, min(start + args.batch,
                                                len(source)))])
    log_mel = np.asarray(apply(waves), np.float64)
    means.append(log_mel.mean())
    stds.append(log_mel.std(ddof=1))
  print(json.dumps({"dataset": config.dataset, "split": args.split,
                    "examples": len(source), "frontend": module.LOGMEL,
                    "mean": float(np.mean(means)),
                    "std": float(np.mean(stds))}))


if __name__ == "__main__":
  main()
