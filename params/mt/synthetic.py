"""A tiny Transformer on a generated copy/reverse/sort task: no download.

tasks/mt/input_generator.SyntheticSeqInput makes the pairs from a seed;
`input.task` picks copy (default), reverse or sort.

Its 2+2 blocks are listed one by one (stack_layers=False): stacked in Repeat
layers its first step took 20 s against 11 s listed, at the same step time,
and depth is not what this config is for (tasks/transformer_network.py).
"""

from lingvo_gpipe import model_params
from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams
from tasks.mt import input_generator
from tasks.mt import model

_NUM_SYMBOLS = 16
_VOCAB = _NUM_SYMBOLS + 3  # padding, EOS, SOS
_MAX_LEN = 16  # symbols; sequences are one longer (EOS / SOS)
_BATCH = 64


@model_registry.RegisterModel
class TransformerTiny(model_params.ModelParams):
  """2+2 layers, d_model 64, 2 cells x 4 micro-batches."""

  def Task(self) -> hyperparams.Params:
    network = model.TransformerParams(
        _VOCAB, _VOCAB, model_dim=64, num_heads=4, hidden_dim=256,
        num_layers=2, dropout=0.0, num_partitions=2, num_micro_batches=4,
        input_shapes=[model.NetworkInputShapes(_BATCH, _MAX_LEN + 1,
                                               _MAX_LEN + 1)])
    return model.MtTask.Params().Set(name='synthetic', network=network,
                                     max_decode_len=18)

  def Train(self) -> hyperparams.Params:
    return super().Train().Set(optimizer='adam', learning_rate=1e-3,
                               max_steps=1000, log_interval_steps=100,
                               save_interval_steps=500)

  def Input(self) -> hyperparams.Params:
    return input_generator.SyntheticSeqInput.Params().Set(
        task='copy', num_symbols=_NUM_SYMBOLS, max_len=_MAX_LEN,
        batch_size=_BATCH)
