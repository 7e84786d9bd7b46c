"""Registry example: the smallest complete experiment config.

`example.toy.ToyRegression` exists to show (and test) how a config registers itself and where
its parts live: the network's Params at `task.network`, the training loop at `train`, the input
at `input`. It trains nothing useful; copy its shape for a real config.
"""

from lingvo_gpipe import model_params
from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams


@model_registry.RegisterModel
class ToyRegression(model_params.ModelParams):
  """A one-hidden-layer regression network on small vectors."""

  def Task(self) -> hyperparams.Params:
    network = hyperparams.Params()
    network.Define('input_dim', 4, 'Size of each input vector.')
    network.Define('hidden_dim', 8, 'Width of the hidden layer.')
    network.Define('output_dim', 1, 'Size of each regression target.')

    p = hyperparams.Params()
    p.Define('name', 'toy_regression', 'Name of the task.')
    p.Define('loss', 'mse', 'Training loss.')
    p.Define('network', network, 'The network being trained.')
    return p

  def Train(self) -> hyperparams.Params:
    p = super().Train()
    p.Set(learning_rate=0.01, max_steps=100)
    return p

  def Input(self) -> hyperparams.Params:
    p = super().Input()
    p.Set(batch_size=8)
    return p
