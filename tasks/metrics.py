"""Metrics shared by the tasks: cross-entropy, top-k and token accuracy, BLEU.

Invariant: every in-graph metric is a `(value, weight)` pair as
`BaseTask.ComputeMetrics` returns them, with `value` the weighted mean over
what `weight` counts (examples or non-padded tokens), so a trainer that
averages values by weight over batches gets the mean over the whole set.
Host-side sequence metrics (BLEU, exact match) see token ids with padding and
everything from EOS on stripped, and are computed over the whole corpus, not
averaged per batch.

Two BLEUs, named apart because only one compares with published results:
`bleu_token_ids` (CorpusBleu) scores the model's own token ids (subword ids
for text), so it moves with the vocabulary; `sacrebleu_detok`
(DetokenizedBleu) scores the ids decoded back to text with sacrebleu, which
tokenizes hypotheses and references itself (13a, mixed case): the field's
standard, comparable with WMT's official results and other sacreBLEU figures
(not with tokenized BLEU such as the Transformer paper's compound-split 28.4).

Conventions: id 0 is padding; `paddings` are 1.0 where a position is padded;
BLEU is reported on the 0-100 scale (a perfect match is 100).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, Optional, Sequence

from absl import logging
import numpy as np
import sacrebleu
import tensorflow as tf

from lingvo_gpipe import base_task
from lingvo_gpipe.core.nested_map import NestedMap

PAD_ID = 0
EOS_ID = 1

# Names of the two BLEU results of SequenceDecodeMetrics.
TOKEN_BLEU = 'bleu_token_ids'
DETOK_BLEU = 'sacrebleu_detok'


# --- in-graph metrics --------------------------------------------------------


def SmoothedXent(logits: tf.Tensor, labels: tf.Tensor,
                 label_smoothing: float = 0.0) -> tf.Tensor:
  """Per-example cross-entropy [...] of logits [..., C] with int labels [...].

  The target is (1 - ε)·one_hot(label) + ε / C (Szegedy et al. 2016), as in
  the Softmax layer; ε = 0 gives the negative log-likelihood.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing is {label_smoothing}; it must be in '
                     '[0, 1).')
  log_probs = tf.nn.log_softmax(logits)
  nll = -tf.gather(log_probs, labels, axis=-1, batch_dims=labels.shape.rank)
  if not label_smoothing:
    return nll
  return ((1.0 - label_smoothing) * nll -
          label_smoothing * tf.reduce_mean(log_probs, axis=-1))


def InTopK(logits: tf.Tensor, labels: tf.Tensor, k: int) -> tf.Tensor:
  """1.0 where the label's logit is among the k largest, else 0.0; shape [...].

  Ties count in the label's favour (as tf.math.in_top_k): a label is in the
  top k when fewer than k classes have a strictly larger logit. k may exceed
  the number of classes.
  """
  if k < 1:
    raise ValueError(f'InTopK: k must be >= 1, got {k}.')
  target = tf.gather(logits, labels, axis=-1, batch_dims=labels.shape.rank)
  larger = tf.reduce_sum(
      tf.cast(logits > target[..., tf.newaxis], tf.int32), axis=-1)
  return tf.cast(larger < k, logits.dtype)


def ClassificationMetrics(logits: tf.Tensor, labels: tf.Tensor,
                          label_smoothing: float = 0.0,
                          top_k: Sequence[int] = (1, 5)) -> NestedMap:
  """Metrics of logits [b, C] against int labels [b], each weighted by b.

  Returns:
    NestedMap(xent=(mean smoothed cross-entropy: the loss term),
              log_pplx=(mean negative log-likelihood),
              top{k}_accuracy=(fraction with the label in the top k) per k).
  """
  ones = tf.ones(tf.shape(labels), logits.dtype)
  out = NestedMap(
      xent=base_task.WeightedMean(
          SmoothedXent(logits, labels, label_smoothing), ones),
      log_pplx=base_task.WeightedMean(SmoothedXent(logits, labels), ones))
  for k in top_k:
    out[f'top{k}_accuracy'] = base_task.WeightedMean(
        InTopK(logits, labels, k), ones)
  return out


