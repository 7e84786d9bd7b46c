"""The role each node of a pipeline's step plays, by its type and name.

Invariant: every node gets exactly one of ROLES, the first whose test it
passes, so counts by role add up to the step's node count
(bench/loop_census.py counts them). Kept apart from that script, which sets
up its process and defines flags when imported, so that tests can import it.
"""

from __future__ import annotations

import re
from typing import Optional

# In the order the census lists them.
ROLES = ('arithmetic', 'loop control flow', 'enter/exit (once a loop)',
         'cond control flow', 'sends and receives', 'arrays',
         'weight packing', 'gradient sums', 'constants', 'identities', 'other')
# Grappler fuses a chain of elementwise ops (Relu, Tanh, ...) into one
# _UnaryOpsComposition node where nothing reads the values in between.
_ARITHMETIC = re.compile(r'MatMul|Relu|BiasAdd|Tanh|UnaryOpsComposition')
# A lowered tf.while_loop's nodes, and each device's copy of its control
# loop that partitioning adds, are named under the loop's op.
_LOOP_NAME = re.compile(r'^(?:_cloop)?(while(?:_\d+)?)/')


def Loop(name: str) -> Optional[str]:
  """The loop (its op's name, 'while' or 'while_<n>') node `name` runs in, or None."""
  match = _LOOP_NAME.match(name)
  return match.group(1) if match else None


def Role(op: str, name: str) -> str:
  """The role of a node of type `op` named `name` in a pipeline's step."""
  in_cond = '/cond' in name
  if _ARITHMETIC.search(op):
    return 'arithmetic'
  if op in ('Enter', 'Exit'):
    return 'enter/exit (once a loop)'
  if op in ('_Send', '_Recv', '_HostSend', '_HostRecv'):
    return 'sends and receives'
  if (in_cond and op in ('Switch', 'Merge')) or re.search(
      r'pivot_[tf]|switch_pred|branch_executed', name):
    return 'cond control flow'
  if op in ('Merge', 'Switch', 'NextIteration', 'LoopCond') or (
      'loop_body_control' in name):
    return 'loop control flow'
  if op.startswith('TensorList'):
    return 'arrays'
  if op in ('SplitV', 'Reshape', 'ConcatV2') and in_cond:
    return 'weight packing'  # a packed cell's unpack and its gradients' pack
  if op in ('AddV2', 'AddN'):
    return 'gradient sums'
  if op == 'Const':
    return 'constants'
  if op == 'Identity':
    return 'identities'
  return 'other'
