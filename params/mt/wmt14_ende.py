"""WMT'14 English-German (tfds 'wmt14_translate/de-en'): Transformer-big, GPipe.

The GPipe paper's Transformer experiments pipelined Transformer-big sized
layers (d_model 1024, d_ff 4096 or 8192, 16 heads); here 6+6 layers over 4
partitions with 8 micro-batches (our choice where the paper is silent) and
a 32k subword vocabulary built from the training data.

Encoder and decoder blocks are each one Repeat layer (tasks/mt/model.py):
stacked variables `wmt14_ende.network.pipeline.layers_1.body.*` (encoder) and
`layers_3.body.*` (decoder) of shape [num_layers, ...] (checkpoint keys
`.../pipeline/layers/1/body/...`) instead of one `layers_<j>` per block.
Checkpoints written before Repeat restore with
`--params_override='task.network.stack_layers=False'`.

Eval (split 'test', newstest2014) reports two BLEUs: `sacrebleu_detok`,
sacrebleu's BLEU of the decoded German text, the figure to set beside WMT's
official results and other sacreBLEU scores (tokenized, compound-split BLEU
such as the Transformer paper's 28.4 runs higher); and `bleu_token_ids`,
BLEU of the subword ids, which follows training but depends on the
vocabulary. Both score a reference longer than max_tgt_len - 1 subwords
truncated. The subword vocabulary (tasks/mt/input_generator.py says why it
is tfds's deprecated SubwordTextEncoder) is learned from the training split.
"""

from lingvo_gpipe import model_params
from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams
from tasks.mt import input_generator
from tasks.mt import model

_VOCAB = 32000
_MAX_LEN = 128
_BATCH = 64


@model_registry.RegisterModel
class TransformerGPipe(model_params.ModelParams):
  """Transformer-big (6+6 layers, d 1024, d_ff 4096, 16 heads), 4 cells."""

  def Task(self) -> hyperparams.Params:
    network = model.TransformerParams(
        _VOCAB, _VOCAB, model_dim=1024, num_heads=16, hidden_dim=4096,
        num_layers=6, dropout=0.1, num_partitions=4, num_micro_batches=8,
        stack_layers=True,
        input_shapes=[model.NetworkInputShapes(_BATCH, _MAX_LEN, _MAX_LEN)])
    return model.MtTask.Params().Set(name='wmt14_ende', network=network,
                                     label_smoothing=0.1, max_decode_len=128)

  def Train(self) -> hyperparams.Params:
    return super().Train().Set(optimizer='adam', learning_rate=1e-4,
                               max_steps=300000, clip_gradient_norm=1.0)

  def Input(self) -> hyperparams.Params:
    return input_generator.Wmt14EnDeInput.Params().Set(
        target_vocab_size=_VOCAB, max_src_len=_MAX_LEN, max_tgt_len=_MAX_LEN,
        batch_size=_BATCH, eval_split='test')
