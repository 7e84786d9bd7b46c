"""Sequence-to-sequence inputs: WMT'14 English->German and synthetic algorithmic tasks.

Invariant: every example is NestedMap(src=NestedMap(ids, paddings),
tgt=NestedMap(ids, labels, paddings)) with static lengths (src [max_src_len],
tgt [max_tgt_len]), int32 ids and labels, float32 paddings (1.0 = padded):
src.ids = source tokens + [EOS]; tgt.ids = [SOS] + target tokens;
tgt.labels = target tokens + [EOS] (tgt.ids shifted left by one).

WMT text is encoded by tasks.text.vocab.SubwordVocab, which wraps tfds's
`tfds.deprecated.text.SubwordTextEncoder`: deprecated (tfds keeps it under
`deprecated` and no longer develops it). Its maintained successors are
SentencePiece (the `sentencepiece` package trains and applies a model;
TensorFlow Text's SentencepieceTokenizer runs one in the graph) and
TensorFlow Text's WordpieceTokenizer. Translation needs an invertible one,
as detokenized BLEU (tasks/metrics.py, `sacrebleu_detok`) decodes ids back
to text: SentencePiece is, BERT-style WordPiece is not. The project keeps
the tfds encoder for now: it needs nothing beyond tensorflow-datasets, it
is invertible, it learns the vocabulary from the training split offline
and reproducibly (the same vocabulary in every process), and any other
tokenizer changes every id, so trained checkpoints and saved `.subwords`
vocabularies would not carry over.
"""

from __future__ import annotations

import tensorflow as tf

from lingvo_gpipe import base_input_generator
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.nested_map import NestedMap
from tasks.text import sequence
from tasks.text import text_input
from tasks.text import vocab as vocab_lib


def _Pair(src: tf.Tensor, tgt: tf.Tensor, max_src_len: int,
          max_tgt_len: int) -> NestedMap:
  return NestedMap(src=sequence.WithEos(src, max_src_len),
                   tgt=sequence.WithSosAndEos(tgt, max_tgt_len))


class Wmt14EnDeInput(text_input.TfdsTextInput):
  """WMT'14 translation from tfds 'wmt14_translate/de-en', English to German.

  The tfds features are 'en' and 'de' (strings). Splits: 'train' (Europarl v7,
  Common Crawl, News Commentary v9), 'validation' (newstest2013), 'test'
  (newstest2014, the set GPipe reports BLEU on). Both languages share one
  subword vocabulary (`vocab`), as in GPipe's Transformer. Pairs too long
  for max_src_len / max_tgt_len are dropped from training (or truncated, with
  drop_long_in_training=False); eval truncates them, to see every pair once.
  """

  @classmethod
  def Params(cls) -> hyperparams.InstantiableParams:
    p = super().Params()
    p.dataset = 'wmt14_translate/de-en'
    p.Define('source_language', 'en', "Feature translated from: 'en' or 'de'.")
    p.Define('target_language', 'de', "Feature translated to: 'de' or 'en'.")
    p.Define('max_src_len', 128, 'Static length of src: tokens plus EOS.')
    p.Define('max_tgt_len', 128, 'Static length of tgt: tokens plus SOS/EOS.')
    return p

  def _TextFeatures(self) -> list[str]:
    return [self.params.source_language, self.params.target_language]

  def _MaxLens(self) -> list[int]:
    return [self.params.max_src_len, self.params.max_tgt_len]

  def _Examples(self, split: str, training: bool) -> tf.data.Dataset:
    p = self.params
    return self._Tokens(split, training).map(
        lambda src, tgt: _Pair(src, tgt, p.max_src_len, p.max_tgt_len),
        num_parallel_calls=tf.data.AUTOTUNE)


_TASKS = {
    'copy': lambda tokens: tokens,
    'reverse': lambda tokens: tf.reverse(tokens, [0]),
    'sort': tf.sort,
}


class SyntheticSeqInput(base_input_generator.BaseInputGenerator):
  """An algorithmic seq2seq task on random token sequences, made on the fly.

  Example i of a split is a function of (split_seeds[split], i) only: a length
  uniform in [min_len, max_len] and that many symbols uniform over
  `num_symbols` ids (NUM_RESERVED_IDS onwards, after padding, EOS and SOS);
  the target is the source copied, reversed or sorted (`task`). Splits are
  the keys of split_sizes; different seeds keep train and test different.
  Static lengths: src and tgt are both [max_len + 1].
  """

  @classmethod
  def Params(cls) -> hyperparams.InstantiableParams:
    p = super().Params()
    p.Define('task', 'copy', f'What the target is: {", ".join(_TASKS)}.')
    p.Define('num_symbols', 16, 'Distinct symbols; vocab_size is this plus '
             f'{vocab_lib.NUM_RESERVED_IDS} reserved ids.')
    p.Define('min_len', 1, 'Shortest source, in symbols.')
    p.Define('max_len', 16, 'Longest source, in symbols.')
    p.Define('split_sizes', {'train': 100000, 'test': 1000},
             'Examples per split name.')
    p.Define('split_seeds', {'train': 1, 'test': 2},
             'Seed of each split; the examples depend on nothing else.')
    return p

  def __init__(self, params: hyperparams.InstantiableParams):
    super().__init__(params)
    p = self.params
    if p.task not in _TASKS:
      raise hyperparams.ConfigError(f'task={p.task!r}; expected one of {sorted(_TASKS)}.')
    if not 1 <= p.num_symbols:
      raise hyperparams.ConfigError(f'num_symbols={p.num_symbols}; expected >= 1.')
    if not 0 <= p.min_len <= p.max_len:
      raise hyperparams.ConfigError(f'min_len={p.min_len}, max_len={p.max_len}; expected '
                                    '0 <= min_len <= max_len.')

  @property
  def vocab_size(self) -> int:
    return vocab_lib.NUM_RESERVED_IDS + self.params.num_symbols

  def _Examples(self, split: str, training: bool) -> tf.data.Dataset:
    del training  # The same examples either way; Dataset shuffles training.
    p = self.params
    if split not in p.split_sizes or split not in p.split_seeds:
      raise hyperparams.ConfigError(f'split={split!r}; split_sizes has {sorted(p.split_sizes)} '
                                    f'and split_seeds has {sorted(p.split_seeds)}.')
    seed = tf.constant(p.split_seeds[split], tf.int64)
    max_len, target_fn = p.max_len, _TASKS[p.task]

    def Example(i: tf.Tensor) -> NestedMap:
      length_seed, symbol_seed = tf.unstack(
          tf.random.experimental.stateless_split(tf.stack([seed, i]), 2))
      length = tf.random.stateless_uniform(
          [], length_seed, minval=p.min_len, maxval=max_len + 1, dtype=tf.int32)
      src = tf.random.stateless_uniform(
          [length], symbol_seed, minval=vocab_lib.NUM_RESERVED_IDS,
          maxval=self.vocab_size, dtype=tf.int32)
      return _Pair(src, target_fn(src), max_len + 1, max_len + 1)

    return tf.data.Dataset.range(p.split_sizes[split]).map(
        Example, num_parallel_calls=tf.data.AUTOTUNE)
