r"""Steady step of loop designs the loop executor did not take, in one process.

The loop executor (lingvo_gpipe/core/gpipe/loop_executor.py) runs fill-drain
as one `tf.while_loop` over clocks spanning all K devices. On cells of a few
tiny layers its step is 1.4-1.9× the unrolled executor's. This measures two
ideas for where that gap comes from, each as a small stand-alone version of
the same training step (16 × Dense(64) relu, K=4 cells of 4 layers on 4
logical CPU devices, batch 64, recompute always, loss mean(y²)):

  per_cell_loops        one loop per cell, on the cell's own device, over the
                        micro-batches; FIFO queues carry activations forward
                        and gradients backward from cell to cell (the loops
                        run concurrently, blocked on their queues); weights
                        and gradient sums packed into one tensor a cell, as
                        the loop executor packs them. No clock spans devices,
                        no `cond`, no bubble clocks.
  per_cell_loops_calls  the same, each cell's forward and backward a function
                        called out of line (its own executor per call).
  plain_unrolled        the unrolled step written directly (no library).
  plain_unrolled_with_loops
                        the same plus a three-iteration loop on each device:
                        whether merely having control flow in a device's
                        graph slows its ops.

beside the library's own executors (`unrolled`, the reference of the ratios,
and `loop`). All variants alternate in rounds, so a drifting machine slows
them alike; quote the median ratio.

  python -m bench.loop_alternatives --micro_batches=8,64 --write_results
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

from bench import tf_setup

tf_setup.Setup()  # before TensorFlow loads: log noise, TensorFlow's own allocator

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np
import tensorflow as tf

from bench import common
from lingvo_gpipe.core.gpipe import placement
from lingvo_gpipe.tools import stacks

_MICRO_BATCHES = flags.DEFINE_list('micro_batches', '8,64', 'Values of M.')
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Alternating rounds.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per variant per round.')
_WRITE_RESULTS = flags.DEFINE_bool('write_results', False, 'Write the table '
                                   'to bench/results/loop_alternatives.md.')

K, LAYERS_PER_CELL, DIM, BATCH = 4, 4, 64, 64
REFERENCE = 'unrolled'


class _Cells:
  """K cells of Dense(DIM) relu layers, their weights packed per cell."""

  def __init__(self, devices: list[str]):
    rng = np.random.default_rng(0)
    self.devices = devices
    self.sizes = [DIM * DIM, DIM] * LAYERS_PER_CELL
    self.weights = []
    for device in devices:
      with tf.device(device):
        self.weights.append(tf.Variable(
            rng.normal(size=[sum(self.sizes)]).astype(np.float32) * 0.2))

  def Unpack(self, flat: tf.Tensor) -> list[tf.Tensor]:
    parts = tf.split(flat, self.sizes)
    return [tf.reshape(p, [DIM, DIM]) if i % 2 == 0 else p
            for i, p in enumerate(parts)]

  def Forward(self, x: tf.Tensor, flat: tf.Tensor) -> tf.Tensor:
    ws = self.Unpack(flat)
    for layer in range(LAYERS_PER_CELL):
      x = tf.nn.relu(tf.nn.bias_add(tf.matmul(x, ws[2 * layer]),
                                    ws[2 * layer + 1]))
    return x

  def Backward(self, x: tf.Tensor, flat: tf.Tensor, dy: tf.Tensor
               ) -> tuple[tf.Tensor, tf.Tensor]:
    """Recomputes the cell's forward; (dx, d flat weights)."""
    with tf.GradientTape() as tape:
      tape.watch([x, flat])
      y = self.Forward(x, flat)
    return tuple(tape.gradient(y, [x, flat], output_gradients=dy))


