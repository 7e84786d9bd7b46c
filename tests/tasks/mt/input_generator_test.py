"""MT inputs: WMT'14 read from a real tfds data set on disk; synthetic tasks."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe import base_input_generator
from tasks.mt import input_generator
from tasks.text import vocab as vocab_lib
from tests.tasks import tfds_fake

_PAIRS = [('the house is small', 'das Haus ist klein'),
          ('the house is big', 'das Haus ist groß'),
          ('i see the dog', 'ich sehe den Hund'),
          ('the dog sees the house', 'der Hund sieht das Haus')]
_LONG = ('this very long english sentence does not fit the source length at all',
         'kurz')


@pytest.fixture(scope='module')
def wmt(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  examples = lambda pairs: [{'en': en, 'de': de} for en, de in pairs]
  tfds_fake.Prepare('wmt14_translate/de-en', data_dir, {
      'train': examples(_PAIRS * 3 + [_LONG]),
      'validation': examples(_PAIRS[:1]),
      'test': examples(_PAIRS + [_LONG])})
  return data_dir


def _Wmt(data_dir, **kw):
  kw = dict(dict(data_dir=str(data_dir), target_vocab_size=300, max_src_len=12,
                 max_tgt_len=12, batch_size=4), **kw)
  return input_generator.Wmt14EnDeInput.Params().Set(**kw).Instantiate()


def test_wmt_examples_frame_source_and_target(wmt, tmp_path):
  vocab_file = str(tmp_path / 'ende')
  gen = _Wmt(wmt, vocab_file=vocab_file)
  batches = list(gen.Dataset('test', training=False))
  assert [len(b.src.ids) for b in batches] == [4, 1]  # Every pair, once.
  vocab = gen.vocab
  seen = set()
  for b in batches:
    for i in range(len(b.src.ids)):
      src_ids, tgt_ids, labels = (b.src.ids[i].numpy(), b.tgt.ids[i].numpy(),
                                  b.tgt.labels[i].numpy())
      src_len = int(np.sum(1 - b.src.paddings[i].numpy()))
      tgt_len = int(np.sum(1 - b.tgt.paddings[i].numpy()))
      assert src_ids[src_len - 1] == vocab_lib.EOS_ID
      assert not src_ids[src_len:].any() and not labels[tgt_len:].any()
      assert tgt_ids[0] == vocab_lib.SOS_ID
      assert labels[tgt_len - 1] == vocab_lib.EOS_ID
      np.testing.assert_array_equal(tgt_ids[1:tgt_len], labels[:tgt_len - 1])
      seen.add((vocab.Decode(src_ids), vocab.Decode(labels)))
  # The long source is truncated in eval, not dropped.
  assert seen - set(_PAIRS) == {(vocab.Decode(vocab.Encode(_LONG[0])[:11]),
                                 _LONG[1])}
  # The vocabulary was saved, and a new generator loads it.
  assert tf.io.gfile.exists(vocab_file + '.subwords')
  again = _Wmt(wmt, vocab_file=vocab_file, target_vocab_size=1000)
  assert again.vocab.size == vocab.size


def test_wmt_training_batches_are_static_and_drop_long_pairs(wmt):
  gen = _Wmt(wmt)
  ds = gen.Dataset('train', training=True)
  spec = ds.element_spec
  assert spec.src.ids.shape.as_list() == [4, 12]
  assert spec.src.paddings.shape.as_list() == [4, 12]
  for leaf in (spec.tgt.ids, spec.tgt.labels, spec.tgt.paddings):
    assert leaf.shape.as_list() == [4, 12]
  assert spec.src.ids.dtype == tf.int32 and spec.tgt.paddings.dtype == tf.float32
  sources = {gen.vocab.Decode(ids) for b in ds.take(6) for ids in b.src.ids}
  assert sources == {en for en, _ in _PAIRS}  # 24 draws, never the long one.


def test_wmt_translates_the_other_way_and_checks_languages(wmt):
  gen = _Wmt(wmt, source_language='de', target_language='en')
  (batch,) = gen.Dataset('validation', training=False)
  assert gen.vocab.Decode(batch.src.ids[0]) == _PAIRS[0][1]
  with pytest.raises(ValueError, match=r"'fr' is not a feature.*\['de', 'en'\]"):
    _Wmt(wmt, target_language='fr').vocab


def test_wmt_missing_data_raises(tmp_path):
  with pytest.raises(base_input_generator.DataNotFoundError,
                     match='tfds build wmt14_translate/de-en'):
    _Wmt(tmp_path).Dataset('train', training=True)


def _Synthetic(split, **kw):
  gen = input_generator.SyntheticSeqInput.Params().Set(
      split_sizes={'train': 64, 'test': 16}, max_len=8, **kw).Instantiate()
  (batch,) = gen._Examples(split, training=False).batch(100)
  return batch


def _Tokens(ids, paddings, drop_first=False, drop_last=False):
  n = int(np.sum(1 - paddings))
  return list(ids[int(drop_first):n - int(drop_last)])


@pytest.mark.parametrize('task,fn', [('copy', list),
                                     ('reverse', lambda t: t[::-1]),
                                     ('sort', sorted)])
def test_synthetic_targets_are_the_task_of_the_sources(task, fn):
  batch = _Synthetic('train', task=task)
  lengths = []
  for i in range(len(batch.src.ids)):
    src = _Tokens(batch.src.ids[i].numpy(), batch.src.paddings[i].numpy(),
                  drop_last=True)
    tgt_in = _Tokens(batch.tgt.ids[i].numpy(), batch.tgt.paddings[i].numpy(),
                     drop_first=True)
    labels = _Tokens(batch.tgt.labels[i].numpy(),
                     batch.tgt.paddings[i].numpy(), drop_last=True)
    assert labels == tgt_in == fn(src)
    assert all(3 <= t < 19 for t in src)
    lengths.append(len(src))
  assert min(lengths) >= 1 and max(lengths) <= 8 and len(set(lengths)) > 3


def test_synthetic_is_deterministic_and_train_differs_from_test():
  train, again, test = _Synthetic('train'), _Synthetic('train'), _Synthetic('test')
  np.testing.assert_array_equal(train.src.ids, again.src.ids)
  assert len(test.src.ids) == 16
  assert not np.array_equal(train.src.ids[:16], test.src.ids)
  reseeded = _Synthetic('train', split_seeds={'train': 7, 'test': 2})
  assert not np.array_equal(train.src.ids, reseeded.src.ids)


def test_synthetic_training_batches_are_static():
  gen = input_generator.SyntheticSeqInput.Params().Set(
      batch_size=8, max_len=5, task='sort').Instantiate()
  ds = gen.Dataset('train', training=True)
  assert ds.element_spec.src.ids.shape.as_list() == [8, 6]
  assert ds.element_spec.tgt.labels.shape.as_list() == [8, 6]
  assert gen.vocab_size == 19
  with pytest.raises(ValueError, match="task='shuffle'"):
    input_generator.SyntheticSeqInput.Params().Set(task='shuffle').Instantiate()
