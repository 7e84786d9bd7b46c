"""SubwordVocab: an invertible subword vocabulary with reserved ids for sequence models.

Invariant: id 0 is padding, 1 is end-of-sequence (EOS), 2 is start-of-sequence
(SOS); text encodes only to ids >= 3, and `Decode(Encode(text)) == text` for any
text that does not itself contain the literal tokens '<EOS>' or '<SOS>' (every
character has at least a byte-level id). A saved vocabulary loads back with
the same ids.

The subwords are tfds's `SubwordTextEncoder` (word pieces learned from a
corpus, bytes as fallback); its file format is kept, so vocabularies built by
other tfds users load too if they reserve '<EOS>' and '<SOS>' first.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

PAD_ID = 0
EOS_ID = 1
SOS_ID = 2
# The first id text can encode to; also the first symbol id of synthetic tasks.
NUM_RESERVED_IDS = 3

# SubwordTextEncoder puts padding at 0 and its reserved tokens right after it,
# in order, which makes these ids 1 and 2.
_RESERVED_TOKENS = ('<EOS>', '<SOS>')
_SUFFIX = '.subwords'  # SubwordTextEncoder's file name suffix.


class SubwordVocab:
  """Text <-> ids; build with `Build`, or `Load` a saved one."""

  def __init__(self, encoder: 'tfds.deprecated.text.SubwordTextEncoder'):
    subwords = encoder.subwords[:len(_RESERVED_TOKENS)]
    if tuple(subwords) != _RESERVED_TOKENS:
      raise ValueError(
          f'A SubwordVocab needs the reserved tokens {list(_RESERVED_TOKENS)} '
          f'first (ids {EOS_ID}, {SOS_ID}); this vocabulary starts with '
          f'{subwords}. Build it with SubwordVocab.Build.')
    self._encoder = encoder

  @classmethod
  def Build(cls, corpus: Iterable[str], target_size: int,
            max_subword_length: int = 20,
            max_corpus_chars: int | None = None) -> 'SubwordVocab':
    """Learns subwords from `corpus` for about `target_size` ids in all.

    Args:
      corpus: texts (e.g. sentences).
      target_size: wanted vocabulary size, reserved ids and the 256 byte ids
        included; the result is within about 1% of it when the corpus allows.
      max_subword_length: longest subword considered.
      max_corpus_chars: read at most this many characters of `corpus`.
    """
    encoder = tfds.deprecated.text.SubwordTextEncoder.build_from_corpus(
        corpus, target_vocab_size=target_size,
        max_subword_length=max_subword_length,
        max_corpus_chars=max_corpus_chars,
        reserved_tokens=list(_RESERVED_TOKENS))
    return cls(encoder)

  @classmethod
  def Load(cls, path: str) -> 'SubwordVocab':
    """Reads a vocabulary written by `Save` ('.subwords' appended if missing)."""
    path = _WithSuffix(path)
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f'No vocabulary file {path}.')
    return cls(tfds.deprecated.text.SubwordTextEncoder.load_from_file(
        path[:-len(_SUFFIX)]))

  def Save(self, path: str) -> str:
    """Writes the vocabulary to `path` ('.subwords' appended if missing)."""
    path = _WithSuffix(path)
    tf.io.gfile.makedirs(os.path.dirname(path) or '.')
    self._encoder.save_to_file(path[:-len(_SUFFIX)])
    return path

  @property
  def size(self) -> int:
    """Number of ids: reserved, subwords and bytes; ids are in [0, size)."""
    return self._encoder.vocab_size

  def Encode(self, text: str) -> list[int]:
    """Ids of `text`, without EOS or SOS."""
    return self._encoder.encode(text)

  def Decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to the first EOS; padding and SOS are skipped."""
    ids = [int(i) for i in ids]
    if EOS_ID in ids:
      ids = ids[:ids.index(EOS_ID)]
    return self._encoder.decode([i for i in ids if i >= NUM_RESERVED_IDS])

  def EncodeTf(self, text: tf.Tensor) -> tf.Tensor:
    """`Encode` of a scalar string tensor: int32 [n], usable in tf.data."""

    def Encode(t: bytes) -> np.ndarray:
      return np.asarray(self.Encode(t.decode('utf-8')), np.int32)

    ids = tf.numpy_function(Encode, [text], tf.int32, stateful=False)
    ids.set_shape([None])
    return ids


def _WithSuffix(path: str) -> str:
  path = os.fspath(path)
  return path if path.endswith(_SUFFIX) else path + _SUFFIX
