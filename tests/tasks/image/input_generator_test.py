"""Image inputs read real tfds data sets written to disk; digits split is fixed."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe import base_input_generator
from tasks.image import input_generator
from tests.tasks import tfds_fake

_CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
_CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


@pytest.fixture(scope='module')
def cifar10(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  train = tfds_fake.CifarExamples(6, 10, seed=1)
  test = tfds_fake.CifarExamples(5, 10, seed=2)
  tfds_fake.Prepare('cifar10', data_dir, {'train': train, 'test': test})
  return data_dir, train, test


def _Cifar10(data_dir, **kw):
  return input_generator.TfdsImageInput.Params().Set(
      dataset='cifar10', data_dir=str(data_dir), batch_size=4,
      **kw).Instantiate()


def _Pixels(image):
  """A normalized CIFAR-10 image back as uint8 pixels."""
  return np.round((image * _CIFAR10_STD + _CIFAR10_MEAN) * 255).astype(np.uint8)


def _Images(ds):
  return [(ex.image.numpy(), int(ex.label)) for ex in ds]


def test_cifar10_training_batches_are_static(cifar10):
  data_dir, _, _ = cifar10
  ds = _Cifar10(data_dir).Dataset('train', training=True)
  assert ds.element_spec.image.shape.as_list() == [4, 32, 32, 3]
  assert ds.element_spec.image.dtype == tf.float32
  assert ds.element_spec.label.shape.as_list() == [4]
  assert ds.element_spec.label.dtype == tf.int32
  for batch in ds.take(3):  # 6 examples: repeats past the first epoch.
    assert batch.image.shape == (4, 32, 32, 3)


def test_cifar10_eval_is_the_stored_images_normalized(cifar10):
  data_dir, _, test = cifar10
  gen = _Cifar10(data_dir)
  batches = list(gen.Dataset('test', training=False))
  assert [len(b.label) for b in batches] == [4, 1]
  stored = {ex['image'].tobytes(): ex['label'] for ex in test}
  got = {}
  for b in batches:
    for image, label in zip(b.image.numpy(), b.label.numpy()):
      got[_Pixels(image).tobytes()] = label
  assert got == stored
  assert gen.num_classes == 10 and gen.image_shape == (32, 32, 3)


def _ShiftsAndFlips(pixels, padding=4):
  """Every 32x32 crop of the zero-padded image, flipped or not."""
  padded = np.pad(pixels, [(padding, padding), (padding, padding), (0, 0)])
  for dy in range(2 * padding + 1):
    for dx in range(2 * padding + 1):
      crop = padded[dy:dy + 32, dx:dx + 32]
      yield crop
      yield crop[:, ::-1]


def test_cifar10_augmentation_pads_crops_and_flips_training_only(cifar10):
  data_dir, _, _ = cifar10
  gen = _Cifar10(data_dir)
  eval_1 = _Images(gen._Examples('train', training=False))
  eval_2 = _Images(gen._Examples('train', training=False))
  train_ds = gen._Examples('train', training=True)  # One shard: same order.
  train_1, train_2 = _Images(train_ds), _Images(train_ds)
  for (e1, l1), (e2, _), (t1, lt), (t2, _) in zip(eval_1, eval_2, train_1,
                                                  train_2):
    np.testing.assert_array_equal(e1, e2)
    assert l1 == lt
    # Augmented pixels: a shift (zeros filled in) and maybe a flip of the
    # stored ones; the normalized zero padding maps back to pixel 0.
    assert any(np.array_equal(_Pixels(t1), c)
               for c in _ShiftsAndFlips(_Pixels(e1)))
  changed = sum(not np.array_equal(e, t) for (e, _), (t, _) in
                zip(eval_1, train_1))
  assert changed >= len(eval_1) - 1  # An identity draw has odds 1/162.
  assert any(not np.array_equal(a, b) for (a, _), (b, _) in
             zip(train_1, train_2))  # New draws every epoch.
  unaugmented = _Images(_Cifar10(data_dir, augment=False)._Examples(
      'train', training=True))
  for (e, _), (u, _) in zip(eval_1, unaugmented):
    np.testing.assert_array_equal(e, u)


def test_cifar10_resizes_to_image_size(cifar10):
  data_dir, _, _ = cifar10
  ds = _Cifar10(data_dir, image_size=40).Dataset('train', training=True)
  assert ds.element_spec.image.shape.as_list() == [4, 40, 40, 3]
  next(iter(ds))


def test_cifar100_reads_fine_labels(tmp_path):
  examples = tfds_fake.CifarExamples(4, 100, seed=3, coarse_classes=20)
  for i, ex in enumerate(examples):
    ex['label'] = 90 + i
  tfds_fake.Prepare('cifar100', tmp_path, {'train': examples,
                                           'test': examples[:1]})
  gen = input_generator.TfdsImageInput.Params().Set(
      dataset='cifar100', data_dir=str(tmp_path)).Instantiate()
  (batch,) = gen.Dataset('train', training=False)
  assert sorted(batch.label.numpy()) == [90, 91, 92, 93]
  assert batch.image.shape == (4, 32, 32, 3) and gen.num_classes == 100


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
  """Validation's label 0: left third red, middle green, right third blue."""
  data_dir = tmp_path_factory.mktemp('tfds')
  thirds = np.zeros((32, 96, 3), np.uint8)
  thirds[:, :32, 0] = thirds[:, 32:64, 1] = thirds[:, 64:, 2] = 255
  rng = np.random.default_rng(0)
  noise = [{'image': rng.integers(0, 256, shape, dtype=np.uint8),
            'label': i + 1, 'file_name': f'{i}.JPEG'}
           for i, shape in enumerate([(48, 64, 3), (70, 40, 3)])]
  tfds_fake.Prepare('imagenet2012', data_dir, {
      'train': noise,
      'validation': [{'image': thirds, 'label': 0, 'file_name': 'a.JPEG'}] +
                    noise})
  return data_dir


