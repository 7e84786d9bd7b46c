"""Image classification inputs: CIFAR-10/100 and ImageNet from tfds, and sklearn's digits.

Invariant: every example is NestedMap(image=float32 [H, W, C], label=int32 []),
with static H, W, C; eval examples are a fixed function of the stored image
(no randomness), training ones are augmented only when `augment` is set, with
randomness drawn from the generator's `seed`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from lingvo_gpipe import base_input_generator
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.nested_map import NestedMap
from tasks import tfds_input


@dataclasses.dataclass(frozen=True)
class _ImageSet:
  """What the preprocessing of one data set needs to know."""
  style: str  # 'cifar': pad-crop-flip; 'imagenet': random resized crop.
  image_size: int  # Native (CIFAR) or conventional (ImageNet) size.
  num_classes: int
  mean: tuple[float, float, float]  # Per channel, of pixels scaled to [0, 1].
  std: tuple[float, float, float]


_IMAGE_SETS = {
    'cifar10': _ImageSet('cifar', 32, 10, (0.4914, 0.4822, 0.4465),
                         (0.2470, 0.2435, 0.2616)),
    'cifar100': _ImageSet('cifar', 32, 100, (0.5071, 0.4865, 0.4409),
                          (0.2673, 0.2564, 0.2762)),
    'imagenet2012': _ImageSet('imagenet', 224, 1000, (0.485, 0.456, 0.406),
                              (0.229, 0.224, 0.225)),
}


def _WithSeeds(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
  """Pairs each element with a stateless-op seed [2]; new ones every epoch."""
  seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
  return tf.data.Dataset.zip(ds, seeds.batch(2))


def _PadAndRandomCrop(image: tf.Tensor, padding: int,
                      seed: tf.Tensor) -> tf.Tensor:
  """A random shift of up to `padding` pixels, zeros filling in."""
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.image.stateless_random_crop(padded, tf.shape(image), seed)


class TfdsImageInput(tfds_input.TfdsInput):
  """CIFAR-10, CIFAR-100 or ImageNet (ILSVRC-2012) from tfds, as in GPipe.

  Preprocessing, eval: CIFAR images as stored; ImageNet images resized so the
  shorter side is image_size / eval_crop_fraction (256 for 224), then the
  center image_size square. Training with `augment`: CIFAR pads by
  crop_padding pixels, crops 32x32 at random and flips left-right at random;
  ImageNet crops a random box of min_crop_area..1 of the image with aspect
  ratio in aspect_ratio_range, resizes it to image_size and flips at random.
  Then pixels are scaled to [0, 1] and normalized per channel by mean and std
  (CIFAR images are resized to image_size first when it is not 32).
  Splits: 'train' and 'test' (CIFAR), 'train' and 'validation' (ImageNet).
  """

  @classmethod
  def Params(cls) -> hyperparams.InstantiableParams:
    p = super().Params()
    p.dataset = 'cifar10'
    p.Define('image_size', None, 'Output height and width; None: the data '
             "set's (32 for CIFAR, 224 for ImageNet).")
    p.Define('augment', True, 'Augment training images (eval never is).')
    p.Define('crop_padding', 4, 'CIFAR: pixels of zero padding before the '
             'random 32x32 crop.')
    p.Define('min_crop_area', 0.08, 'ImageNet: smallest random crop, as a '
             'fraction of the image area.')
    p.Define('aspect_ratio_range', (3 / 4, 4 / 3), 'ImageNet: range of the '
             'random crop width / height.')
    p.Define('eval_crop_fraction', 0.875, 'ImageNet eval: the center crop '
             'side over the resized shorter side (224/256).')
    p.Define('mean', None, "Per-channel mean of [0, 1] pixels; None: the "
             "data set's.")
    p.Define('std', None, "Per-channel std of [0, 1] pixels; None: the data "
             "set's.")
    return p

  def __init__(self, params: hyperparams.InstantiableParams):
    super().__init__(params)
    p = self.params
    name = p.dataset.split(':')[0]
    if name not in _IMAGE_SETS:
      raise hyperparams.ConfigError(f'dataset={p.dataset!r}; TfdsImageInput reads '
                                    f'{", ".join(sorted(_IMAGE_SETS))}.')
    self._set = _IMAGE_SETS[name]
    self._size = p.image_size or self._set.image_size
    self._mean = tf.constant(p.mean or self._set.mean, tf.float32)
    self._std = tf.constant(p.std or self._set.std, tf.float32)

  @property
  def num_classes(self) -> int:
    return self._set.num_classes

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self._size, self._size, 3)

  def _Examples(self, split: str, training: bool) -> tf.data.Dataset:
    ds = self._Read(split, training)
    if training and self.params.augment:
      return _WithSeeds(ds, self.params.seed).map(
          self._Preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(self._Preprocess, num_parallel_calls=tf.data.AUTOTUNE)

  def _Preprocess(self, example: dict[str, tf.Tensor],
                  seed: tf.Tensor | None = None) -> NestedMap:
    """One tfds example as NestedMap(image, label); augmented if seeded."""
    image = tf.image.convert_image_dtype(example['image'], tf.float32)
    if self._set.style == 'cifar':
      image = self._Cifar(image, seed)
    else:
      image = self._ImageNet(image, seed)
    image = (image - self._mean) / self._std
    return NestedMap(image=tf.ensure_shape(image, self.image_shape),
                     label=tf.cast(example['label'], tf.int32))

  def _Cifar(self, image: tf.Tensor, seed: tf.Tensor | None) -> tf.Tensor:
    if seed is not None:
      crop_seed, flip_seed = tf.unstack(
          tf.random.experimental.stateless_split(seed, 2))
      image = _PadAndRandomCrop(image, self.params.crop_padding, crop_seed)
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if self._size != self._set.image_size:
      image = tf.image.resize(image, [self._size, self._size])
    return image

  def _ImageNet(self, image: tf.Tensor, seed: tf.Tensor | None) -> tf.Tensor:
    p, size = self.params, self._size
    if seed is None:
      shape = tf.cast(tf.shape(image)[:2], tf.float32)
      resize_to = size / p.eval_crop_fraction
      scaled = tf.cast(tf.round(shape * resize_to / tf.reduce_min(shape)),
                       tf.int32)
      image = tf.image.resize(image, tf.maximum(scaled, size))
      return tf.image.resize_with_crop_or_pad(image, size, size)
    box_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))
    begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=box_seed, min_object_covered=p.min_crop_area,
        aspect_ratio_range=p.aspect_ratio_range,
        area_range=(p.min_crop_area, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.image.resize(tf.slice(image, begin, box_size), [size, size])
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


# The split of the 1797 digits: a permutation from this seed; its first
# _DIGITS_TEST indices are 'test', the rest 'train'.
_DIGITS_SEED = 0
_DIGITS_TEST = 360


class DigitsInput(base_input_generator.BaseInputGenerator):
  """The 8x8 handwritten digits bundled with scikit-learn (1797 images, 10 classes).

  Split, fixed: `np.random.RandomState(0).permutation(1797)`; its first 360
  indices are 'test', the other 1437 'train' (in that order). Images are
  [8, 8, 1] float32 with pixels scaled from 0..16 to [0, 1]; labels int32.
  With `augment`, training images are shifted by up to shift_pixels pixels at
  random (zeros fill in); no flips, which would change digits. Needs no
  download, so `data_dir` is ignored. With `classes`, only those digits are
  kept, relabeled by their position in it (classes=[5, 6, 7, 8, 9]: digit 5
  is label 0), for a classifier of len(classes) outputs.
  """

  @classmethod
  def Params(cls) -> hyperparams.InstantiableParams:
    p = super().Params()
    p.Define('augment', False, 'Randomly shift training images.')
    p.Define('shift_pixels', 1, 'Largest random shift, in pixels.')
    p.Define('classes', None, 'Digits to keep, e.g. [5, 6, 7, 8, 9], '
             'relabeled 0..len-1 in this order; None: all ten, as they are.')
    return p

  image_shape = (8, 8, 1)

  def __init__(self, params: hyperparams.InstantiableParams):
    super().__init__(params)
    classes = self.params.classes
    if classes is not None and (
        not isinstance(classes, (list, tuple)) or not classes or
        len(set(classes)) != len(classes) or
        not all(isinstance(c, int) and 0 <= c <= 9 for c in classes)):
      raise hyperparams.ConfigError(
          f'{self.params.name}: classes={classes!r}; a list of distinct digits '
          '0..9 (e.g. [5, 6, 7, 8, 9]), or None for all ten.')

  @property
  def num_classes(self) -> int:
    classes = self.params.classes
    return 10 if classes is None else len(classes)

  def _Examples(self, split: str, training: bool) -> tf.data.Dataset:
    p = self.params
    images, labels = _DigitsSplit(split)
    if p.classes is not None:
      keep = np.isin(labels, p.classes)
      relabel = np.full(10, -1, np.int32)
      relabel[list(p.classes)] = np.arange(len(p.classes), dtype=np.int32)
      images, labels = images[keep], relabel[labels[keep]]
    ds = tf.data.Dataset.from_tensor_slices(
        NestedMap(image=images, label=labels))
    if not (training and p.augment):
      return ds
    return _WithSeeds(ds, p.seed).map(
        lambda ex, seed: NestedMap(
            image=_PadAndRandomCrop(ex.image, p.shift_pixels, seed),
            label=ex.label),
        num_parallel_calls=tf.data.AUTOTUNE)


def _DigitsSplit(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images [n, 8, 8, 1] float32 in [0, 1], labels [n] int32) of `split`."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  order = np.random.RandomState(_DIGITS_SEED).permutation(len(digits.target))
  indices = {'test': order[:_DIGITS_TEST], 'train': order[_DIGITS_TEST:]}
  if split not in indices:
    raise hyperparams.ConfigError(f"split={split!r}; DigitsInput has 'train' and 'test'.")
  images = (digits.images / 16.0).astype(np.float32)[..., np.newaxis]
  return images[indices[split]], digits.target[indices[split]].astype(np.int32)
