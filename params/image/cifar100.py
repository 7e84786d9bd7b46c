"""CIFAR-100 (tfds 'cifar100'): AmoebaNet-D from scratch, AmoebaNet-B fine-tuned. See params/image/cifar.py."""

from lingvo_gpipe import model_registry
from params.image import cifar


@model_registry.RegisterModel
class AmoebaNetD(cifar.AmoebaNetDCifar):
  """AmoebaNet-D (18, 128) at 32x32, 4 cells x 8 micro-batches, 100 classes."""

  NUM_CLASSES = 100
  DATASET = 'cifar100'


@model_registry.RegisterModel
class AmoebaNetB_Transfer(cifar.AmoebaNetBTransferCifar):  # pylint: disable=invalid-name
  """ImageNet AmoebaNet-B (18, 512) fine-tuned at 480x480: the paper's 91.3% setup."""

  NUM_CLASSES = 100
  DATASET = 'cifar100'
