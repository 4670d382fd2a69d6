"""grain input pipeline: tfds source -> shuffle -> preprocess -> batch -> mesh.

Training batches come from a seeded shuffle that is redrawn every epoch
(`MapDataset.shuffle` then `repeat`: grain reseeds each epoch), preprocessed
in parallel workers, batched per process, and placed on the mesh sharded along
the batch axis. The iterator's position is `get_state()` / `set_state()`, a
small JSON-able dict saved in every checkpoint.

Every example leaves the pipeline as `{modality: array, "mask/<modality>":
bool, "label": int32}`, plus the token fields of generative models ("text",
"prompt") and a question family ("family") where the record has them; a
waveform is padded or cut to `audio_length` so that
shapes are static under jit. A modality the record lacks is left out (e.g.
"text" on a labelled eval split that zero-shot classifies from prompts), as
is a missing label. With `config.text.templates`, training examples get
"text": a prompt made from a random template and the example's class name,
tokenised (`PromptText`).
"""

import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from mmjax import parallel
from mmjax.data import builders, webdataset
from mmjax.data.tokenizer import ByteTokenizer
from mmjax.errors import UsageError

# Batches read ahead of the train step. grain's default (500 elements, here
# batches) spends the run's first 10-20 s of CPU filling the buffer, which
# slowed the AV-MNIST step from 470 to 870 ms while it lasted
# (benchmarks/input_pipeline.py); a few batches keep the step fed.
TRAIN_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)


@dataclasses.dataclass(frozen=True)
class Preprocess(grain.transforms.Map):
  """One tfds record -> one model example (see module docstring)."""
  modalities: Sequence[str]
  audio_length: int = 0

  def map(self, record):
    example = {}
    for m in self.modalities:
      if m not in record:
        continue
      x = np.asarray(record[m])
      if m == "audio" and x.ndim == 1 and self.audio_length:  # a waveform
        x = fit_length(x, self.audio_length)
      example[m] = x
      example[f"mask/{m}"] = np.bool_(True)
    if "label" in record:
      example["label"] = np.int32(record["label"])
    for key in KEPT_FIELDS:  # tokenised targets, prompts, question families
      if key not in example and key in record and np.issubdtype(
          np.asarray(record[key]).dtype, np.number):
        value = np.asarray(record[key])
        example[key] = value.astype(np.int32) if value.dtype == np.int64 else (
            value)  # as jax holds integers
    if "valid/text" in record:
      example["valid/text"] = record["valid/text"]
    return example


# Numeric record fields that leave the pipeline even when they are not a
# modality: a generative model's target and prompt token ids, a question's
# family (`TokenizeFields`, `mmjax.models.generative`).
KEPT_FIELDS = ("text", "prompt", "family")


@dataclasses.dataclass(frozen=True)
class ResizeImage(grain.transforms.Map):
  """"image" [H, W, C] uint8 of any size -> [size, size, C] uint8.

  The shorter side is resized to `size` (bicubic, with Pillow), then the
  centre square is cut, as CLIP's preprocessing does at evaluation. For
  datasets whose images vary in size (COCO); batching needs one shape.
  """
  size: int

  def map(self, record):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    image = np.asarray(record["image"])
    h, w = image.shape[:2]
    scale = self.size / min(h, w)
    new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
    resized = resized[top:top + self.size, left:left + self.size]
    return {**record, "image": resized.reshape(self.size, self.size, -1)}


@dataclasses.dataclass(frozen=True)
class PromptText(grain.transforms.RandomMap):
  """Adds "text" [max_length] int32: a random template filled with the class.

  The text side of LiT-style training on a labelled dataset: for an example
  with label k, one of `templates` (e.g. "a photo of the digit {}.") is drawn
  and formatted with `class_names[k]`, then tokenised by `tokenizer`
  (a callable: list of strings -> (ids [N, L], mask [N, L])).
  """
  tokenizer: Callable
  class_names: Sequence[str]
  templates: Sequence[str]

  def random_map(self, record, rng: np.random.Generator):
    template = self.templates[rng.integers(len(self.templates))]
    ids, _ = self.tokenizer([template.format(
        self.class_names[int(record["label"])])])
    return {**record, "text": ids[0]}


