"""AmoebaNet-D on CIFAR-10/100 (tfds), the GPipe paper's transfer targets.

The paper fine-tuned ImageNet-trained AmoebaNet-B (18, 512) on CIFAR at a
larger resolution; these configs train AmoebaNet-D from scratch at 32x32
with the small-image stem (our choice; the paper gives no such setting), in
4 cells of a pipeline with 8 micro-batches. Data: `tfds build cifar10`.
"""

from lingvo_gpipe import model_params
from lingvo_gpipe.core import hyperparams
from tasks.image import amoebanet
from tasks.image import classifier
from tasks.image import input_generator

_BATCH = 128


class AmoebaNetDCifar(model_params.ModelParams):
  """Base of the CIFAR configs: NUM_CLASSES and DATASET differ."""

  NUM_CLASSES = 10
  DATASET = 'cifar10'

  def Task(self) -> hyperparams.Params:
    network = amoebanet.NetworkParams(
        18, 128, num_partitions=4, num_micro_batches=8, genotype='D',
        num_classes=self.NUM_CLASSES, image_size=32, stem_type='basic',
        use_aux_head=True, drop_path_keep_prob=0.7,
        dense_dropout_keep_prob=0.5, input_shapes=[[_BATCH, 32, 32, 3]])
    return classifier.ImageClassifier.Params().Set(
        name=self.DATASET, network=network, label_smoothing=0.1,
        aux_loss_weight=0.4, weight_decay=5e-4)

  def Train(self) -> hyperparams.Params:
    return super().Train().Set(optimizer='momentum', learning_rate=0.1,
                               momentum=0.9, max_steps=100000)

  def Input(self) -> hyperparams.Params:
    return input_generator.TfdsImageInput.Params().Set(
        dataset=self.DATASET, batch_size=_BATCH)