def SequenceMetrics(logits: tf.Tensor, labels: tf.Tensor,
                    paddings: Optional[tf.Tensor] = None,
                    label_smoothing: float = 0.0) -> NestedMap:
  """Token-level metrics of logits [b, T, V] against labels [b, T].

  Each is a mean over non-padded tokens, weighted by their number.

  Returns:
    NestedMap(loss=(smoothed cross-entropy, the training loss),
              log_pplx=(negative log-likelihood per token; exp of it is the
                        perplexity),
              token_accuracy=(fraction of tokens whose argmax is the label)).
  """
  if paddings is None:
    weights = tf.ones(tf.shape(labels), logits.dtype)
  else:
    weights = 1.0 - tf.cast(paddings, logits.dtype)
  log_pplx = base_task.WeightedMean(SmoothedXent(logits, labels), weights)
  loss = (log_pplx if not label_smoothing else base_task.WeightedMean(
      SmoothedXent(logits, labels, label_smoothing), weights))
  correct = tf.cast(
      tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels),
      logits.dtype)
  return NestedMap(loss=loss, log_pplx=log_pplx,
                   token_accuracy=base_task.WeightedMean(correct, weights))


# --- host-side sequence metrics -----------------------------------------------


def StripIds(ids: Sequence[int], eos_id: int = EOS_ID,
             pad_id: int = PAD_ID) -> list[int]:
  """The tokens of one sequence: ids before the first EOS or padding id."""
  out = []
  for i in ids:
    i = int(i)
    if i in (eos_id, pad_id):
      break
    out.append(i)
  return out