@dataclasses.dataclass(frozen=True)
class CaptionText(grain.transforms.RandomMap):
  """Training: "text" [max_length] int32, one of the record's captions.

  Each visit of an image draws one of its `key` captions (e.g. COCO's five),
  tokenised by `tokenizer`, as in CLIP and ALIGN training on caption data.
  """
  tokenizer: Callable
  key: str = "captions"

  def random_map(self, record, rng: np.random.Generator):
    captions = _strings(field(record, self.key))
    ids, _ = self.tokenizer([captions[rng.integers(len(captions))]])
    return {**record, "text": ids[0]}


@dataclasses.dataclass(frozen=True)
class AllCaptions(grain.transforms.Map):
  """Evaluation: "text" [C, max_length] int32 and "valid/text" [C] bool.

  Every caption of the record (`key`), so that retrieval scores an image
  against all of them; C is fixed by `num_captions` (extra captions are cut,
  missing ones are padding with "valid/text" False).
  """
  tokenizer: Callable
  num_captions: int
  key: str = "captions"

  def map(self, record):
    captions = _strings(field(record, self.key))[:self.num_captions]
    ids, _ = self.tokenizer(captions)
    text = np.zeros((self.num_captions, ids.shape[1]), np.int32)
    text[:len(captions)] = ids
    valid = np.arange(self.num_captions) < len(captions)
    return {**record, "text": text, "valid/text": valid}


@dataclasses.dataclass(frozen=True)
class TokenizeFields(grain.transforms.Map):
  """Text fields tokenised into batch keys: `fields` maps a record field to
  the key of its ids int32 [max_length] (e.g. {"question": "prompt",
  "answer": "text"} for question answering with a generative model, or
  {"question": "text"} for a classifier reading the question as its text
  modality); `lengths` ({key: L}) makes a key's ids shorter (`shorten`),
  e.g. short answers after long questions."""
  tokenizer: Callable
  fields: tuple[tuple[str, str], ...]
  lengths: tuple[tuple[str, int], ...] = ()

  def map(self, record):
    out = dict(record)
    lengths = dict(self.lengths)
    for source, key in self.fields:
      ids = self.tokenizer(_strings(field(record, source))[:1])[0][0]
      out[key] = shorten(ids, lengths[key], self.tokenizer.eos_id) if (
          key in lengths) else ids
    return out


def shorten(ids: np.ndarray, length: int, eos_id: int) -> np.ndarray:
  """Token ids [L] cut to [length], still ending in `eos_id` if they were
  cut inside the text (padding is id 0)."""
  ids = np.array(ids[:length])
  if ids[-1] not in (0, eos_id):
    ids[-1] = eos_id
  return ids


def field(record, key: str):
  """record[key], where "a/b" also reads a nested record["a"]["b"] (tfds
  Sequence features such as coco_captions' "captions/text")."""
  if key in record:
    return record[key]
  parent, _, child = key.partition("/")
  if child and isinstance(record.get(parent), dict):
    return field(record[parent], child)
  raise KeyError(f"record has no field '{key}' (fields: {', '.join(record)})")


def _strings(values) -> list[str]:
  return [v.decode() if isinstance(v, bytes) else str(v)
          for v in np.asarray(values).reshape(-1)]


