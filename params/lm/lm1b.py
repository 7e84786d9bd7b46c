"""One Billion Word (tfds 'lm1b'): Transformer-L of GPipe Table 1.

d_model 2048, d_ff 8192, 32 heads, 32k vocabulary, untied; set the depth
with task.network.num_layers (Table 1: 3, 13, 103, 415, 1663 layers). The
paper's Pipeline-8 runs used 8 partitions and 32 micro-batches.

The 13 (or L) blocks are one Repeat layer (tasks/lm/model.py): its weights
are stacked: variables `lm1b.network.pipeline.layers_1.body.*` of shape
[L, ...] (checkpoint keys `.../pipeline/layers/1/body/...`) rather than one
`layers_<1+i>` per block, and the softmax is `layers_2`. Checkpoints written before Repeat restore with
`--params_override='task.network.stack_layers=False'`.

The pipeline runs on the loop executor (`executor='loop'`): its graph holds
each cell once however many micro-batches, where the unrolled executor's
holds K·M = 256 copies. At this shape with narrow blocks (d_model 32, 13
blocks, K=8, M=32; bench/results/graph_build_transformer_l.md) it traced
and ran its first step in 9.5 s against 171 s, at 0.9 GB peak RSS against
3.6 GB, and its steady step took 0.86× as long. Same numbers either way
(tests/params/lm1b_test.py); `--params_override=
"task.network.pipeline.executor='unrolled'"` gives the other. On TPU cores
(`--tpu`) it runs unrolled: XLA compiles a TPU step whole and cannot compile
the loop (lingvo_gpipe/core/gpipe/loop_executor.py).

At the depths of Pipeline-128 (1663 blocks), `--params_override=
'task.network.inline_stacked_body=false; train.graph_optimization=off'`
gets to the first step in a fraction of the time and memory, for slower
steps (bench/results/transformer_l_1663.md).
"""

from lingvo_gpipe import model_params
from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.nested_map import NestedMap
from tasks.lm import input_generator
from tasks.lm import model

_MAX_LEN = 256
_BATCH = 64


@model_registry.RegisterModel
class TransformerL(model_params.ModelParams):
  """Transformer-L, 13 layers (Table 1's single-accelerator GPipe column)."""

  def Task(self) -> hyperparams.Params:
    network = model.TransformerLParams(
        13, num_partitions=8, num_micro_batches=32, executor='loop',
        input_shapes=[NestedMap(ids=[_BATCH, _MAX_LEN],
                                paddings=[_BATCH, _MAX_LEN])])
    return model.LmTask.Params().Set(name='lm1b', network=network)

  def Train(self) -> hyperparams.Params:
    return super().Train().Set(optimizer='adam', learning_rate=1e-4,
                               max_steps=500000, clip_gradient_norm=1.0)

  def Input(self) -> hyperparams.Params:
    return input_generator.Lm1bInput.Params().Set(
        target_vocab_size=32000, max_len=_MAX_LEN, batch_size=_BATCH)