def _Ngrams(tokens: Sequence[int], n: int) -> collections.Counter:
  return collections.Counter(
      tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def CorpusBleu(hypotheses: Sequence[Sequence[int]],
               references: Sequence[Sequence[int]],
               max_order: int = 4) -> float:
  """Corpus BLEU (Papineni et al. 2002) in [0, 100], one reference each.

  BLEU = 100 · BP · exp(mean over n ≤ max_order of log p_n), where p_n is the
  corpus' clipped n-gram precision (sum over sentences of n-gram matches, each
  hypothesis n-gram counted at most as often as in its reference, over the
  sum of hypothesis n-grams), and the brevity penalty BP = 1 if the total
  hypothesis length c exceeds the total reference length r, else
  exp(1 - r / c). Unsmoothed: 0 if any p_n is 0 or the hypotheses are empty.
  Tokens are anything hashable (ids or words).
  """
  if len(hypotheses) != len(references):
    raise ValueError(f'CorpusBleu: {len(hypotheses)} hypotheses but '
                     f'{len(references)} references; give one reference each.')
  matches = [0] * max_order
  possible = [0] * max_order
  hyp_len = ref_len = 0
  for hyp, ref in zip(hypotheses, references):
    hyp, ref = list(hyp), list(ref)
    hyp_len += len(hyp)
    ref_len += len(ref)
    for n in range(1, max_order + 1):
      hyp_ngrams, ref_ngrams = _Ngrams(hyp, n), _Ngrams(ref, n)
      matches[n - 1] += sum(min(c, ref_ngrams[g])
                            for g, c in hyp_ngrams.items())
      possible[n - 1] += max(len(hyp) - n + 1, 0)
  if hyp_len == 0 or min(matches) == 0:
    return 0.0
  log_precision = sum(math.log(m / p) for m, p in zip(matches, possible))
  brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
  return 100.0 * brevity * math.exp(log_precision / max_order)


def DetokenizedBleu(hypotheses: Sequence[str],
                    references: Sequence[str]) -> float:
  """sacrebleu's corpus BLEU in [0, 100] of detokenized text, one reference.

  sacrebleu's defaults (signature nrefs:1|case:mixed|eff:no|tok:13a|
  smooth:exp): the figure WMT and most recent papers report, which
  token-id BLEU is not (it depends on the vocabulary). 0 for an empty
  corpus.
  """
  return _SacreBleu(hypotheses, references)[0]


def _SacreBleu(hypotheses: Sequence[str],
               references: Sequence[str]) -> tuple[float, str]:
  """(DetokenizedBleu, sacrebleu's signature of how it was computed)."""
  if len(hypotheses) != len(references):
    raise ValueError(f'DetokenizedBleu: {len(hypotheses)} hypotheses but '
                     f'{len(references)} references; give one reference each.')
  if not hypotheses:
    return 0.0, ''
  bleu = sacrebleu.metrics.BLEU()
  score = bleu.corpus_score(list(hypotheses), [list(references)]).score
  return float(score), str(bleu.get_signature())


class SequenceDecodeMetrics(base_task.DecodeMetrics):
  """Corpus BLEU and sequence accuracy (exact match) of decoded token ids.

  `Update` takes NestedMap(hyp_ids [b, H], ref_ids [b, T]) as numpy arrays;
  each row is cut at its first EOS or padding id (StripIds). Result:
    bleu_token_ids: CorpusBleu of the token ids, in [0, 100]; tracks
      training, but is not comparable with published BLEU.
    sacrebleu_detok: DetokenizedBleu of the ids decoded to text, in [0,
      100]; only with a detokenizer (`detokenize`, or the `vocab` of the
      eval input, see UseInput), e.g. not for synthetic symbol tasks.
    sequence_accuracy: fraction of exact matches, in [0, 1].
    num_sequences: count.
  References are the eval batches' labels: a reference the input truncated
  to its static length is scored truncated.
  """

  def __init__(self, eos_id: int = EOS_ID, pad_id: int = PAD_ID,
               detokenize: Optional[Callable[[Sequence[int]], str]] = None):
    """detokenize: token ids (EOS and padding stripped) -> text; None: none."""
    self._eos_id, self._pad_id = eos_id, pad_id
    self._detokenize = detokenize
    self._hyps: list[list[int]] = []
    self._refs: list[list[int]] = []

  def UseInput(self, input_generator: Any) -> None:
    """Detokenizes with the input's vocabulary (`vocab.Decode`), if it has one.

    Text inputs (tasks.text.text_input.TfdsTextInput) do; a `detokenize`
    given to the constructor wins.
    """
    vocab = getattr(input_generator, 'vocab', None)
    if self._detokenize is None and vocab is not None:
      self._detokenize = vocab.Decode

  def Update(self, decoded: NestedMap) -> None:
    hyp_ids, ref_ids = np.asarray(decoded.hyp_ids), np.asarray(decoded.ref_ids)
    if len(hyp_ids) != len(ref_ids):
      raise ValueError(f'SequenceDecodeMetrics: {len(hyp_ids)} hypotheses but '
                       f'{len(ref_ids)} references in one batch.')
    for hyp, ref in zip(hyp_ids, ref_ids):
      self._hyps.append(StripIds(hyp, self._eos_id, self._pad_id))
      self._refs.append(StripIds(ref, self._eos_id, self._pad_id))

  def Result(self) -> dict[str, float]:
    n = len(self._hyps)
    exact = sum(h == r for h, r in zip(self._hyps, self._refs))
    results = {TOKEN_BLEU: CorpusBleu(self._hyps, self._refs),
               'sequence_accuracy': exact / n if n else 0.0,
               'num_sequences': float(n)}
    if self._detokenize is not None:
      results[DETOK_BLEU], signature = _SacreBleu(
          [self._detokenize(h) for h in self._hyps],
          [self._detokenize(r) for r in self._refs])
      logging.log_first_n(
          logging.INFO, '%s is sacrebleu BLEU (%s) of detokenized text; %s is '
          'BLEU of token ids, not comparable with published results.', 1,
          DETOK_BLEU, signature, TOKEN_BLEU)
    return results
