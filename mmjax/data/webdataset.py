"""webdataset-style `.tar` image-text shards as a random-access grain source.

The shards are what img2dataset writes: uncompressed `.tar` files in which
consecutive members sharing a key form one example, `000120034.jpg` +
`000120034.txt` and/or `000120034.json` (other members, `.parquet` sidecars
outside the tars and any other extension, are ignored). As in webdataset, the
key is the member's path up to the first dot of its file name and the
extension is the rest; the members of an example must be adjacent.

  config.dataset = "wds:/data/cc3m/{split}/{00000..00331}.tar"
  source = pipeline.data_source(config, "train")   # a WebDatasetSource
  source[i]  # {"image": uint8 [H, W, 3], "captions": object [C] of bytes,
             #  "key": str}

Records look like `coco_mini`'s, so the pipeline's transforms apply unchanged
(`CaptionText` draws one of "captions" per visit, `AllCaptions` scores all of
them, `config.image_size` resizes web images of varying size to one shape).
Images are decoded with Pillow (a dependency of mmjax: `ResizeImage` uses it)
from JPEG, PNG or WebP, and always come back RGB. Captions: the json's
"captions" list where it has one (what `repack` writes, to keep COCO's five),
else the `.txt` member, else the json's "caption" field.

Pattern (`config.dataset` after "wds:"): bash-style brace expansion
(`{00000..00331}` keeps the zero padding, `{a,b}` lists alternatives), then
glob wildcards (`*`, `?`, `[...]`), expanded in order; `~` is the home
directory. Splits: `{split}` in the pattern is replaced by the split's name
(`config.train_split`, `config.eval_splits`), so one pattern names every
split; a pattern without `{split}` serves only the split "train" (set
`config.eval_splits = ()`). Splits cannot be sliced ("train[:100]").

Random access. Opening a source indexes every shard: `scan_shard` reads the
tar headers only (the file data are seeked over) into byte spans, one per
example; reading example i is one `pread` of its span, then decoding. The
scan costs about 20-30 us per tar member on a 2-core AMD EPYC (0.7 s for a
10,000-example img2dataset shard with .jpg, .txt and .json), run on 8
threads, and its result is cached: `cache_dir()/wds_index/<key>.npz`
(`mmjax.hardware.cache_dir`, $MMJAX_CACHE_DIR to move it), one file per
list of shards, keyed by the shards' real paths, sizes and modification
times, so a changed or added shard is scanned again and an unchanged list
opens from one file read (`index_shards`). The index holds 16 bytes per
example. Because the source is random access, the rest of the pipeline is
grain's: shuffles with a seed that is redrawn every epoch and a position
(`get_state`, a small JSON dict saved in every checkpoint) that resumes to
bit-identical batches.

Processes. Training reads the shards as G groups (`shard_groups`; G is
`config.shard_groups`, by default the largest divisor of the batch size not
above the shard count, `pipeline.shard_group_count`): group g holds shards
g::G (or, with more groups than shards, every G-th example of all shards),
is shuffled with a seed of its own and is read as an endless stream, and
global batch b is the b-th batch of batch_size / G of every group, in group
order (`pipeline.TrainIterator`). Process i of n reads groups
[i G/n, (i+1) G/n) only, hence only their shards, and the global batches
are the same for every process count that divides G, so a position saved
by one count resumes with another. Evaluation reads the split in order,
each process its rows of every global batch (`pipeline.EvalBatches`), as
for any source.

Bad input raises `mmjax.errors.UsageError` naming the file or the config key:
no shard matching the pattern, a shard that is not an uncompressed tar or is
truncated, an example without an image or a caption, a key that appears twice
in a shard, an image that does not decode.

Repacking a dataset (coco_mini here) into shards in this layout, N shards per
split, never overwriting existing files, then training on them:

  python -m mmjax.data.webdataset repack --dataset coco_mini --out /tmp/wds \
      --shards 8
  python -m mmjax.train --config configs/coco_mini_captioning.py \
      --workdir /tmp/run "--config.dataset=wds:/tmp/wds/{split}/{00000..00007}.tar"

Measured (`python benchmarks/webdataset_reader.py`, coco_mini's 66 training
photos in 8 PNG shards, a 2-core Intel Xeon with other jobs running, so
these are lower bounds): the header scan 51 us per member, the cached index
0.6 ms; 2,000 shards (16,500 examples) open in 1.9 s cold and 0.02 s from
the cache; `source[i]` 4,100 examples/s on one thread; the TrainIterator at
coco_mini's batch size 32 2,050 examples/s over the 2,000 shards in 32
groups, against 3,500 for coco_mini's array_record files (in 8 groups of 8
examples, 980: grain's shuffle is slow in tiny groups, the benchmark's
docstring).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import glob
import hashlib
import io
import json
import os
import pathlib
import re
import sys
import tarfile
import threading
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging
from PIL import Image

from mmjax import hardware
from mmjax.errors import UsageError

PREFIX = "wds:"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
# webdataset's key rule: the path up to the first dot of the file name.
_NAME = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_ZERO_CHUNK = 1 << 20


# ------------------------------------------------------------------- patterns


def expand_braces(pattern: str) -> list[str]:
  """Bash-style brace expansion, left to right.

  "a{1..3}" -> a1 a2 a3; "{00000..00002}" -> 00000 00001 00002 (zero padded
  to the wider end); "{x,y}{1..2}" -> x1 x2 y1 y2; nested braces expand.
  Braces holding neither ".." nor a comma (such as "{split}") stay as they are.
  """
  start = pattern.find("{")
  if start < 0:
    return [pattern]
  depth = 0
  for end in range(start, len(pattern)):
    depth += {"{": 1, "}": -1}.get(pattern[end], 0)
    if depth == 0:
      break
  else:
    raise UsageError(f"config key 'dataset': unbalanced '{{' in {pattern!r}")
  prefix, body, rest = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
  options = _brace_options(body)
  tails = expand_braces(rest)
  if options is None:  # a literal brace
    return [prefix + "{" + body + "}" + t for t in tails]
  return [prefix + x + t for o in options for x in expand_braces(o)
          for t in tails]


def _brace_options(body: str) -> list[str] | None:
  """The alternatives of one brace body: a range "a..b", top-level commas, or
  None for a literal."""
  m = _RANGE.fullmatch(body)
  if m:
    a, b = int(m.group(1)), int(m.group(2))
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-")[0] == "0"
                 for s in m.groups())
    width = max(len(s) for s in m.groups()) if padded else 0
    step = 1 if b >= a else -1
    return [str(v).zfill(width) for v in range(a, b + step, step)]
  parts, depth, last = [], 0, 0
  for i, c in enumerate(body):
    depth += {"{": 1, "}": -1}.get(c, 0)
    if c == "," and depth == 0:
      parts.append(body[last:i])
      last = i + 1
  return parts + [body[last:]] if parts else None


def shard_paths(pattern: str, split: str) -> list[str]:
  """The shard files of `split`: `pattern` with "{split}" replaced, braces
  expanded, then globbed (each glob sorted). UsageError naming the pattern if
  nothing matches, a listed file is missing or a file is listed twice."""
  where = f"config key 'dataset' ({PREFIX}{pattern})"
  if "[" in split:
    raise UsageError(f"{where}: webdataset splits cannot be sliced ({split!r})")
  if "{split}" in pattern:
    pattern = pattern.replace("{split}", split)
  elif split != "train":
    raise UsageError(
        f"{where} has no {{split}} in it, so it serves only the split "
        f"'train', not '{split}' (add {{split}} or set eval_splits=())")
  paths = []
  for p in expand_braces(os.path.expanduser(pattern)):
    if glob.has_magic(p):
      paths += sorted(glob.glob(p))
    elif os.path.exists(p):
      paths.append(p)
    else:
      raise UsageError(f"{where}: shard not found: {p}")
  if not paths:
    raise UsageError(f"{where}: no shard matches {pattern}")
  twice = [p for p, n in collections.Counter(paths).items() if n > 1]
  if twice:
    raise UsageError(f"{where}: shard listed twice: {twice[0]}")
  return paths


# ---------------------------------------------------------------------- index


def split_name(name: str) -> tuple[str, str] | tuple[None, None]:
  """A member name -> (key, extension), webdataset's way; (None, None) for
  names without an extension or hidden ones ("._x.jpg")."""
  m = _NAME.match(name)
  return (m.group(1), m.group(2)) if m else (None, None)


def scan_shard(path: str) -> np.ndarray:
  """The byte spans of a shard's examples: int64 [K, 2] of (start, length).

  Reads the tar headers only. A span runs from an example's first member
  header to the end of its last member's data, padded to whole 512-byte
  blocks. Checks (UsageError naming the file): the file is an uncompressed
  tar, no member runs past the end of the file, nothing but zeros follows
  the last member (tarfile stops silently at a corrupt header), every
  example has an image and a caption member, and no key comes back after
  other keys.
  """
  spans, seen = [], set()
  key, exts, start, end = None, set(), 0, 0

  def close_example():
    if key is None:
      return
    if not exts & set(IMAGE_EXTENSIONS):
      raise UsageError(f"shard {path}: example {key} has no image member "
                       f"(.{', .'.join(IMAGE_EXTENSIONS)}); it has "
                       f".{', .'.join(sorted(exts))}")
    if not exts & set(CAPTION_EXTENSIONS):
      raise UsageError(f"shard {path}: example {key} has no caption member "
                       f"(.txt or .json); it has .{', .'.join(sorted(exts))}")
    spans.append((start, end - start))

  try:
    size = os.path.getsize(path)
    with tarfile.open(path, mode="r:") as tar:
      for info in tar:
        k, ext = split_name(info.name) if info.isfile() else (None, None)
        if k is None:
          continue
        member_end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * (
            tarfile.BLOCKSIZE)  # the data padded to whole blocks
        if member_end > size:
          raise UsageError(f"shard {path} is truncated: member {info.name} "
                           f"ends at byte {member_end} of {size}")
        if k != key:
          close_example()
          if k in seen:
            raise UsageError(f"shard {path}: the members of example {k} are "
                             "not adjacent (key seen before)")
          seen.add(k)
          key, exts, start = k, set(), info.offset
        exts.add(ext.lower())
        end = member_end
      close_example()
      _check_zeros(path, tar.offset)
  except (tarfile.TarError, OSError, UnicodeError) as e:
    raise UsageError(f"unreadable tar shard {path} (an uncompressed tar is "
                     f"needed): {' '.join(str(e).split()) or type(e).__name__}"
                     ) from e
  return np.asarray(spans, np.int64).reshape(-1, 2)


def _check_zeros(path: str, offset: int):
  """UsageError unless `path` holds only zero bytes from `offset` on (the end
  of archive marker and padding after the last member)."""
  with open(path, "rb") as f:
    f.seek(offset)
    while chunk := f.read(_ZERO_CHUNK):
      if chunk.count(0) != len(chunk):
        raise UsageError(f"unreadable tar shard {path}: a corrupt member "
                         f"header at byte {offset} or after")


def index_shards(shards: Sequence["Shard"], threads: int = 8):
  """Gives every shard its spans: from the index cache when this list of
  shards (real path, size, modification time) was indexed before, else
  scanned (`scan_shard`, on `threads` threads) and then cached. A cache
  that cannot be read or written is skipped (logged), never an error."""
  todo = [s for s in shards if s._spans is None]  # pylint: disable=protected-access
  if not todo:
    return
  try:
    stats = [os.stat(s.path) for s in todo]
  except OSError as e:
    raise UsageError(f"cannot read shard {e.filename}: {e.strerror}") from e
  key = hashlib.sha256(json.dumps(
      [(os.path.realpath(s.path), st.st_size, st.st_mtime_ns)
       for s, st in zip(todo, stats)]).encode()).hexdigest()[:32]
  path = hardware.cache_dir() / "wds_index" / f"{key}.npz"
  try:
    with np.load(path) as cached:
      counts, spans = cached["counts"], cached["spans"]
    if len(counts) == len(todo) and counts.sum() == len(spans):
      for shard, part in zip(todo, np.split(spans, np.cumsum(counts)[:-1])):
        shard._spans = part  # pylint: disable=protected-access
      return
  except FileNotFoundError:
    pass
  except (OSError, ValueError, KeyError) as e:
    logging.warning("shard index cache %s unreadable (%s); scanning", path, e)
  with concurrent.futures.ThreadPoolExecutor(min(threads, len(todo))) as pool:
    spans = list(pool.map(scan_shard, [s.path for s in todo]))
  for shard, part in zip(todo, spans):
    shard._spans = part  # pylint: disable=protected-access
  _write_index(path, np.array([len(p) for p in spans], np.int64),
               np.concatenate(spans))


def _write_index(path: pathlib.Path, counts: np.ndarray, spans: np.ndarray):
  """Writes the index cache file `path` (atomically; kept if it appeared)."""
  tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}"
                       ".tmp.npz")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, counts=counts, spans=spans)
    os.replace(tmp, path)  # the same key always has the same content
  except OSError as e:
    logging.warning("shard index not cached in %s (%s)", path, e)
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)


class Shard:
  """One tar file: its example spans (scanned once) and a reader.

  Reads are `os.pread`s on a descriptor opened on first use and shared by
  threads; pickling (grain's worker processes) drops it and keeps the spans.
  """

  def __init__(self, path: str):
    self.path = str(path)
    self._spans = None
    self._fd = None
    self._lock = threading.Lock()

  @property
  def spans(self) -> np.ndarray:
    """int64 [K, 2]: (start, length) of each example (`scan_shard`)."""
    if self._spans is None:
      self._spans = scan_shard(self.path)
    return self._spans

  def read(self, start: int, length: int) -> bytes:
    """`length` bytes at `start`; UsageError if the file got shorter."""
    with self._lock:
      if self._fd is None:
        try:
          self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
          raise UsageError(f"cannot open shard {self.path}: {e}") from e
    data = os.pread(self._fd, length, start)
    if len(data) != length:
      raise UsageError(f"shard {self.path} changed after it was indexed")
    return data

  def __getstate__(self):
    return {"path": self.path, "_spans": self._spans}

  def __setstate__(self, state):
    self.__init__(state["path"])
    self._spans = state["_spans"]

  def __del__(self, _close=os.close):  # os may be gone at interpreter exit
    if getattr(self, "_fd", None) is not None:
      _close(self._fd)


# --------------------------------------------------------------------- source


class WebDatasetSource:
  """Random access to the examples of tar shards, in shard then file order.

  `source[i]` -> {"image": uint8 [H, W, 3], "captions": object [C] of UTF-8
  bytes, "key": str}. Building it scans every shard's headers (module
  docstring); grain reads it from several threads.
  """

  def __init__(self, shards: Sequence[str | Shard]):
    self.shards = [s if isinstance(s, Shard) else Shard(s) for s in shards]
    index_shards(self.shards)
    # ends[j]: examples in shards 0..j; example i is in the first shard whose
    # end exceeds i.
    self._ends = np.cumsum([len(s.spans) for s in self.shards], dtype=np.int64)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"example {index} of {len(self)}")
    j = int(np.searchsorted(self._ends, index, side="right"))
    shard = self.shards[j]
    start, length = shard.spans[index - (self._ends[j - 1] if j else 0)]
    return decode_example(shard.read(int(start), int(length)), shard.path)

  def __repr__(self) -> str:
    first = f", first {self.shards[0].path}" if self.shards else ""
    return f"WebDatasetSource({len(self.shards)} shards, {len(self)} examples{first})"

  def shard_groups(self, num_groups: int) -> list[grain.MapDataset]:
    """The source as `num_groups` disjoint groups that cover it: shards g::G
    when there are at least G shards, else every G-th example from g."""
    if num_groups <= len(self.shards):
      return [grain.MapDataset.source(WebDatasetSource(
          self.shards[g::num_groups])) for g in range(num_groups)]
    return [grain.MapDataset.source(self)[g::num_groups]
            for g in range(num_groups)]


def read_members(span: bytes, path: str) -> tuple[str, dict[str, bytes]]:
  """One example's tar span -> (key, {lower-case extension: member bytes})."""
  members, key = {}, None
  try:
    with tarfile.open(fileobj=io.BytesIO(span), mode="r:") as tar:
      for info in tar:
        k, ext = split_name(info.name) if info.isfile() else (None, None)
        if k is not None:
          key = k
          members[ext.lower()] = tar.extractfile(info).read()
  except tarfile.TarError as e:
    raise UsageError(f"unreadable tar shard {path}: {e}") from e
  return key, members