def _PlainUnrolled(cells: _Cells, m: int, with_loops: bool) -> Callable:
  """Every micro-batch's forward, then every backward, written out."""

  @tf.function(autograph=False)
  def Step(x):
    extra = []
    for device in cells.devices if with_loops else ():
      with tf.device(device):  # a loop whose trip count Grappler cannot fold
        trips = 3 * tf.cast(tf.reduce_sum(x) > -1e30, tf.int32)
        extra.append(tf.while_loop(lambda i, n=trips: i < n, lambda i: i + 1,
                                   [tf.constant(0)])[0])
    inputs = [[None] * m for _ in range(K)]
    outputs = []
    for mb, h in enumerate(tf.split(x, m)):
      for k in range(K):
        with tf.device(cells.devices[k]):
          inputs[k][mb] = h
          h = cells.Forward(h, cells.weights[k])
      outputs.append(h)
    with tf.device(cells.devices[-1]):
      y = tf.concat(outputs, 0)
      loss = tf.reduce_mean(tf.square(y))
      if extra:
        loss += 0.0 * tf.cast(tf.add_n(extra), tf.float32)
      dys = tf.split(2.0 * y / tf.cast(tf.size(y), tf.float32), m)
    sums = [None] * K
    for mb in reversed(range(m)):
      g = dys[mb]
      for k in reversed(range(K)):
        with tf.device(cells.devices[k]):
          g, dw = cells.Backward(inputs[k][mb], cells.weights[k], g)
          sums[k] = dw if sums[k] is None else sums[k] + dw
    return loss, tf.add_n([tf.reduce_sum(s) for s in sums])

  return Step


def _Handle(queue: tf.queue.FIFOQueue) -> tf.queue.QueueBase:
  """`queue` through a handle of its own, on the queue's device.

  tf.function orders ops that share a resource in program order: with one
  handle, each cell's loop would wait for the previous cell's to finish.
  """
  with tf.device(queue.queue_ref.device):
    ref = tf.raw_ops.IdentityN(input=[queue.queue_ref])[0]
  return tf.queue.QueueBase(queue.dtypes, queue.shapes, queue.names, ref)


def _PerCellLoops(cells: _Cells, m: int, calls: bool) -> Callable:
  """One loop per cell on its device; queues between neighbouring cells."""
  rows = BATCH // m
  spec = [rows, DIM]
  forward_q, backward_q = [], []
  for device in cells.devices:
    with tf.device(device):  # capacity m: a producer never blocks
      forward_q.append(tf.queue.FIFOQueue(m, [tf.float32], shapes=[spec]))
      backward_q.append(tf.queue.FIFOQueue(m, [tf.float32], shapes=[spec]))
  forward, backward = cells.Forward, cells.Backward
  if calls:
    noinline = {'_noinline': True}
    forward = tf.function(forward, autograph=False,
                          experimental_attributes=noinline)
    backward = tf.function(backward, autograph=False,
                           experimental_attributes=noinline)

  def Array(size):
    return tf.TensorArray(tf.float32, size, element_shape=spec)

  @tf.function(autograph=False)
  def Step(x):
    with tf.device(cells.devices[0]):
      first_inputs = Array(m).unstack(tf.reshape(x, [m] + spec))
    kept, outputs = [], None
    for k in range(K):
      with tf.device(cells.devices[k]):
        flat = tf.convert_to_tensor(cells.weights[k])
        inq = _Handle(forward_q[k]) if k else None
        outq = _Handle(forward_q[k + 1]) if k < K - 1 else None

        def Body(mb, inputs, outs, k=k, flat=flat, inq=inq, outq=outq):
          h = tf.ensure_shape(first_inputs.read(mb) if k == 0
                              else inq.dequeue(), spec)
          inputs = inputs.write(mb, h)
          y = forward(h, flat)
          if outq is None:
            outs = outs.write(mb, y)
          else:
            with tf.control_dependencies([outq.enqueue(y)]):
              mb = tf.identity(mb)
          return mb + 1, inputs, outs

        _, inputs, outs = tf.while_loop(
            lambda mb, *_: mb < m, Body,
            (tf.constant(0), Array(m), Array(m if k == K - 1 else 1)),
            parallel_iterations=1)
        kept.append(inputs)
        outputs = outs
    with tf.device(cells.devices[-1]):
      y = tf.reshape(outputs.stack(), [BATCH, DIM])
      loss = tf.reduce_mean(tf.square(y))
      dys = Array(m).unstack(tf.reshape(2.0 * y / tf.cast(tf.size(y),
                                                          tf.float32),
                                        [m] + spec))
    sums = []
    for k in reversed(range(K)):
      with tf.device(cells.devices[k]):
        flat = tf.convert_to_tensor(cells.weights[k])
        inq = _Handle(backward_q[k]) if k < K - 1 else None
        outq = _Handle(backward_q[k - 1]) if k else None

        def BackBody(mb, total, k=k, flat=flat, inq=inq, outq=outq):
          g = tf.ensure_shape(dys.read(mb) if inq is None else inq.dequeue(),
                              spec)
          dx, dw = backward(kept[k].read(mb), flat, g)
          if outq is not None:
            with tf.control_dependencies([outq.enqueue(dx)]):
              mb = tf.identity(mb)
          return mb - 1, total + dw

        _, total = tf.while_loop(lambda mb, _: mb >= 0, BackBody,
                                 (tf.constant(m - 1), tf.zeros_like(flat)),
                                 parallel_iterations=1)
        sums.append(tf.reduce_sum(total))
    return loss, tf.add_n(sums)

  return Step


