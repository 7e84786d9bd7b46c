"""The MT eval reports sacrebleu's detokenized BLEU beside BLEU of subword ids.

EvalProgram runs a tiny MtTask over WMT'14 pairs written locally in tfds
format (no download); the eval input's subword vocabulary turns hypotheses
and references back into text, which sacrebleu scores as the field does.
"""

import pytest
import sacrebleu
import tensorflow as tf

from lingvo_gpipe import eval_program
from lingvo_gpipe import model_params
from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import summary
from lingvo_gpipe.core.nested_map import NestedMap
from tasks.mt import input_generator
from tasks.mt import model
from tests.tasks import tfds_fake

_PAIRS = [('the house is small', 'das Haus ist klein.'),
          ('the house is big', 'das Haus ist groß.'),
          ('i see the dog', 'ich sehe den Hund, der das Haus sieht.'),
          ('the dog sees the house', 'der Hund sieht das Haus!'),
          ('the small dog', 'der kleine Hund')]
_LEN = 16


@pytest.fixture(scope='module')
def wmt(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  examples = [{'en': en, 'de': de} for en, de in _PAIRS]
  tfds_fake.Prepare('wmt14_translate/de-en', data_dir, {
      'train': examples * 3, 'validation': examples[:1], 'test': examples})
  return data_dir


class _TinyWmt(model_params.ModelParams):
  """A one-block Transformer on the local WMT'14 pairs."""

  def __init__(self, data_dir, vocab_file):
    self._input = input_generator.Wmt14EnDeInput.Params().Set(
        data_dir=str(data_dir), vocab_file=vocab_file, target_vocab_size=300,
        max_src_len=_LEN, max_tgt_len=_LEN, batch_size=4, eval_split='test')
    # Builds and saves the vocabulary, which the eval's input then loads.
    self._vocab_size = self._input.Instantiate().vocab.size

  def Task(self):
    network = model.TransformerParams(
        self._vocab_size, self._vocab_size, model_dim=16, num_heads=2,
        hidden_dim=32, num_layers=1, dropout=0.0)
    return model.MtTask.Params().Set(name='mt', network=network,
                                     max_decode_len=_LEN)

  def Input(self):
    return self._input.Copy()


def _Program(wmt, tmp_path):
  params = _TinyWmt(wmt, str(tmp_path / 'ende')).Model()
  return eval_program.EvalProgram(params, str(tmp_path),
                                  params.task.Instantiate())


def _Texts(program, decode):
  """(hypotheses, references) as text, from `decode(batch)` over the split."""
  vocab = program.input.vocab
  hyps, refs = [], []
  for batch in program.input.Dataset('test', training=False):
    decoded = decode(batch)
    hyps += [vocab.Decode(ids) for ids in decoded.hyp_ids.numpy()]
    refs += [vocab.Decode(ids) for ids in decoded.ref_ids.numpy()]
  return hyps, refs


def test_mt_eval_reports_detokenized_and_token_bleu(wmt, tmp_path):
  program = _Program(wmt, tmp_path)
  results = program.Evaluate(step=3)
  assert results['num_sequences'] == len(_PAIRS)
  assert 0.0 <= results['bleu_token_ids'] <= 100.0
  assert 'bleu' not in results  # renamed: it is not comparable BLEU
  task = program.task

  def Decode(batch):
    with base_layer.Context(training=False):
      return task.Decode(task.theta, batch)

  hyps, refs = _Texts(program, Decode)
  # References are the data set's German text itself, punctuation included.
  assert sorted(refs) == sorted(de for _, de in _PAIRS)
  assert results['sacrebleu_detok'] == pytest.approx(
      sacrebleu.corpus_bleu(hyps, [refs]).score)
  written = summary.ReadEvents(program.directory)
  assert written['sacrebleu_detok'][0][0] == 3
  assert written['bleu_token_ids'][0][0] == 3


def test_mt_eval_scores_the_decoded_text(wmt, tmp_path):
  program = _Program(wmt, tmp_path)

  def RefsAsHyps(theta, batch):
    del theta
    labels = batch.tgt.labels
    ref_ids = tf.where(batch.tgt.paddings > 0.5, tf.zeros_like(labels), labels)
    return NestedMap(hyp_ids=ref_ids, ref_ids=ref_ids)

  program.task.Decode = RefsAsHyps
  results = program.Evaluate(step=1)
  assert results['sacrebleu_detok'] == pytest.approx(100.0)
  assert results['bleu_token_ids'] == pytest.approx(100.0)

  def OtherRowsAsHyps(theta, batch):
    # Each hypothesis is another pair's reference: partly right.
    decoded = RefsAsHyps(theta, batch)
    decoded.hyp_ids = tf.roll(decoded.hyp_ids, 1, axis=0)
    return decoded

  program = _Program(wmt, tmp_path / 'other')
  program.task.Decode = OtherRowsAsHyps
  results = program.Evaluate(step=1)
  hyps, refs = _Texts(program, lambda batch: OtherRowsAsHyps(None, batch))
  expected = sacrebleu.corpus_bleu(hyps, [refs]).score
  assert 0.0 < expected < 100.0
  assert results['sacrebleu_detok'] == pytest.approx(expected)
