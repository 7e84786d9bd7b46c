"""Fixed-length id sequences with paddings: the static shapes sequence models take.

Invariant: every function returns tensors of static length `max_len`; real
positions have paddings 0.0 and padded ones 1.0 with id (and label) PAD_ID.
A token sequence that does not fit is truncated to its first `max_len - 1`
tokens, so the EOS (or SOS) that frames it always fits; `Fits` says whether
nothing would be cut.
"""

from __future__ import annotations

import tensorflow as tf

from lingvo_gpipe.core.nested_map import NestedMap
from tasks.text import vocab


def Fits(tokens: tf.Tensor, max_len: int) -> tf.Tensor:
  """Whether `tokens` plus one EOS or SOS fits in `max_len` (a bool scalar)."""
  return tf.size(tokens) < max_len


def WithEos(tokens: tf.Tensor, max_len: int) -> NestedMap:
  """NestedMap(ids=tokens + [EOS], paddings), both [max_len]."""
  tokens = tf.cast(tokens[:max_len - 1], tf.int32)
  ids = tf.concat([tokens, [vocab.EOS_ID]], 0)
  return NestedMap(ids=_Pad(ids, max_len), paddings=_Paddings(ids, max_len))


def WithSosAndEos(tokens: tf.Tensor, max_len: int) -> NestedMap:
  """NestedMap(ids=[SOS] + tokens, labels=tokens + [EOS], paddings), [max_len]."""
  tokens = tf.cast(tokens[:max_len - 1], tf.int32)
  ids = tf.concat([[vocab.SOS_ID], tokens], 0)
  labels = tf.concat([tokens, [vocab.EOS_ID]], 0)
  return NestedMap(ids=_Pad(ids, max_len), labels=_Pad(labels, max_len),
                   paddings=_Paddings(ids, max_len))


def _Pad(ids: tf.Tensor, max_len: int) -> tf.Tensor:
  padded = tf.pad(ids, [[0, max_len - tf.size(ids)]],
                  constant_values=vocab.PAD_ID)
  return tf.ensure_shape(padded, [max_len])


def _Paddings(ids: tf.Tensor, max_len: int) -> tf.Tensor:
  return 1.0 - tf.sequence_mask(tf.size(ids), max_len, dtype=tf.float32)
