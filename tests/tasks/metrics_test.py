"""Tests of tasks/metrics.py against values computed by hand."""

import math

import numpy as np
import pytest
import sacrebleu
import tensorflow as tf

from lingvo_gpipe.core.nested_map import NestedMap
from tasks import metrics
from tasks.text import vocab as vocab_lib


def test_smoothed_xent():
  # p = softmax([0, log 3]) = [1/4, 3/4].
  logits = tf.constant([[0.0, math.log(3.0)]])
  labels = tf.constant([1])
  nll = -math.log(0.75)
  np.testing.assert_allclose(metrics.SmoothedXent(logits, labels), [nll],
                             rtol=1e-6)
  # ε = 0.2: 0.8·nll − 0.2·mean(log p).
  smoothed = 0.8 * nll - 0.2 * (math.log(0.25) + math.log(0.75)) / 2
  np.testing.assert_allclose(metrics.SmoothedXent(logits, labels, 0.2),
                             [smoothed], rtol=1e-6)
  # Uniform logits: log C with or without smoothing.
  uniform = tf.zeros([3, 5])
  np.testing.assert_allclose(
      metrics.SmoothedXent(uniform, tf.constant([0, 2, 4]), 0.3),
      [math.log(5.0)] * 3, rtol=1e-6)
  with pytest.raises(ValueError, match='label_smoothing is 1.0'):
    metrics.SmoothedXent(logits, labels, 1.0)


def test_in_top_k():
  logits = tf.constant([[0.1, 0.5, 0.2, 0.9],
                        [0.3, 0.3, 0.3, 0.1],
                        [4.0, 3.0, 2.0, 1.0]])
  labels = tf.constant([2, 1, 3])
  # Row 0: label 2 has 2 larger logits (0.5, 0.9): rank 3.
  # Row 1: a tie at the top counts as in the top 1.
  # Row 2: label 3 is last: rank 4.
  np.testing.assert_array_equal(metrics.InTopK(logits, labels, 1), [0, 1, 0])
  np.testing.assert_array_equal(metrics.InTopK(logits, labels, 2), [0, 1, 0])
  np.testing.assert_array_equal(metrics.InTopK(logits, labels, 3), [1, 1, 0])
  np.testing.assert_array_equal(metrics.InTopK(logits, labels, 5), [1, 1, 1])


