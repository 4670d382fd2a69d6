"""WordPiece tokenisation to fixed-length id arrays, with `tokenizers`.

Needs the optional `tokenizers` package: `pip install -e ".[text]"`.
"""

from collections.abc import Sequence
import os
import pathlib

import numpy as np


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