def _LibraryStep(devices: list[str], m: int, executor: str) -> Callable:
  layers, _, _ = stacks.DenseStack(K * LAYERS_PER_CELL, DIM, BATCH)
  return common.TrainStep(common.BuildPipeline(layers, K, m, 'always',
                                               devices, executor=executor),
                          plain=False)


def Measure(m: int, devices: list[str]) -> dict[str, list[float]]:
  """Per variant, its step over the reference's, one ratio per round."""
  cells = _Cells(devices)
  steps = {
      REFERENCE: _LibraryStep(devices, m, 'unrolled'),
      'loop': _LibraryStep(devices, m, 'loop'),
      'per_cell_loops': _PerCellLoops(cells, m, calls=False),
      'per_cell_loops_calls': _PerCellLoops(cells, m, calls=True),
      'plain_unrolled': _PlainUnrolled(cells, m, with_loops=False),
      'plain_unrolled_with_loops': _PlainUnrolled(cells, m, with_loops=True),
  }
  x = tf.random.stateless_normal([BATCH, DIM], [1, 2])
  reference_loss = None
  for name in ('plain_unrolled', 'per_cell_loops', 'per_cell_loops_calls',
               'plain_unrolled_with_loops'):
    loss, total = (t.numpy() for t in steps[name](x))
    if reference_loss is None:
      reference_loss, reference_total = loss, total
    # The same numbers as the plain unrolled step, or the timing means nothing.
    np.testing.assert_allclose([loss, total],
                               [reference_loss, reference_total], rtol=1e-4)
  for step in steps.values():  # trace and warm up
    common.RunOnce(step, x)
  ratios = {name: [] for name in steps}
  names = list(steps)
  for r in range(_ROUNDS.value):
    order = names if r % 2 == 0 else names[::-1]
    times = {}
    for name in order:
      times[name] = statistics.median(
          common.RunOnce(steps[name], x)[0] for _ in range(_STEPS.value))
    for name in names:
      ratios[name].append(times[name] / times[REFERENCE])
    print(f'M={m} round {r}: ' + ', '.join(
        f'{n} {times[n] * 1e3:.1f} ms' for n in names), flush=True)
  return ratios


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  facts = common.MachineFacts()
  devices = placement.SplitCpu(K)
  micro_batches = [int(v) for v in _MICRO_BATCHES.value]
  bad = [m for m in micro_batches if m < 1 or BATCH % m]
  if bad:
    raise app.UsageError(f'--micro_batches: {bad} do not divide the batch '
                         f'of {BATCH}; use divisors of {BATCH}.')
  results = {m: Measure(m, devices) for m in micro_batches}
  names = list(next(iter(results.values())))
  rows = [[name] + [f'{statistics.median(results[m][name]):.2f} '
                    f'({min(results[m][name]):.2f}–'
                    f'{max(results[m][name]):.2f})' for m in micro_batches]
          for name in names]
  body = common.MarkdownTable(
      ['variant'] + [f'step / unrolled at M={m}, median (range)'
                     for m in micro_batches], rows)
  print(body)
  if _WRITE_RESULTS.value:
    config = {
        'model': f'{K * LAYERS_PER_CELL} × Dense({DIM}, relu), batch '
                 f'{BATCH}, recompute always, loss mean(y²)',
        'pipeline': f'K={K} cells of {LAYERS_PER_CELL} layers on {K} logical '
                    'CPU devices, one process',
        'variants': 'see the module docstring of bench/loop_alternatives.py; '
                    'unrolled and loop are the library executors',
        'timing': f'{_ROUNDS.value} rounds, the variants in alternating order, '
                  f'a variant\'s median of {_STEPS.value} steps a round over '
                  "the same round's unrolled step",
        'load average at end (1, 5, 15 min)': common.LoadAverage(),
    }
    path = common.WriteResults(
        'loop_alternatives.md', 'Steady step of loop designs not taken',
        'python -m bench.loop_alternatives ' + ' '.join(sys.argv[1:]), facts,
        config, body)
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
