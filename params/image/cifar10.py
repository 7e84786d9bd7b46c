"""CIFAR-10 (tfds 'cifar10'): AmoebaNet-D from scratch, AmoebaNet-B fine-tuned. See params/image/cifar.py."""

from lingvo_gpipe import model_registry
from params.image import cifar


@model_registry.RegisterModel
class AmoebaNetD(cifar.AmoebaNetDCifar):
  """AmoebaNet-D (18, 128) at 32x32, 4 cells x 8 micro-batches, 10 classes."""

  NUM_CLASSES = 10
  DATASET = 'cifar10'


@model_registry.RegisterModel
class AmoebaNetB_Transfer(cifar.AmoebaNetBTransferCifar):  # pylint: disable=invalid-name
  """ImageNet AmoebaNet-B (18, 512) fine-tuned at 480x480: the paper's 99% setup."""

  NUM_CLASSES = 10
  DATASET = 'cifar10'
