"""AmoebaNet on scikit-learn's bundled 8x8 digits: the default job, no download.

The data: 1797 digits, a fixed split (seed 0) of 1437 train / 360 test
(tasks/image/input_generator.DigitsInput). The network: a tiny AmoebaNet-D
with the small-image stem, cut into 2 cells of a GPipe pipeline with 4
micro-batches, so the default job exercises the whole pipeline on CPU.
"""

from lingvo_gpipe import model_params
from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams
from tasks.image import amoebanet
from tasks.image import classifier
from tasks.image import input_generator

_BATCH = 64


@model_registry.RegisterModel
class AmoebaNetTiny(model_params.ModelParams):
  """AmoebaNet-D (L=3, D=16) on 8x8 digits, 2 cells x 4 micro-batches."""

  def Task(self) -> hyperparams.Params:
    network = amoebanet.NetworkParams(
        3, 16, num_partitions=2, num_micro_batches=4, genotype='D',
        num_classes=10, image_size=8, input_channels=1, stem_type='basic',
        stem_filters=16, drop_path_keep_prob=1.0, batch_norm_decay=0.99,
        dense_dropout_keep_prob=0.9,
        input_shapes=[[_BATCH, 8, 8, 1]])
    return classifier.ImageClassifier.Params().Set(
        name='digits', network=network, label_smoothing=0.1,
        aux_loss_weight=0.0, top_k=[1])

  def Train(self) -> hyperparams.Params:
    return super().Train().Set(optimizer='adam', learning_rate=0.003,
                               max_steps=800, log_interval_steps=50,
                               save_interval_steps=200)

  def Input(self) -> hyperparams.Params:
    return input_generator.DigitsInput.Params().Set(batch_size=_BATCH)
