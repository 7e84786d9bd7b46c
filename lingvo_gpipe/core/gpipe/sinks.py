"""Sinks: scalar tokens that stand for a cell's weights in the pipeline's custom gradient.

Invariant: no tensor leaves its cell's device for the tape's sake. A
`tf.custom_gradient` passes all its arguments through one IdentityN op on
the caller's device; given every cell's weights it would copy them all there
each step (across worker processes, the whole model over the network). So
the pipeline op takes one scalar token per cell instead, made by a sink on
that cell's device from the cell's theta; the sink's gradient hands the tape
the theta gradients that the pipeline's backward computed on that device
(and likewise for the inputs, on the first cell's device).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import tensorflow as tf


class Sinks:
  """Tokens for groups of tensors; `Fill` gives each group its gradients."""

  def __init__(self):
    self._grads: dict[str, list] = {}
    self.tokens: list[tf.Tensor] = []

  def Token(self, key: str, tensors: Sequence[tf.Tensor],
            scope: contextlib.AbstractContextManager) -> tf.Tensor:
    """A scalar standing for `tensors`, made under `scope` (the group's device)."""

    @tf.custom_gradient
    def Sink(*args):
      del args  # only their gradients matter, filled in by the pipeline
      return tf.zeros([]), lambda unused_dtoken: list(self._grads[key])

    with scope:
      token = Sink(*tensors)
    self.tokens.append(token)
    return token

  def Fill(self, key: str, grads: Sequence) -> None:
    """The gradients of group `key`'s tensors (None where they get none)."""
    self._grads[key] = list(grads)

  def TokenGradients(self) -> list[tf.Tensor]:
    """What the pipeline op returns for its tokens: nothing flows through them."""
    return [tf.zeros([]) for _ in self.tokens]
