"""LM inputs: lm1b read from a real tfds data set on disk."""

import numpy as np
import pytest

from lingvo_gpipe import base_input_generator
from tasks.lm import input_generator
from tasks.text import vocab as vocab_lib
from tests.tasks import tfds_fake

_SENTENCES = ['the cat sat on the mat .', 'a dog barked at the cat .',
              'the mat was red .']
_LONG = 'this sentence is far too long to fit in the sequence length used here .'


@pytest.fixture(scope='module')
def lm1b(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  tfds_fake.Prepare('lm1b', data_dir, {
      'train': [{'text': t} for t in _SENTENCES * 4 + [_LONG]],
      'test': [{'text': t} for t in _SENTENCES + [_LONG]]})
  return data_dir


def _Lm1b(data_dir, **kw):
  # One vocabulary file per data set: built by the first generator, loaded
  # by the others.
  return input_generator.Lm1bInput.Params().Set(
      data_dir=str(data_dir), vocab_file=str(data_dir / 'vocab'),
      target_vocab_size=300, max_len=10, batch_size=2, **kw).Instantiate()


def test_lm1b_ids_are_labels_shifted_right(lm1b):
  gen = _Lm1b(lm1b)
  batches = list(gen.Dataset('test', training=False))
  assert [len(b.ids) for b in batches] == [2, 2]
  texts = set()
  for b in batches:
    for ids, labels, paddings in zip(b.ids.numpy(), b.labels.numpy(),
                                     b.paddings.numpy()):
      n = int(np.sum(1 - paddings))
      assert ids[0] == vocab_lib.SOS_ID and labels[n - 1] == vocab_lib.EOS_ID
      np.testing.assert_array_equal(ids[1:n], labels[:n - 1])
      assert not ids[n:].any() and not labels[n:].any()
      texts.add(gen.vocab.Decode(labels))
  long_ids = gen.vocab.Encode(_LONG)
  assert len(long_ids) > 9
  assert texts == set(_SENTENCES) | {gen.vocab.Decode(long_ids[:9])}


def test_lm1b_training_batches_are_static_and_drop_long_sentences(lm1b):
  gen = _Lm1b(lm1b)
  ds = gen.Dataset('train', training=True)
  for leaf in ds.element_spec.values():
    assert leaf.shape.as_list() == [2, 10]
  texts = {gen.vocab.Decode(l) for b in ds.take(10) for l in b.labels}
  assert texts == set(_SENTENCES)
  truncating = _Lm1b(lm1b, drop_long_in_training=False)
  texts = {truncating.vocab.Decode(l) for b in truncating.Dataset(
      'train', training=True).take(20) for l in b.labels}
  assert len(texts) == 4


def test_lm1b_missing_data_raises(tmp_path):
  with pytest.raises(base_input_generator.DataNotFoundError,
                     match='tfds build lm1b'):
    _Lm1b(tmp_path).Dataset('train', training=True)
