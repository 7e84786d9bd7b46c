"""SubwordVocab: reserved ids, invertible encoding, save/load round trip."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tasks.text import vocab as vocab_lib

_CORPUS = ['the quick brown fox jumps over the lazy dog',
           'der schnelle braune Fuchs springt über den faulen Hund',
           'the dog sleeps; der Hund schläft.'] * 20


@pytest.fixture(scope='module')
def vocab():
  return vocab_lib.SubwordVocab.Build(_CORPUS, target_size=300)


def test_reserved_ids():
  assert (vocab_lib.PAD_ID, vocab_lib.EOS_ID, vocab_lib.SOS_ID) == (0, 1, 2)
  assert vocab_lib.NUM_RESERVED_IDS == 3


def test_encode_decode_round_trip(vocab):
  for text in _CORPUS[:3] + ['unseen wörds ✓ 123', '']:
    ids = vocab.Encode(text)
    assert all(vocab_lib.NUM_RESERVED_IDS <= i < vocab.size for i in ids)
    assert vocab.Decode(ids) == text
  # Learned subwords: a frequent word takes fewer ids than its characters.
  assert len(vocab.Encode('the quick brown fox')) < len('the quick brown fox')
  assert 256 + 3 < vocab.size <= 310


def test_decode_stops_at_eos_and_skips_padding_and_sos(vocab):
  ids = vocab.Encode('the lazy dog')
  framed = [vocab_lib.SOS_ID] + ids + [vocab_lib.EOS_ID] + vocab.Encode('x')
  assert vocab.Decode(framed + [vocab_lib.PAD_ID] * 3) == 'the lazy dog'


def test_save_load_round_trip(vocab, tmp_path):
  path = vocab.Save(str(tmp_path / 'sub' / 'wmt'))
  assert path.endswith('wmt.subwords')
  for name in (path, str(tmp_path / 'sub' / 'wmt')):
    loaded = vocab_lib.SubwordVocab.Load(name)
    assert loaded.size == vocab.size
    for text in _CORPUS[:3]:
      assert loaded.Encode(text) == vocab.Encode(text)


def test_load_rejects_missing_and_foreign_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.subwords'):
    vocab_lib.SubwordVocab.Load(str(tmp_path / 'nope'))
  tfds.deprecated.text.SubwordTextEncoder(['the_', 'dog_']).save_to_file(
      str(tmp_path / 'foreign'))
  with pytest.raises(ValueError, match=r"reserved tokens \['<EOS>', '<SOS>'\]"):
    vocab_lib.SubwordVocab.Load(str(tmp_path / 'foreign'))


def test_encode_tf_matches_encode_in_tf_data(vocab):
  ds = tf.data.Dataset.from_tensor_slices(_CORPUS[:3]).map(vocab.EncodeTf)
  assert ds.element_spec.shape.as_list() == [None]
  for text, ids in zip(_CORPUS[:3], ds):
    assert ids.dtype == tf.int32
    np.testing.assert_array_equal(ids.numpy(), vocab.Encode(text))