def text_tokenizer(config):
  """The tokenizer named by `config.text.tokenizer`: "minilm" (WordPiece of
  all-MiniLM-L6-v2), "bytes" (UTF-8 bytes, `ByteTokenizer`), "clip:DIR"
  (the CLIP BPE of a checkpoint directory's tokenizer.json,
  `clip_tokenizer`) or "siglip:PATH" (the SentencePiece model of a SigLIP
  checkpoint directory's spiece.model, or a .model file, as Hugging Face's
  SiglipTokenizer; `siglip_tokenizer`), "gpt2:DIR" (a GPT-2 checkpoint
  directory's tokenizer.json, ids moved up by one for padding id 0;
  `gpt2_tokenizer`) or "llama:DIR" (a Llama checkpoint's, likewise, between
  its start and end tokens; `llama_tokenizer`)."""
  # pylint: disable-next=import-outside-toplevel
  from mmjax.data.tokenizer import (clip_tokenizer, gpt2_tokenizer,
                                    llama_tokenizer, minilm_tokenizer,
                                    siglip_tokenizer)
  name, length = config.text.tokenizer, config.text.max_length
  if name == "bytes":
    return ByteTokenizer(length)
  for prefix, make in (("clip:", clip_tokenizer),
                       ("siglip:", siglip_tokenizer),
                       ("gpt2:", gpt2_tokenizer),
                       ("llama:", llama_tokenizer)):
    if name.startswith(prefix):
      try:
        return make(name[len(prefix):], length)
      except (ImportError, OSError, ValueError) as e:
        raise UsageError(f"config key 'text.tokenizer': {e}") from e
  if name != "minilm":
    raise UsageError(f"unknown text.tokenizer '{name}' (known: minilm, "
                     "bytes, clip:DIR, siglip:PATH, gpt2:DIR, llama:DIR)")
  return minilm_tokenizer(length)


def fit_length(waveform: np.ndarray, length: int) -> np.ndarray:
  """Zero-pads at the end or cuts the end so that the result has `length`."""
  if waveform.shape[0] >= length:
    return waveform[:length]
  return np.pad(waveform, (0, length - waveform.shape[0]))


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR",
                        str(pathlib.Path.home() / "tensorflow_datasets"))


def data_source(config, split: str):
  """The random-access tfds source of `config.dataset`'s `split`.

  `split` may be sliced the tfds way: "val[:500]", "train[10%:]".

  A name from `builders.BUILDERS` is built from the repo's data/ when needed.
  "tfds:NAME/CONFIG:VERSION" is a dataset from tfds's own catalogue, already
  prepared in array_record format under `data_dir`. Naming the version makes
  tfds read the prepared files (dataset_info.json, features.json) instead of
  running the dataset's builder code, which for many catalogue datasets
  imports TensorFlow. "wds:PATTERN" is webdataset tar shards, "{split}" in
  the pattern naming the split (`mmjax.data.webdataset`).
  """
  if config.dataset.startswith(webdataset.PREFIX):
    return webdataset.data_source(config.dataset, split)
  data_dir = config.data_dir or default_data_dir()
  if config.dataset.startswith("tfds:"):
    return _tfds_catalogue_source(config.dataset[len("tfds:"):], split,
                                  data_dir)
  builder = builders.get_builder(config.dataset, data_dir=data_dir,
                                 source_dir=config.source_dir or None)
  if split.partition("[")[0] not in builder.info.splits:
    raise UsageError(f"dataset {config.dataset} has no split '{split}' "
                     f"(known: {', '.join(builder.info.splits)})")
  return builder.as_data_source(split=split)


def _tfds_catalogue_source(name: str, split: str, data_dir: str):
  """`split` of tfds catalogue dataset `name`, prepared under `data_dir`."""
  def not_prepared(e: Exception) -> UsageError:
    reason = (str(e).strip() or repr(e)).splitlines()[-1]
    return UsageError(
        f"config key 'dataset': {name} is not prepared in {data_dir} "
        f"({reason}); prepare it where it can be downloaded with `tfds build "
        f"{name.partition(':')[0].partition('/')[0]} --file_format="
        "array_record` and copy it there")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise not_prepared(e) from e
  if split.partition("[")[0] not in builder.info.splits:
    raise UsageError(f"dataset tfds:{name} has no split '{split}' "
                     f"(known: {', '.join(builder.info.splits)})")
  try:
    return builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    raise not_prepared(e) from e