def _ImageNet(data_dir, **kw):
  return input_generator.TfdsImageInput.Params().Set(
      dataset='imagenet2012', data_dir=str(data_dir), image_size=24,
      batch_size=2, **kw).Instantiate()


def test_imagenet_random_resized_crops_in_training(imagenet):
  train = _ImageNet(imagenet).Dataset('train', training=True)
  assert train.element_spec.image.shape.as_list() == [2, 24, 24, 3]
  first = next(iter(train)).image.numpy()
  again = next(iter(train)).image.numpy()
  assert not np.array_equal(first, again)


def test_imagenet_eval_center_crop_is_fixed_and_keeps_the_middle(imagenet):
  ds = _ImageNet(imagenet).Dataset('validation', training=False, batch_size=3)
  (batch,), (again,) = list(ds), list(ds)
  assert batch.image.shape == (3, 24, 24, 3)
  np.testing.assert_array_equal(batch.image, again.image)
  # The 0.875 center crop of a 3:1 image sees only its middle third: green.
  (image,) = batch.image.numpy()[batch.label.numpy() == 0]
  pixels = image * np.array([0.229, 0.224, 0.225]) + [0.485, 0.456, 0.406]
  np.testing.assert_allclose(pixels.mean(axis=(0, 1)), [0, 1, 0], atol=0.05)


def test_missing_cifar_raises_data_not_found(tmp_path):
  with pytest.raises(base_input_generator.DataNotFoundError,
                     match='tfds build cifar10'):
    _Cifar10(tmp_path / 'empty').Dataset('train', training=True)


def test_unknown_image_dataset_is_an_error():
  with pytest.raises(ValueError, match='cifar10, cifar100, imagenet2012'):
    input_generator.TfdsImageInput.Params().Set(dataset='mnist').Instantiate()


def _Digits(split, training, **kw):
  """All examples of `split` as [(image, label)], in order."""
  gen = input_generator.DigitsInput.Params().Set(**kw).Instantiate()
  (batch,) = gen._Examples(split, training).batch(2000)
  return list(zip(batch.image.numpy(), batch.label.numpy().tolist()))


def test_digits_split_is_fixed_and_disjoint():
  train, test = _Digits('train', False), _Digits('test', False)
  assert (len(train), len(test)) == (1437, 360)
  keys = lambda examples: {(x.tobytes(), y) for x, y in examples}
  # The digits data has a few duplicate images, hence <=.
  assert len(keys(train) & keys(test)) <= 2
  assert len(keys(train) | keys(test)) >= 1797 - 20
  image, label = test[0]
  assert image.shape == (8, 8, 1) and image.dtype == np.float32
  assert 0.0 <= image.min() and image.max() <= 1.0 and 0 <= label <= 9
  assert sorted({y for _, y in test}) == list(range(10))
  again = _Digits('test', False)
  assert all(np.array_equal(a, b) and la == lb
             for (a, la), (b, lb) in zip(test, again))


def test_digits_augmentation_is_off_by_default_and_shifts_when_on():
  plain = _Digits('train', False)
  assert all(np.array_equal(a, b) for (a, _), (b, _) in
             zip(plain, _Digits('train', True)))
  shifted = _Digits('train', True, augment=True)
  changed = sum(not np.array_equal(a, b) for (a, _), (b, _) in
                zip(plain, shifted))
  assert changed > len(plain) // 2
  assert [y for _, y in plain] == [y for _, y in shifted]


def test_digits_training_batches_are_static():
  gen = input_generator.DigitsInput.Params().Set(batch_size=32).Instantiate()
  ds = gen.Dataset('train', training=True)
  assert ds.element_spec.image.shape.as_list() == [32, 8, 8, 1]
  assert ds.element_spec.label.dtype == tf.int32
  with pytest.raises(ValueError, match="'train' and 'test'"):
    gen.Dataset('validation', training=False)


def test_digits_classes_keeps_those_digits_relabeled_in_order():
  everything = _Digits('test', False)
  high = _Digits('test', False, classes=[5, 6, 7, 8, 9])
  expected = [(x, y - 5) for x, y in everything if y >= 5]
  assert len(high) == len(expected) > 0
  assert all(np.array_equal(a, b) and la == lb
             for (a, la), (b, lb) in zip(high, expected))
  swapped = _Digits('test', False, classes=[9, 0])
  assert sorted({y for _, y in swapped}) == [0, 1]
  assert input_generator.DigitsInput.Params().Set(
      classes=[0, 1, 2, 3, 4]).Instantiate().num_classes == 5
  for bad in ([], [3, 3], [10], 'five'):
    with pytest.raises(ValueError, match=r'classes=.*distinct digits'):
      input_generator.DigitsInput.Params().Set(classes=bad).Instantiate()
