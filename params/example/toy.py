"""Registry example: the smallest complete experiment config.

`example.toy.ToyRegression` shows how a config registers itself and where its
parts live: the network's Params at `task.network` (its pipeline at
`task.network.pipeline`), the training loop at `train`, the input at `input`.
It trains in seconds (an MLP through a 2-cell pipeline on generated data), so
the trainer's tests run it; copy its shape for a real config.
"""

from lingvo_gpipe import model_params
from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams
from tasks.example import input_generator
from tasks.example import regression

_INPUT_DIM = 4
_BATCH = 16


@model_registry.RegisterModel
class ToyRegression(model_params.ModelParams):
  """A 2-hidden-layer MLP, 2 cells x 2 micro-batches, on y = tanh(x·W)."""

  def Task(self) -> hyperparams.Params:
    network = regression.MlpNetwork.Params().Set(
        input_dim=_INPUT_DIM, hidden_dim=8, output_dim=1)
    network.pipeline.Set(num_partitions=2, num_micro_batches=2)
    return regression.RegressionTask.Params().Set(name='toy_regression',
                                                  network=network)

  def Train(self) -> hyperparams.Params:
    return super().Train().Set(optimizer='adam', learning_rate=0.01,
                               max_steps=100, log_interval_steps=20,
                               save_interval_steps=50)

  def Input(self) -> hyperparams.Params:
    return input_generator.SyntheticRegressionInput.Params().Set(
        input_dim=_INPUT_DIM, batch_size=_BATCH, shuffle_buffer=512)