def test_classification_metrics():
  logits = tf.constant([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
  out = metrics.ClassificationMetrics(logits, tf.constant([0, 1]), 0.1,
                                      top_k=(1, 2))
  assert sorted(out) == ['log_pplx', 'top1_accuracy', 'top2_accuracy', 'xent']
  for value, weight in out.values():
    assert float(weight) == 2.0
  assert float(out.top1_accuracy[0]) == 0.5  # row 1's label is not the max
  # Row 1's label ties with class 0 behind the max: in the top 2.
  assert float(out.top2_accuracy[0]) == 1.0
  log_p = tf.nn.log_softmax(logits).numpy()
  np.testing.assert_allclose(out.log_pplx[0], -(log_p[0, 0] + log_p[1, 1]) / 2,
                             rtol=1e-6)


def test_sequence_metrics_skip_padded_tokens():
  # 2 sequences of 3 tokens over a vocabulary of 3; the last token of row 1
  # is padded, so 5 tokens count.
  big = 10.0
  logits = tf.constant([[[big, 0, 0], [0, big, 0], [0, 0, big]],
                        [[big, 0, 0], [big, 0, 0], [0, 0, big]]])
  labels = tf.constant([[0, 1, 1], [0, 2, 1]])
  paddings = tf.constant([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  out = metrics.SequenceMetrics(logits, labels, paddings)
  assert sorted(out) == ['log_pplx', 'loss', 'token_accuracy']
  # Correct: (0,0), (0,1), (1,0); wrong: (0,2), (1,1); (1,2) padded.
  assert float(out.token_accuracy[0]) == pytest.approx(3 / 5)
  assert float(out.token_accuracy[1]) == 5.0
  right = math.log(1 + 2 * math.exp(-big))  # -log p of the max class
  wrong = big + right
  np.testing.assert_allclose(out.log_pplx[0], (3 * right + 2 * wrong) / 5,
                             rtol=1e-5)
  np.testing.assert_allclose(out.loss[0], out.log_pplx[0])
  smoothed = metrics.SequenceMetrics(logits, labels, paddings, 0.1)
  assert float(smoothed.loss[0]) > float(smoothed.log_pplx[0])
  np.testing.assert_allclose(smoothed.log_pplx[0], out.log_pplx[0])


def test_strip_ids():
  assert metrics.StripIds([5, 6, 1, 7, 0]) == [5, 6]
  assert metrics.StripIds(np.array([5, 0, 0])) == [5]
  assert metrics.StripIds([1, 5]) == []
  assert metrics.StripIds([5, 6, 7]) == [5, 6, 7]


def test_bleu_perfect_match_is_100():
  refs = [[3, 4, 5, 6, 7], [8, 9, 10, 11]]
  assert metrics.CorpusBleu(refs, refs) == pytest.approx(100.0)


def test_bleu_clips_repeated_ngrams():
  # Papineni et al.'s example: 'the the the the the the the' against 'the cat
  # is on the mat': 'the' counts at most twice, p_1 = 2/7; c = 7 > r = 6, so
  # no brevity penalty. No bigram matches, so BLEU-4 is 0.
  the, cat, is_, on, mat = 3, 4, 5, 6, 7
  hyp, ref = [the] * 7, [the, cat, is_, on, the, mat]
  assert metrics.CorpusBleu([hyp], [ref], max_order=1) == pytest.approx(
      100 * 2 / 7)
  assert metrics.CorpusBleu([hyp], [ref]) == 0.0


def test_bleu_brevity_penalty():
  # A 5-token prefix of an 8-token reference: every precision is 1, so BLEU
  # is the brevity penalty exp(1 - 8/5) = 0.5488.
  ref = [3, 4, 5, 6, 7, 8, 9, 10]
  assert metrics.CorpusBleu([ref[:5]], [ref]) == pytest.approx(
      100 * math.exp(-0.6))
  # One token longer than the reference: no penalty, p_n = (9-n)/(10-n).
  longer = ref + [11]
  p = [8 / 9, 7 / 8, 6 / 7, 5 / 6]
  assert metrics.CorpusBleu([longer], [ref]) == pytest.approx(
      100 * math.prod(p) ** 0.25)


def test_bleu_sums_counts_over_the_corpus():
  # Sentence 1 alone has no 4-gram match (BLEU 0), but the corpus does:
  #   s1: [1 2 3 4] vs [1 2 3 5]: matches 3/4, 2/3, 1/2, 0/1
  #   s2: identical 5 tokens:     matches 5/5, 4/4, 3/3, 2/2
  # p = 8/9, 6/7, 4/5, 2/3; c = r = 9, so BP = 1.
  hyps = [[11, 12, 13, 14], [16, 17, 18, 19, 20]]
  refs = [[11, 12, 13, 15], [16, 17, 18, 19, 20]]
  assert metrics.CorpusBleu(hyps[:1], refs[:1]) == 0.0
  expected = 100 * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25  # 79.84
  assert metrics.CorpusBleu(hyps, refs) == pytest.approx(expected)
  assert expected == pytest.approx(79.8408, abs=1e-3)


def test_bleu_edge_cases():
  assert metrics.CorpusBleu([[]], [[3, 4]]) == 0.0
  assert metrics.CorpusBleu([], []) == 0.0
  with pytest.raises(ValueError, match='2 hypotheses but 1 references'):
    metrics.CorpusBleu([[3], [4]], [[3]])


def test_sequence_decode_metrics():
  m = metrics.SequenceDecodeMetrics()
  # EOS (1) and padding (0) end a sequence; what follows is ignored.
  m.Update(NestedMap(hyp_ids=np.array([[5, 6, 7, 8, 1, 9], [5, 5, 1, 0, 0, 0]]),
                     ref_ids=np.array([[5, 6, 7, 8, 1], [5, 6, 1, 0, 0]])))
  m.Update(NestedMap(hyp_ids=np.array([[9, 9, 9, 9, 0, 0]]),
                     ref_ids=np.array([[9, 9, 9, 9, 1]])))
  result = m.Result()
  assert result['sequence_accuracy'] == pytest.approx(2 / 3)
  assert result['num_sequences'] == 3.0
  hyps = [[5, 6, 7, 8], [5, 5], [9, 9, 9, 9]]
  refs = [[5, 6, 7, 8], [5, 6], [9, 9, 9, 9]]
  assert result['bleu_token_ids'] == pytest.approx(
      metrics.CorpusBleu(hyps, refs))
  assert 0 < result['bleu_token_ids'] < 100
  assert 'sacrebleu_detok' not in result  # no detokenizer: ids only
  assert metrics.SequenceDecodeMetrics().Result()['sequence_accuracy'] == 0.0


def test_detokenized_bleu_of_identical_text_is_100():
  text = ['Das Haus ist klein.', 'Ich sehe den Hund, der das Haus sieht!']
  assert metrics.DetokenizedBleu(text, text) == pytest.approx(100.0)


def test_detokenized_bleu_is_sacrebleus_corpus_bleu():
  hyps = ['the cat sat on a mat.', 'It rained all day, and we stayed in.']
  refs = ['the cat sat on the mat.', 'It rained all day; we stayed inside.']
  direct = sacrebleu.corpus_bleu(hyps, [refs]).score
  assert metrics.DetokenizedBleu(hyps, refs) == pytest.approx(direct)
  # sacrebleu's one-sentence example: p = 6/7, 4/6, 2/5, 1/4 and BP = 1
  # (13a splits off the final '.').
  assert metrics.DetokenizedBleu(hyps[:1], refs[:1]) == pytest.approx(
      100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4)**0.25)
  assert metrics.DetokenizedBleu([], []) == 0.0
  with pytest.raises(ValueError, match='2 hypotheses but 1 references'):
    metrics.DetokenizedBleu(hyps, refs[:1])


def _Decoded(vocab, hyps, refs, length=12):
  """NestedMap(hyp_ids, ref_ids) of texts: ids + EOS, padded to `length`."""

  def Ids(texts):
    rows = [vocab.Encode(t) + [vocab_lib.EOS_ID] for t in texts]
    return np.array([r + [vocab_lib.PAD_ID] * (length - len(r)) for r in rows])

  return NestedMap(hyp_ids=Ids(hyps), ref_ids=Ids(refs))


def test_sequence_decode_metrics_report_detokenized_bleu_beside_token_bleu():
  refs = ['the house is small.', 'I see the dog, which sees the house.']
  hyps = ['the house is big.', 'I see the dog, which sees the house.']
  vocab = vocab_lib.SubwordVocab.Build(refs * 5, target_size=300)

  class TextInput:  # what UseInput reads of a text input generator
    pass

  text_input = TextInput()
  text_input.vocab = vocab
  m = metrics.SequenceDecodeMetrics()
  m.UseInput(text_input)
  m.Update(_Decoded(vocab, hyps, refs, length=40))
  result = m.Result()
  assert result['sacrebleu_detok'] == pytest.approx(
      sacrebleu.corpus_bleu(hyps, [refs]).score)
  assert 0 < result['sacrebleu_detok'] < 100
  assert 0 < result['bleu_token_ids'] < 100
  # Identical text: both are 100.
  m = metrics.SequenceDecodeMetrics(detokenize=vocab.Decode)
  m.Update(_Decoded(vocab, refs, refs, length=40))
  assert m.Result()['sacrebleu_detok'] == pytest.approx(100.0)
  assert m.Result()['bleu_token_ids'] == pytest.approx(100.0)
  # An input without a vocabulary (synthetic symbols) gives token BLEU only;
  # a detokenizer given to the constructor wins over the input's vocabulary.
  m = metrics.SequenceDecodeMetrics()
  m.UseInput(object())
  assert 'sacrebleu_detok' not in m.Result()
  m = metrics.SequenceDecodeMetrics(
      detokenize=lambda ids: 'the same text for any ids')
  m.UseInput(text_input)
  m.Update(_Decoded(vocab, hyps, refs, length=40))
  assert m.Result()['sacrebleu_detok'] == pytest.approx(100.0)
