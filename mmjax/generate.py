"""Generates text with a trained generative model: `python -m mmjax.generate`.

  python -m mmjax.generate --config configs/X.py[:ARGS] --workdir DIR \
      [--split test] [--image FILE.png] [--audio FILE.wav] [--prompt TEXT] \
      [--num_examples N] [--config.KEY=VALUE ...]

Restores the run's result in DIR (the state `config.select_best` selected,
else the latest checkpoint; `mmjax.evaluate.restore_result`) and decodes with the config's
`generation` options (greedy, beam or sample; `--config.generation.method=
beam` changes them). Over a split (default: the config's first eval split)
it writes one JSON line per example to
DIR/generations/<split>_step<N>_<method>.jsonl: {"index", "prompt",
"generation", "references"}; with --image / --audio (and --prompt) it
decodes that one example, modalities not given being missing, and writes
DIR/generations/files_step<N>_<method>.jsonl. An existing file is never
overwritten (a numbered name is taken instead). Prints the first few
generations and the path. A missing or unreadable file, an image or audio
the model cannot take, or a prompt for a model without prompts is one
`error:` line and exit status 2.
"""

import json
import pathlib
import sys
from collections.abc import Sequence

import jax
import numpy as np

from mmjax import cli, evaluate, experiment, objectives, parallel
from mmjax.data import pipeline
from mmjax.data.builders._common import FSDD_RATE  # mmjax's audio: 8 kHz
from mmjax.errors import UsageError
from mmjax.evaluators.classification import _host

GENERATE = cli.Program(
    "generate", "usage: python -m mmjax.generate --config configs/X.py[:ARGS] "
    "--workdir DIR [--split SPLIT] [--image FILE.png] [--audio FILE.wav] "
    "[--prompt TEXT] [--num_examples N] [--config.KEY=VALUE ...]",
    {**cli.RUN_FLAGS,
     "--split": "the split to generate for (default: the first eval split)",
     "--image": "an image file (PNG, JPEG) to caption or ask about",
     "--audio": "a WAV file at the dataset's sample rate",
     "--prompt": "the prompt (e.g. a question) for --image / --audio",
     "--num_examples": "generate for the first N examples of the split",
     "--print": "how many generations to print (default 5)"})


def _texts(tokenizer, ids) -> list[str]:
  return tokenizer.decode(np.asarray(ids).reshape(-1, np.shape(ids)[-1]))