def decode_example(span: bytes, path: str) -> dict:
  """One example's tar span -> {"image": uint8 [H, W, 3], "captions": object
  [C] of bytes, "key": str}; UsageError naming the shard and key."""
  key, members = read_members(span, path)
  where = f"shard {path}, example {key}"
  image = next(members[e] for e in IMAGE_EXTENSIONS if e in members)
  return {"image": decode_image(image, where),
          "captions": np.array([c.encode() for c in captions(members, where)],
                               dtype=object),
          "key": key}


def decode_image(data: bytes, where: str) -> np.ndarray:
  """JPEG, PNG or WebP bytes -> uint8 [H, W, 3] RGB (grey, palette and alpha
  images converted)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UsageError(f"{where}: image does not decode ({e})") from e


def captions(members: dict[str, bytes], where: str) -> list[str]:
  """The json's "captions" list, else the .txt, else the json's "caption"."""
  meta = {}
  if "json" in members:
    try:
      meta = json.loads(members["json"])
    except (ValueError, UnicodeError) as e:
      raise UsageError(f"{where}: bad .json member ({e})") from e
  if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
    found = [str(c) for c in meta["captions"]]
  elif "txt" in members:
    try:
      found = [members["txt"].decode("utf-8").strip()]
    except UnicodeError as e:
      raise UsageError(f"{where}: .txt member is not UTF-8") from e
  elif isinstance(meta, dict) and isinstance(meta.get("caption"), str):
    found = [meta["caption"]]
  else:
    found = []
  if not found:
    raise UsageError(f"{where}: no caption (.txt, or json 'caption' or "
                     "'captions')")
  return found


def data_source(dataset: str, split: str) -> WebDatasetSource:
  """The source of `split` of `config.dataset` = "wds:PATTERN"."""
  return WebDatasetSource(shard_paths(dataset.removeprefix(PREFIX), split))


# --------------------------------------------------------------------- repack


def repack(source, out_dir: str | os.PathLike, num_shards: int,
           image_format: str = "png") -> list[pathlib.Path]:
  """Writes the records of `source` as img2dataset shards; returns them.

  source: random access records {"image": uint8 [H, W, 3], "captions": [C]
    str or bytes, other scalar fields (e.g. "image_id")}.
  Writes out_dir/00000.tar ... (num_shards of them, in record order, sizes
  as even as possible). Example j of shard s has key "<s:05d><j:04d>" and
  members <key>.<image_format> (png: lossless, the images read back equal;
  jpg: quality 95, img2dataset's default), <key>.txt (the first caption) and
  <key>.json ({"key", "caption", "captions", "width", "height", "status",
  and the scalar fields}). Existing files are never overwritten: UsageError
  before anything is written if one is there.
  """
  out_dir = pathlib.Path(out_dir)
  n = len(source)
  if image_format not in ("png", "jpg"):
    raise UsageError(f"image format {image_format!r}: png or jpg")
  if not 1 <= num_shards <= n:
    raise UsageError(f"{num_shards} shards for {n} examples: need 1 to {n}")
  paths = shard_files(out_dir, num_shards)
  out_dir.mkdir(parents=True, exist_ok=True)
  parts = np.array_split(np.arange(n), num_shards)
  width = max(4, len(str(len(parts[0]) - 1)))
  for s, (path, part) in enumerate(zip(paths, parts)):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
      for j, i in enumerate(part.tolist()):
        key = f"{s:05d}{j:0{width}d}"
        for ext, data in example_members(source[i], key, image_format):
          _add_member(tar, f"{key}.{ext}", data)
    _publish(tmp, path)
  return paths


def shard_files(out_dir: str | os.PathLike, num_shards: int
                ) -> list[pathlib.Path]:
  """out_dir/00000.tar ... for `num_shards`; UsageError if one exists."""
  paths = [pathlib.Path(out_dir) / f"{s:05d}.tar" for s in range(num_shards)]
  existing = [str(p) for p in paths if p.exists()]
  if existing:
    raise UsageError(f"shard {existing[0]} exists; repack never overwrites "
                     f"({len(existing)} of the {num_shards} exist)")
  return paths


def example_members(record: dict, key: str, image_format: str
                    ) -> list[tuple[str, bytes]]:
  """One record -> [(extension, bytes)]: the image, .txt and .json."""
  image = np.asarray(record["image"])
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise UsageError(f"record {key}: image {image.shape} {image.dtype}, "
                     "repack needs uint8 [H, W, 3]")
  caps = [c.decode() if isinstance(c, bytes) else str(c)
          for c in np.asarray(record["captions"]).reshape(-1)]
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG" if image_format == "png"
                              else "JPEG", **({"quality": 95} if
                                              image_format == "jpg" else {}))
  meta = {"key": key, "caption": caps[0], "captions": caps,
          "width": image.shape[1], "height": image.shape[0],
          "status": "success"}
  for name, value in record.items():
    if name not in ("image", "captions") and np.ndim(value) == 0 and (
        np.issubdtype(np.asarray(value).dtype, np.number)):
      meta[name] = np.asarray(value).item()
  return [(image_format, buf.getvalue()), ("txt", caps[0].encode()),
          ("json", json.dumps(meta, ensure_ascii=False).encode())]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size, info.mode, info.mtime = len(data), 0o444, 0  # reproducible
  tar.addfile(info, io.BytesIO(data))


def _publish(tmp: pathlib.Path, path: pathlib.Path):
  """Moves `tmp` to `path` unless `path` exists (then UsageError)."""
  try:
    os.link(tmp, path)  # fails if path exists, unlike a rename
  except FileExistsError:
    tmp.unlink()
    raise UsageError(f"shard {path} appeared while writing; not "
                     "overwritten") from None
  except OSError:  # a file system without hard links
    if path.exists():
      tmp.unlink()
      raise UsageError(f"shard {path} exists; not overwritten") from None
    os.replace(tmp, path)
    return
  tmp.unlink()


# ------------------------------------------------------------------------ CLI


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m mmjax.data.webdataset",
                   description="Repack a dataset into webdataset tar shards.")
  commands = parser.add_subparsers(dest="command", required=True,
                                   parser_class=_Parser)
  p = commands.add_parser(
      "repack", help="write a dataset's splits as img2dataset-style shards",
      description="Write OUT/<split>/00000.tar ... for each split.")
  p.add_argument("--dataset", default="coco_mini",
                 help="an mmjax dataset name or tfds:NAME (default coco_mini)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--splits", nargs="+", default=["train", "test"])
  p.add_argument("--shards", type=int, default=8, help="shards per split")
  p.add_argument("--image_format", choices=("png", "jpg"), default="png")
  p.add_argument("--data_dir", default="",
                 help="tfds data directory (default $TFDS_DATA_DIR)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """The entry point; returns the exit status (2 and one `error:` line on
  bad input)."""
  try:
    args = _parser().parse_args(argv)
    import ml_collections  # pylint: disable=import-outside-toplevel
    from mmjax.data import pipeline  # pylint: disable=import-outside-toplevel
    config = ml_collections.ConfigDict(dict(
        dataset=args.dataset, data_dir=args.data_dir, source_dir=""))
    out = pathlib.Path(args.out)
    for split in args.splits:  # all checked before anything is written
      shard_files(out / split, args.shards)
    sources = {s: pipeline.data_source(config, s) for s in args.splits}
    for split, source in sources.items():
      paths = repack(source, out / split, args.shards, args.image_format)
      print(f"{split}: {len(source)} examples in {len(paths)} shards, "
            f"{paths[0]} ... {paths[-1].name}")
    last = f"{args.shards - 1:05d}"
    print(f"config.dataset = {PREFIX}{out}/{{split}}/{{00000..{last}}}.tar")
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
