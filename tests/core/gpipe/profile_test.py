"""Tests of per-layer profiling and the time/memory partition methods."""

import pytest
import tensorflow as tf

from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.gpipe import profile
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import embedding

def _Layers(widths):
  return [dense.Dense.Params().Set(name=f'fc{i}', input_dim=a, output_dim=b)
          for i, (a, b) in enumerate(zip(widths, widths[1:]))]


def test_time_is_measured_per_layer_on_real_shapes():
  # A 256x256 layer does ~16x the work of a 64x64 one on the same batch.
  layers = _Layers([64, 64, 256, 256])
  costs = profile.ProfileLayers(layers, 'time', [[128, 64]], repeats=3)
  assert len(costs) == 3 and all(c > 0 for c in costs)


def test_integer_inputs_are_profiled_with_their_dtype():
  layers = [embedding.Embedding.Params().Set(name='emb', vocab_size=10,
                                             embedding_dim=4)]
  costs = profile.ProfileLayers(layers, 'time',
                                [tf.TensorSpec([2, 3], tf.int32)], repeats=1)
  assert len(costs) == 1


def test_memory_on_a_device_without_allocator_stats_says_what_to_do(
    monkeypatch):
  def NoStats(device):
    raise ValueError(f'No allocator stats for {device}')

  monkeypatch.setattr(tf.config.experimental, 'get_memory_info', NoStats)
  with pytest.raises(ValueError, match='TF_CPU_ALLOCATOR_USE_BFC=true'):
    profile.ProfileLayers(_Layers([8, 8]), 'memory', [[4, 8]], repeats=1)


def test_bad_method():
  with pytest.raises(ValueError, match="not 'speed'"):
    profile.ProfileLayers(_Layers([8, 8]), 'speed', [[4, 8]])


def test_time_partition_builds_a_pipeline():
  p = pipelining_layer.PipeliningLayer.Params().Set(
      name='pipe', layers=_Layers([32] * 7), num_partitions=2,
      partition_method='time', input_shapes=[[16, 32]],
      devices=['/device:CPU:0', '/device:CPU:1'])
  pipe = p.Instantiate()
  assert sum(c.num_layers for c in pipe.Report().cells) == 6
  assert len(pipe.cells) == 2


def test_memory_partition_balances_measured_peaks():
  """A wide layer's measured peak dominates, and the balance follows it."""
  widths = [64, 64, 1024, 64, 64, 64]
  layers = _Layers(widths)
  costs = profile.ProfileLayers(layers, 'memory', [[512, 64]], repeats=1)
  # The two layers touching the 512x1024 activation cost the most.
  assert min(costs[1], costs[2]) > max(costs[0], costs[3], costs[4])
  p = pipelining_layer.PipeliningLayer.Params().Set(
      name='pipe', layers=layers, num_partitions=2, partition_method='memory',
      input_shapes=[[512, 64]], devices=['/device:CPU:0', '/device:CPU:1'])
  balance = p.cls.CellBalance(p)
  assert sum(balance) == 5 and len(balance) == 2


def test_profiling_happens_once_per_layer_build(monkeypatch):
  calls = []
  real = profile.ProfileLayers

  def Counting(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(profile, 'ProfileLayers', Counting)
  p = pipelining_layer.PipeliningLayer.Params().Set(
      name='pipe', layers=_Layers([16] * 5), num_partitions=2,
      partition_method='time', input_shapes=[[8, 16]],
      devices=['/device:CPU:0', '/device:CPU:1'])
  pipe = p.Instantiate()
  pipe.Report()
  pipe.Report()
  assert pipelining_layer.PipeliningLayer.NumParams(p) == 4 * (16 * 16 + 16)
  assert len(calls) == 1
