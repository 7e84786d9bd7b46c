"""Language-model inputs: the One Billion Word benchmark (tfds 'lm1b').

Invariant: every example is NestedMap(ids, labels, paddings) of static length
max_len: ids = [SOS] + tokens, labels = tokens + [EOS] (ids shifted left by
one), int32, with float32 paddings (1.0 = padded); one sentence per example.

Sentences are encoded by tasks.text.vocab.SubwordVocab, which wraps the
deprecated `tfds.deprecated.text.SubwordTextEncoder`. Its maintained
successors are SentencePiece (the `sentencepiece` package, or TensorFlow
Text's SentencepieceTokenizer) and TensorFlow Text's WordpieceTokenizer.
It stays for now: no dependency beyond tensorflow-datasets, a vocabulary
learned from the training split offline and reproducibly, and ids (hence
checkpoints and saved `.subwords` files) that a new tokenizer would change.
Perplexity per subword depends on the vocabulary, like BLEU of subword ids
(tasks/metrics.py): compare it only across runs with the same one.
"""

from __future__ import annotations

import tensorflow as tf

from lingvo_gpipe.core import hyperparams
from tasks.text import sequence
from tasks.text import text_input


class Lm1bInput(text_input.TfdsTextInput):
  """Sentences of lm1b (feature 'text'; splits 'train' and 'test').

  Sentences longer than max_len - 1 subwords are dropped from training (or
  truncated, with drop_long_in_training=False); eval truncates them, so it
  still sees every sentence once.
  """

  @classmethod
  def Params(cls) -> hyperparams.InstantiableParams:
    p = super().Params()
    p.dataset = 'lm1b'
    p.Define('max_len', 128, 'Static sequence length: tokens plus SOS/EOS.')
    return p

  def _TextFeatures(self) -> list[str]:
    return ['text']

  def _MaxLens(self) -> list[int]:
    return [self.params.max_len]

  def _Examples(self, split: str, training: bool) -> tf.data.Dataset:
    max_len = self.params.max_len
    return self._Tokens(split, training).map(
        lambda tokens: sequence.WithSosAndEos(tokens, max_len),
        num_parallel_calls=tf.data.AUTOTUNE)
