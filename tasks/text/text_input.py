"""TfdsTextInput: text features of a tfds data set as subword token sequences.

Invariant: `_Tokens(split, training)` yields one int32 token tensor per name in
`_TextFeatures()`, encoded with `vocab`, the one vocabulary of all those
features. In training with drop_long_in_training, an example is kept only if
each sequence fits its length in `_MaxLens()` with one EOS or SOS added;
otherwise (and always in eval) nothing is dropped, and the packing into fixed
lengths (tasks.text.sequence) truncates.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from lingvo_gpipe.core import hyperparams
from tasks import tfds_input
from tasks.text import sequence
from tasks.text import vocab as vocab_lib


class TfdsTextInput(tfds_input.TfdsInput):
  """Subclasses name their text features and static lengths, and pack tokens."""

  @classmethod
  def Params(cls) -> hyperparams.InstantiableParams:
    p = super().Params()
    p.Define('vocab_file', None,
             "Subword vocabulary file ('.subwords'). If it exists it is "
             'loaded; else a vocabulary is built from the training split and '
             'saved there. None: build one in memory each run.')
    p.Define('target_vocab_size', 32000,
             'Wanted vocabulary size (reserved, subword and 256 byte ids) when '
             'building one.')
    p.Define('vocab_corpus_chars', 10_000_000,
             'Characters of training text read to build a vocabulary; '
             'building is pure Python, so this bounds its time (minutes at '
             '1e7).')
    p.Define('drop_long_in_training', True,
             'Training drops examples too long for the static lengths; False: '
             'truncates them (eval always truncates, to see every example).')
    return p

  def __init__(self, params: hyperparams.InstantiableParams):
    super().__init__(params)
    self._vocab = None

  def _TextFeatures(self) -> Sequence[str]:
    """Names of the tfds string features to encode."""
    raise TypeError(f'{type(self).__name__} must override _TextFeatures.')

  def _MaxLens(self) -> Sequence[int]:
    """Static length of each packed sequence, in `_TextFeatures` order."""
    raise TypeError(f'{type(self).__name__} must override _MaxLens.')

  @property
  def vocab(self) -> vocab_lib.SubwordVocab:
    """The vocabulary: vocab_file if it exists, else built from 'train'."""
    if self._vocab is None:
      self._vocab = self._LoadOrBuildVocab()
    return self._vocab

  def _LoadOrBuildVocab(self) -> vocab_lib.SubwordVocab:
    p = self.params
    features = sorted(self._Builder().info.features.keys())
    for name in self._TextFeatures():
      if name not in features:
        raise ValueError(f'{name!r} is not a feature of {p.dataset!r}; it '
                         f'has {features}.')
    if p.vocab_file:
      try:
        return vocab_lib.SubwordVocab.Load(p.vocab_file)
      except FileNotFoundError:
        pass
    logging.info('Building a %d-id subword vocabulary from at most %d '
                 'characters of %s train.', p.target_vocab_size,
                 p.vocab_corpus_chars, p.dataset)
    vocab = vocab_lib.SubwordVocab.Build(
        self._Corpus(), p.target_vocab_size,
        max_corpus_chars=p.vocab_corpus_chars)
    if p.vocab_file:
      logging.info('Saved the vocabulary to %s.', vocab.Save(p.vocab_file))
    return vocab

  def _Corpus(self) -> Iterator[str]:
    names = self._TextFeatures()
    for example in tfds.as_numpy(self._Read('train', training=False)):
      for name in names:
        yield example[name].decode('utf-8')

  def _Tokens(self, split: str, training: bool) -> tf.data.Dataset:
    """Tuples of int32 token tensors, one per text feature."""
    p, vocab = self.params, self.vocab
    names, max_lens = tuple(self._TextFeatures()), tuple(self._MaxLens())
    ds = self._Read(split, training).map(
        lambda ex: tuple(vocab.EncodeTf(ex[n]) for n in names),
        num_parallel_calls=tf.data.AUTOTUNE)
    if training and p.drop_long_in_training:
      ds = ds.filter(lambda *tokens: tf.reduce_all(
          [sequence.Fits(t, n) for t, n in zip(tokens, max_lens)]))
    return ds
