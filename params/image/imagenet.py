"""ImageNet 2012 (tfds 'imagenet2012', manual download): the paper's AmoebaNets.

AmoebaNet-B (18, 512), 557M parameters, is the paper's 84.3% top-1 model,
trained at 480x480 on 4 partitions; AmoebaNet-D (18, 208), 82M, is the
largest that fit one 8 GB accelerator without GPipe. Micro-batch counts are
not stated for these runs; 8 is our choice.
"""

from lingvo_gpipe import model_params
from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams
from tasks.image import amoebanet
from tasks.image import classifier
from tasks.image import input_generator

_BATCH = 64


class _ImageNet(model_params.ModelParams):
  """Base: GENOTYPE, (L, D), IMAGE_SIZE and partitions set by subclasses."""

  GENOTYPE, NUM_CELLS, NUM_FILTERS = 'D', 18, 208
  IMAGE_SIZE, NUM_PARTITIONS, NUM_MICRO_BATCHES = 224, 1, 8

  def Task(self) -> hyperparams.Params:
    network = amoebanet.NetworkParams(
        self.NUM_CELLS, self.NUM_FILTERS, genotype=self.GENOTYPE,
        num_partitions=self.NUM_PARTITIONS,
        num_micro_batches=self.NUM_MICRO_BATCHES, num_classes=1000,
        image_size=self.IMAGE_SIZE, stem_type='imagenet', use_aux_head=True,
        drop_path_keep_prob=0.7, dense_dropout_keep_prob=0.5,
        input_shapes=[[_BATCH, self.IMAGE_SIZE, self.IMAGE_SIZE, 3]])
    return classifier.ImageClassifier.Params().Set(
        name='imagenet', network=network, label_smoothing=0.1,
        aux_loss_weight=0.4, weight_decay=4e-5)

  def Train(self) -> hyperparams.Params:
    # RMSProp as the AmoebaNet and GPipe papers trained.
    return super().Train().Set(optimizer='rmsprop', learning_rate=0.256,
                               momentum=0.9, max_steps=250000)

  def Input(self) -> hyperparams.Params:
    return input_generator.TfdsImageInput.Params().Set(
        dataset='imagenet2012', image_size=self.IMAGE_SIZE, batch_size=_BATCH,
        eval_split='validation')


@model_registry.RegisterModel
class AmoebaNetB_18_512(_ImageNet):  # pylint: disable=invalid-name
  """AmoebaNet-B (18, 512) at 480x480 on 4 partitions: 557M parameters."""

  GENOTYPE, NUM_CELLS, NUM_FILTERS = 'B', 18, 512
  IMAGE_SIZE, NUM_PARTITIONS = 480, 4


@model_registry.RegisterModel
class AmoebaNetD_18_208(_ImageNet):  # pylint: disable=invalid-name
  """AmoebaNet-D (18, 208) at 224x224: 82M parameters, one accelerator."""

  GENOTYPE, NUM_CELLS, NUM_FILTERS = 'D', 18, 208
  IMAGE_SIZE, NUM_PARTITIONS = 224, 1
