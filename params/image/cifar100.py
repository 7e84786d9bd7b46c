"""CIFAR-100 (tfds 'cifar100'): AmoebaNet-D, pipelined. See params/image/cifar.py."""

from lingvo_gpipe import model_registry
from params.image import cifar


@model_registry.RegisterModel
class AmoebaNetD(cifar.AmoebaNetDCifar):
  """AmoebaNet-D (18, 128) at 32x32, 4 cells x 8 micro-batches, 100 classes."""

  NUM_CLASSES = 100
  DATASET = 'cifar100'