def read_image(path: str, shape: Sequence[int]) -> np.ndarray:
  """`path` as uint8 `shape` [H, W, C] (resized bicubic, grey or RGB)."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  try:
    image = Image.open(path)
    image.load()
  except (OSError, UnidentifiedImageError) as e:
    raise UsageError(f"--image {path}: cannot read it as an image "
                     f"({cli_reason(e)})") from None
  height, width, channels = shape
  image = image.convert("L" if channels == 1 else "RGB").resize(
      (width, height), Image.Resampling.BICUBIC)
  return np.asarray(image, np.uint8).reshape(shape)


def read_audio(path: str, shape: Sequence[int], dtype,
               sample_rate: int) -> np.ndarray:
  """`path`, a mono waveform at `sample_rate`, cut or zero-padded to
  `shape` [T] in `dtype` (int16 samples or float)."""
  import soundfile  # pylint: disable=import-outside-toplevel
  if len(shape) != 1:
    raise UsageError(f"--audio {path}: this model reads audio of shape "
                     f"{tuple(shape)}, not a waveform")
  try:
    wave, rate = soundfile.read(path, dtype=np.dtype(dtype).name
                                if np.dtype(dtype) == np.int16 else "float32")
  except (OSError, RuntimeError, soundfile.LibsndfileError) as e:
    raise UsageError(f"--audio {path}: cannot read it as audio "
                     f"({cli_reason(e)})") from None
  if rate != sample_rate:
    raise UsageError(f"--audio {path}: sample rate {rate} Hz, the model's "
                     f"data is {sample_rate} Hz")
  if wave.ndim > 1:
    wave = wave.mean(axis=1).astype(wave.dtype)
  return pipeline.fit_length(wave, shape[0]).astype(dtype)


def cli_reason(e: Exception) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def file_batch(config, spec: dict, options: dict, tokenizer) -> dict:
  """The batch of the one example given by --image / --audio / --prompt."""
  example = {}
  for m in config.modalities:
    shape, dtype = spec[m].shape[1:], spec[m].dtype
    path = options.get(m)
    if path is None:
      example[m], example[f"mask/{m}"] = np.zeros(shape, dtype), False
      continue
    if not pathlib.Path(path).is_file():
      raise UsageError(f"--{m} {path}: no such file")
    if m == "image":
      example[m] = read_image(path, shape)
    elif m == "audio":
      example[m] = read_audio(path, shape, dtype, FSDD_RATE)
    else:
      raise UsageError(f"--{m} is not a modality this command reads")
    example[f"mask/{m}"] = True
  unknown = [m for m in ("image", "audio") if options.get(m)
             and m not in config.modalities]
  if unknown:
    raise UsageError(f"--{unknown[0]}: this model reads "
                     f"{', '.join(config.modalities) or 'no media'}")
  if "prompt" in spec:
    example["prompt"] = tokenizer([options.get("prompt", "")])[0][0]
  elif options.get("prompt"):
    raise UsageError("--prompt: this model was not trained with prompts")
  return {k: np.asarray(v)[None] for k, v in example.items()}


def _fresh_path(directory: pathlib.Path, stem: str) -> pathlib.Path:
  """directory/stem.jsonl, or stem_2.jsonl, ... if it exists."""
  directory.mkdir(parents=True, exist_ok=True)
  path, n = directory / f"{stem}.jsonl", 1
  while path.exists():
    n += 1
    path = directory / f"{stem}_{n}.jsonl"
  return path


def generate(config, workdir: str, options: dict) -> tuple[pathlib.Path,
                                                           list[dict]]:
  """Restores the run in `workdir` and generates (module docstring).
  Returns (the JSONL file written, its rows)."""
  if config.objective not in objectives.GENERATIVE:
    raise UsageError(f"config key 'objective': {config.objective} models do "
                     f"not generate text ({', '.join(objectives.GENERATIVE)} "
                     "do)")
  run, state = evaluate.restore_result(config, workdir)
  tokenizer = pipeline.text_tokenizer(config)
  method = experiment.generation_options(config, tokenizer).get(
      "method", "greedy")
  step = int(state.step)
  rows = []
  if any(options.get(k) for k in ("image", "audio", "prompt")):
    spec = experiment.example_batch_spec(run.data_source(
        config.eval_splits[0]), config, 1)
    batch = file_batch(config, spec, options, tokenizer)
    size = run.mesh.size  # one example, repeated over the mesh
    batch = {k: np.repeat(v, size, 0) for k, v in batch.items()}
    tokens = _host(run.predict(state, parallel.put_batch(
        batch, parallel.batch_sharding(run.mesh)))["tokens"])
    rows.append({"index": 0, "inputs": {m: options[m] for m in
                                        ("image", "audio") if options.get(m)},
                 "prompt": options.get("prompt", ""),
                 "generation": _texts(tokenizer, tokens[:1])[0]})
    stem = f"files_step{step}_{method}"
  else:
    split = options.get("split") or config.eval_splits[0]
    if options.get("num_examples"):
      split = f"{split.partition('[')[0]}[:{int(options['num_examples'])}]"
    for batch in run.eval_batches(run.data_source(split)):
      tokens = _host(run.predict(state, batch)["tokens"])  # every process's
      host = jax.tree.map(_host, batch)
      generations = _texts(tokenizer, tokens)
      for i in np.flatnonzero(host["valid"]):
        references = host["text"][i]
        valid = host.get("valid/text")
        references = (references[valid[i]] if valid is not None
                      else references[None])
        rows.append({
            "index": len(rows),
            "prompt": (_texts(tokenizer, host["prompt"][i:i + 1])[0]
                       if "prompt" in host else ""),
            "generation": generations[i],
            "references": _texts(tokenizer, references)})
    stem = f"{split.partition('[')[0]}_step{step}_{method}"
  path = _fresh_path(pathlib.Path(workdir) / "generations", stem)
  if jax.process_index() == 0:
    with open(path, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return path, rows


def main(argv: Sequence[str] | None = None) -> int:
  def run(args):
    config, options = cli.parse_config_and_flags(args, GENERATE)
    if options.get("num_examples"):
      try:
        if int(options["num_examples"]) <= 0:
          raise ValueError
      except ValueError:
        raise UsageError(f"--num_examples takes a positive integer, got "
                         f"{options['num_examples']!r}") from None
    path, rows = generate(config, options["workdir"], options)
    if jax.process_index():  # process 0 writes and prints for all
      return
    for row in rows[:int(options.get("print") or 5)]:
      shown = {k: row[k] for k in ("index", "prompt", "generation",
                                   "references") if row.get(k)}
      print(json.dumps(shown))
    print(f"wrote {len(rows)} generations to {path}")

  return cli.main(run, GENERATE, argv)


if __name__ == "__main__":
  sys.exit(main())