def train_transforms(ds: grain.MapDataset, config) -> grain.MapDataset:
  """The per-example training transforms: optional image resizing, prompt
  or caption text, then Preprocess."""
  if config.get("image_size"):
    ds = ds.map(ResizeImage(config.image_size))
  if config.get("text") and config.text.get("templates"):
    ds = ds.random_map(PromptText(text_tokenizer(config),
                                  tuple(config.text.class_names),
                                  tuple(config.text.templates)))
  if config.get("text") and config.text.get("captions_key"):
    ds = ds.random_map(CaptionText(text_tokenizer(config),
                                   config.text.captions_key))
  return _text_fields(ds, config).map(
      Preprocess(tuple(config.modalities), config.audio_length))


def _text_fields(ds: grain.MapDataset, config) -> grain.MapDataset:
  """`ds` with `config.text.fields` ({record field: batch key}) tokenised."""
  if not (config.get("text") and config.text.get("fields")):
    return ds
  return ds.map(TokenizeFields(
      text_tokenizer(config), tuple(config.text.fields.items()),
      tuple((config.text.get("lengths") or {}).items())))


class TrainIterator:
  """Endless sharded training batches with a checkpointable position.

  Global batches do not depend on the number of processes, so a run on 2
  hosts trains on the same batches, in the same order, as on 1, and may
  resume with another process count. Process i of n holds rows
  [i*b, (i+1)*b) of each global batch (b = batch_size / n), which
  `put_batch` places on its devices:
  - a random-access source is shuffled whole with the same seed on every
    process and cut into global batches of `config.batch_size`;
  - a source of shards (`shard_groups`: webdataset) is read as G groups of
    shards (`shard_group_count`), each shuffled with its own seed; global
    batch k is the k-th batch of batch_size / G of every group, in group
    order, so process i reads only its G/n groups' shards.

  `get_state()` is {"iterator": grain's state, "process_count": n}: the
  same on every process (the count of global batches read), so process 0
  saves it for all.
  """

  def __init__(self, source, config, sharding, process_index: int = 0,
               process_count: int = 1, seed: int | None = None):
    """seed: the shuffle's seed (default `config.seed`)."""
    seed = config.seed if seed is None else seed
    self._process_count = process_count
    if hasattr(source, "shard_groups"):
      ds = _shard_group_batches(source, config, seed, process_index,
                                process_count)
    else:
      ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
      ds = train_transforms(ds, config).batch(
          config.batch_size // process_count, drop_remainder=True)
      ds = ds[process_index::process_count]  # this process's rows
    ds = ds.to_iter_dataset(TRAIN_READ_OPTIONS)
    if config.data_workers:
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=config.data_workers))
    self._iterator = iter(ds)
    self._sharding = sharding

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return parallel.put_batch(next(self._iterator), self._sharding)

  def get_state(self) -> dict:
    return {"iterator": self._iterator.get_state(),
            "process_count": self._process_count}

  def set_state(self, state: dict):
    """Restores a `get_state()` (or, from checkpoints written before it
    recorded the process count, grain's state alone)."""
    self._iterator.set_state(state.get("iterator", state))


