"""ImageClassifier: a network that outputs logits, trained with cross-entropy.

Invariant: the loss is the mean (label-smoothed) cross-entropy of the main
logits, plus `aux_loss_weight` times that of the auxiliary head's logits when
the network has one, plus `weight_decay` · Σ ½‖w‖² over every conv and dense
kernel; every metric is weighted by the batch size.

The network (usually a PipeliningLayer whose last layer is the head) returns
either a logits tensor [b, num_classes] or a NestedMap with `logits` and
optionally `aux_logits` (AmoebaNet's head). Its input is, by
`network_input`, the image tensor or the whole batch NestedMap(image, label).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from lingvo_gpipe import base_task
from lingvo_gpipe.core.nested_map import NestedMap
from tasks import metrics

NETWORK_INPUTS = ('image', 'batch')

# Theta leaf names of the kernels weight decay applies to: Dense and Conv2D
# `w`, SeparableConv2D's two kernels. Biases, norms and embeddings are exempt.
KERNEL_NAMES = ('w', 'depthwise_w', 'pointwise_w')


class ImageClassifier(base_task.BaseTask):
  """Batches NestedMap(image [b, H, W, C] float, label [b] int) -> metrics."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('network_input', 'image', "What the network's FProp gets: "
             "'image' (the [b, H, W, C] tensor) or 'batch' (the whole "
             'NestedMap(image, label), e.g. for a network that passes keys '
             'through).')
    p.Define('label_smoothing', 0.0, 'ε in [0, 1): the target is '
             '(1 - ε)·one_hot + ε / num_classes (0.1 for AmoebaNet).')
    p.Define('aux_loss_weight', 0.4, 'Weight of the auxiliary head loss, '
             "used when the network outputs 'aux_logits'.")
    p.Define('weight_decay', 0.0, 'L2 factor λ: adds λ·Σ ½‖w‖² over conv and '
             f'dense kernels (theta leaves named {", ".join(KERNEL_NAMES)}) '
             'to the loss; 0 adds nothing.')
    p.Define('top_k', [1, 5], 'Report top{k}_accuracy for each k.')
    return p

  def __init__(self, params):
    p = params  # Checked before the (maybe large) network is built.
    if p.network_input not in NETWORK_INPUTS:
      raise ValueError(f'{p.name}: network_input={p.network_input!r}; '
                       f'valid: {", ".join(map(repr, NETWORK_INPUTS))}.')
    if p.aux_loss_weight < 0 or p.weight_decay < 0:
      raise ValueError(f'{p.name}: aux_loss_weight ({p.aux_loss_weight}) '
                       f'and weight_decay ({p.weight_decay}) must be >= 0.')
    super().__init__(params)

  def _Logits(self, outputs: Any) -> tuple[tf.Tensor, Any]:
    """(logits, aux_logits or None) from the network's outputs."""
    if isinstance(outputs, tf.Tensor):
      return outputs, None
    if isinstance(outputs, dict) and 'logits' in outputs:
      return outputs['logits'], outputs.get('aux_logits')
    keys = sorted(outputs) if isinstance(outputs, dict) else None
    raise ValueError(f'{self.path}: the network must return a logits tensor or '
                     "a NestedMap with 'logits' (and optionally 'aux_logits'); "
                     f'got {type(outputs).__name__}'
                     f'{f" with keys {keys}" if keys is not None else ""}.')

  def NetworkInputs(self, batch: NestedMap) -> Any:
    return batch.image if self.params.network_input == 'image' else batch

  def OutputMetrics(self, outputs: Any, batch: NestedMap) -> NestedMap:
    """loss, xent, log_pplx, top{k}_accuracy [, aux_xent]: weight decay aside."""
    p = self.params
    logits, aux_logits = self._Logits(outputs)
    labels = batch.label
    out = metrics.ClassificationMetrics(logits, labels, p.label_smoothing,
                                        p.top_k)
    loss, batch_size = out.xent
    if aux_logits is not None:
      out.aux_xent = metrics.ClassificationMetrics(
          aux_logits, labels, p.label_smoothing, top_k=()).xent
      loss += p.aux_loss_weight * out.aux_xent[0]
    out.loss = (loss, batch_size)
    return out

  def ComputeMetrics(self, theta: NestedMap, batch: NestedMap) -> NestedMap:
    """OutputMetrics, plus weight decay (of the whole network's weights)."""
    p = self.params
    out = super().ComputeMetrics(theta, batch)
    if p.weight_decay:
      loss, batch_size = out.loss
      decay = p.weight_decay * self.L2Norm(theta.network)
      out.weight_decay_loss = (decay, batch_size)
      out.loss = (loss + decay, batch_size)
    return out

  @staticmethod
  def L2Norm(theta: NestedMap) -> tf.Tensor:
    """Σ ½‖w‖² over the kernels in theta (leaves named in KERNEL_NAMES)."""
    kernels = [v for path, v in theta.FlattenItems()
               if path.rsplit('.', 1)[-1] in KERNEL_NAMES]
    if not kernels:
      return tf.constant(0.0)
    return tf.add_n([tf.nn.l2_loss(tf.convert_to_tensor(w)) for w in kernels])
