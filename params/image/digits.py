"""AmoebaNet on scikit-learn's bundled 8x8 digits: the default job, no download.

The data: 1797 digits, a fixed split (seed 0) of 1437 train / 360 test
(tasks/image/input_generator.DigitsInput). The network: a tiny AmoebaNet-D
with the small-image stem, cut into 2 cells of a GPipe pipeline with 4
micro-batches, so the default job exercises the whole pipeline on CPU.

Transfer learning in miniature (bench/transfer_digits.py): `Pretrain04`
learns digits 0-4; `FineTune59` starts from its checkpoint (every network
weight but the classifier's dense layer, which is new) and learns digits
5-9. Both have 5-class heads: the input keeps the five digits and relabels
them 0-4 (DigitsInput.classes), so the classifier layers have the same
shape and the new head is new by exclusion (train.warm_start[0].exclude),
as a head of another class count would be.
"""

from lingvo_gpipe import model_params
from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams
from params.image import transfer
from tasks.image import amoebanet
from tasks.image import classifier
from tasks.image import input_generator

_BATCH = 64
# Where `Pretrain04` is expected to have run (README's transfer workflow);
# override train.warm_start[0].checkpoint for another.
PRETRAIN_LOGDIR = '/tmp/lingvo_gpipe/digits04'


@model_registry.RegisterModel
class AmoebaNetTiny(model_params.ModelParams):
  """AmoebaNet-D (L=3, D=16) on 8x8 digits, 2 cells x 4 micro-batches."""

  NUM_CLASSES = 10
  BATCH_NORM_DECAY = 0.99

  def Task(self) -> hyperparams.Params:
    network = amoebanet.NetworkParams(
        3, 16, num_partitions=2, num_micro_batches=4, genotype='D',
        num_classes=self.NUM_CLASSES, image_size=8, input_channels=1,
        stem_type='basic', stem_filters=16, drop_path_keep_prob=1.0,
        batch_norm_decay=self.BATCH_NORM_DECAY, dense_dropout_keep_prob=0.9,
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


@model_registry.RegisterModel
class Pretrain04(AmoebaNetTiny):
  """AmoebaNetTiny on digits 0-4 only (a 5-class head): the source of FineTune59.

  BatchNorm's moving averages decay at 0.9 (not 0.99): runs of a few hundred
  steps then evaluate with settled statistics (our choice).
  """

  NUM_CLASSES = 5
  BATCH_NORM_DECAY = 0.9

  def Train(self) -> hyperparams.Params:
    return super().Train().Set(max_steps=300, save_interval_steps=100)

  def Input(self) -> hyperparams.Params:
    return super().Input().Set(classes=[0, 1, 2, 3, 4])


@model_registry.RegisterModel
class FineTune59(AmoebaNetTiny):
  """A new 5-class head on digits 5-9, the rest warm-started from Pretrain04.

  Few steps at a lower rate, as fine-tuning goes; from scratch the same
  steps leave the model far behind (bench/results/transfer_digits.md).
  """

  NUM_CLASSES = 5
  BATCH_NORM_DECAY = 0.9

  def Train(self) -> hyperparams.Params:
    p = super().Train().Set(learning_rate=0.001, max_steps=30,
                            log_interval_steps=10, save_interval_steps=30)
    p.warm_start = [transfer.FineTuneParams(PRETRAIN_LOGDIR,
                                            self.Task().network)]
    return p

  def Input(self) -> hyperparams.Params:
    return super().Input().Set(classes=[5, 6, 7, 8, 9])