def shard_group_count(config, num_shards: int, process_count: int) -> int:
  """G, the groups a source of `num_shards` shards is read as:
  `config.shard_groups`, or if that is 0 (or absent) the largest divisor of
  `config.batch_size` not above `num_shards` (the default never depends on
  the process count). UsageError unless G divides the batch size and the
  process count divides G."""
  groups = config.get("shard_groups") or max(
      d for d in range(1, min(num_shards, config.batch_size) + 1)
      if config.batch_size % d == 0)
  how = ("config key 'shard_groups'" if config.get("shard_groups") else
         f"the default shard_groups (the largest divisor of batch_size "
         f"{config.batch_size} not above the {num_shards} shards)")
  if groups < 1 or config.batch_size % groups:
    raise UsageError(f"{how}: {groups} groups of shards must divide "
                     f"batch_size {config.batch_size}")
  if groups % process_count:
    raise UsageError(
        f"{how}: {groups} groups of shards cannot be split over "
        f"{process_count} processes; set config.shard_groups to a multiple "
        f"of {process_count} that divides batch_size {config.batch_size} "
        "(with more groups than shards, every group reads every G-th example "
        "of all shards)")
  return groups


def _shard_group_batches(source, config, seed: int, process_index: int,
                         process_count: int) -> grain.MapDataset:
  """Process `process_index`'s rows of every global batch of a source read
  as groups of shards (`TrainIterator`): the concatenated batches of its
  groups, group g shuffled with a seed drawn from (seed, g)."""
  num_groups = shard_group_count(config, len(source.shards), process_count)
  per_process = num_groups // process_count
  first = process_index * per_process
  streams = []
  for g, group in enumerate(source.shard_groups(num_groups)[
      first:first + per_process], start=first):
    group_seed = int(np.random.SeedSequence([seed, g]).generate_state(1)[0])
    ds = group.seed(group_seed).shuffle().repeat()
    streams.append(train_transforms(ds, config).batch(
        config.batch_size // num_groups, drop_remainder=True))
  if len(streams) == 1:
    return streams[0]
  return grain.experimental.ZipMapDataset(streams).map(_concatenate)


def _concatenate(batches: tuple[dict, ...]) -> dict:
  """Batches with the same keys -> one batch, rows in order."""
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class EvalBatches:
  """One pass over `source` in order, in batches of `batch_size`, per iteration.

  Iterating again starts a new pass, so several evaluators can read the same
  split. The last batch is padded to full size with zero examples; every batch
  has a boolean "valid" [B] that is False on padding. With n processes,
  process i holds rows [i*b, (i+1)*b) of each batch (b = batch_size / n), so
  the global batches are those of one process, padding included, and every
  process yields the same number of batches, ceil(len(source) / batch_size).
  """

  def __init__(self, source, config, batch_size: int, sharding,
               process_index=0, process_count=1):
    self._local_batch = batch_size // process_count
    self._num_batches = -(-len(source) // batch_size)
    self._sharding = sharding
    ds = grain.MapDataset.source(source)
    if config.get("image_size"):
      ds = ds.map(ResizeImage(config.image_size))
    if config.get("text") and config.text.get("captions_key"):
      ds = ds.map(AllCaptions(text_tokenizer(config),
                              config.text.num_captions,
                              config.text.captions_key))
    chunks = (
        _text_fields(ds, config)
        .map(Preprocess(tuple(config.modalities), config.audio_length))
        .batch(self._local_batch, drop_remainder=False))
    self._first_chunk = chunks  # chunk 0: the padding's shapes and dtypes
    self._dataset = chunks[process_index::process_count]

  def _padding(self) -> dict:
    """A batch of only padding, for a process whose rows are past the end."""
    return {k: np.zeros((0,) + np.shape(v)[1:], np.asarray(v).dtype)
            for k, v in self._first_chunk[0].items()}

  def __iter__(self) -> Iterator[dict]:
    batches = iter(self._dataset.to_iter_dataset())
    for _ in range(self._num_batches):
      batch = next(batches, None) or self._padding()
      n = len(next(iter(batch.values())))
      batch["valid"] = np.ones(n, bool)
      if n < self._local_batch:
        batch = {k: np.concatenate(
            [v, np.zeros((self._local_batch - n,) + v.shape[1:], v.dtype)])
                 for k, v in batch.items()}
      yield parallel.put_batch(batch, self._sharding)
