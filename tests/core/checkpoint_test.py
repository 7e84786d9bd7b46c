"""Tests of the Checkpointer: save, latest, restore, retention and mismatch errors."""

import glob
import os
import signal

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe import model_params
from lingvo_gpipe.core import checkpoint
from lingvo_gpipe.core import optimizer


class _Model(tf.Module):
  """Two variables; `w_shape` and `extra` make models that do not match."""

  def __init__(self, seed=0, w_shape=(2, 3), extra=False):
    super().__init__(name='model')
    rng = np.random.default_rng(seed)
    self.w = tf.Variable(rng.normal(size=w_shape).astype(np.float32),
                         name='w')
    self.b = tf.Variable(rng.normal(size=[3]).astype(np.float32), name='b')
    if extra:
      self.gamma = tf.Variable(tf.ones([3]), name='gamma')


def _Values(model):
  return {v.name: v.numpy() for v in model.variables}


def _AssertSameValues(a, b):
  va, vb = _Values(a), _Values(b)
  assert sorted(va) == sorted(vb)
  for name in va:
    np.testing.assert_array_equal(va[name], vb[name], err_msg=name)


def _AssertDifferentValues(a, b):
  assert not np.array_equal(a.w.numpy(), b.w.numpy())


def test_directory_and_step_of():
  assert checkpoint.Directory('/tmp/run') == '/tmp/run/checkpoints'
  assert checkpoint.StepOf('/tmp/run/checkpoints/ckpt-120') == 120
  assert checkpoint.StepOf('/a-b/c-9/ckpt-0') == 0


def test_save_then_latest_and_step(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), {'model': _Model()})
  assert ckpt.directory == os.path.join(str(tmp_path), 'checkpoints')
  assert ckpt.latest is None
  first = ckpt.Save(10)
  second = ckpt.Save(25)
  assert first == os.path.join(ckpt.directory, 'ckpt-10')
  assert second == os.path.join(ckpt.directory, 'ckpt-25')
  assert ckpt.latest == second
  assert checkpoint.StepOf(ckpt.latest) == 25
  assert glob.glob(second + '.index')
  # A new Checkpointer on the same logdir (a restarted job) finds it too.
  again = checkpoint.Checkpointer(str(tmp_path), {'model': _Model(seed=1)})
  assert again.latest == second


def test_restore_gives_saved_values(tmp_path):
  saved = _Model(seed=0)
  ckpt = checkpoint.Checkpointer(str(tmp_path), {'model': saved})
  path = ckpt.Save(3)

  fresh = _Model(seed=1)
  _AssertDifferentValues(saved, fresh)
  restored = checkpoint.Checkpointer(str(tmp_path), {'model': fresh})
  assert restored.Restore() == path
  _AssertSameValues(saved, fresh)


def test_restore_a_given_path_not_the_latest(tmp_path):
  model = _Model(seed=0)
  ckpt = checkpoint.Checkpointer(str(tmp_path), {'model': model})
  early_values = _Values(model)
  early = ckpt.Save(1)
  model.w.assign_add(tf.ones_like(model.w))
  ckpt.Save(2)

  fresh = _Model(seed=5)
  restorer = checkpoint.Checkpointer(str(tmp_path), {'model': fresh})
  assert restorer.Restore(early) == early
  for name, value in _Values(fresh).items():
    np.testing.assert_array_equal(value, early_values[name])
  assert restorer.Restore() == restorer.latest
  _AssertSameValues(model, fresh)


def test_restore_model_and_optimizer_together(tmp_path):
  train = model_params.ModelParams().Train().Set(optimizer='adam')
  model = _Model(seed=0)
  opt = optimizer.Create(train)
  opt.Build([model.w, model.b])
  opt.Apply([tf.ones_like(model.w), tf.ones_like(model.b)],
            [model.w, model.b], 0.1)
  checkpoint.Checkpointer(str(tmp_path), {'model': model,
                                          'optimizer': opt}).Save(1)

  fresh, fresh_opt = _Model(seed=1), optimizer.Create(train)
  fresh_opt.Build([fresh.w, fresh.b])
  checkpoint.Checkpointer(str(tmp_path), {'model': fresh,
                                          'optimizer': fresh_opt}).Restore()
  _AssertSameValues(model, fresh)
  assert int(fresh_opt.iterations.numpy()) == 1
  np.testing.assert_array_equal(fresh_opt.Slot(fresh.w, 'v').numpy(),
                                opt.Slot(model.w, 'v').numpy())


def test_max_to_keep_deletes_old_checkpoints(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), {'model': _Model()},
                                 max_to_keep=2)
  paths = [ckpt.Save(step) for step in (100, 200, 300)]
  kept = sorted(checkpoint.StepOf(p[:-len('.index')]) for p in
                glob.glob(os.path.join(ckpt.directory, 'ckpt-*.index')))
  assert kept == [200, 300]
  assert not glob.glob(paths[0] + '*')
  assert ckpt.latest == paths[-1]


def test_restore_empty_directory_returns_none(tmp_path):
  model = _Model(seed=0)
  before = _Values(model)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'new_run'), {'model': model})
  assert ckpt.Restore() is None
  assert ckpt.Restore(partial=True) is None
  for name, value in _Values(model).items():
    np.testing.assert_array_equal(value, before[name])


def _SaveModel(logdir, **objects):
  objects.setdefault('model', _Model(seed=0))
  return checkpoint.Checkpointer(logdir, objects).Save(7)


def _AssertMismatchMessage(error, path):
  msg = str(error)
  assert f'Checkpoint {path} does not match this model' in msg
  assert 'new --logdir' in msg


@pytest.mark.parametrize('partial', [False, True])
def test_different_shape_raises_mismatch(tmp_path, partial):
  path = _SaveModel(str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path),
                                 {'model': _Model(w_shape=(4, 3))})
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    ckpt.Restore(partial=partial)
  _AssertMismatchMessage(e.value, path)
  assert isinstance(e.value, ValueError)


@pytest.mark.parametrize('partial', [False, True])
def test_missing_variable_raises_mismatch(tmp_path, partial):
  path = _SaveModel(str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path), {'model': _Model(extra=True)})
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    ckpt.Restore(partial=partial)
  _AssertMismatchMessage(e.value, path)


def test_extra_saved_object_needs_partial(tmp_path):
  saved = _Model(seed=0)
  path = _SaveModel(str(tmp_path), model=saved,
                    optimizer=optimizer.Create(
                        model_params.ModelParams().Train()))
  # Not partial: the checkpoint's optimizer has nowhere to go.
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    checkpoint.Checkpointer(str(tmp_path), {'model': _Model(seed=1)}).Restore()
  _AssertMismatchMessage(e.value, path)

  # Partial (an evaluator): only the model is restored, without complaint.
  evaluated = _Model(seed=2)
  assert checkpoint.Checkpointer(str(tmp_path), {'model': evaluated}).Restore(
      partial=True) == path
  _AssertSameValues(saved, evaluated)


# --- Resume: the writer's restore under faults ----------------------------------


def _SavedRun(tmp_path, steps=(10, 20)):
  model = _Model(seed=0)
  ckpt = checkpoint.Checkpointer(str(tmp_path), {'model': model})
  paths = []
  for step in steps:
    model.w.assign_add(tf.ones_like(model.w))
    paths.append(ckpt.Save(step))
  return model, paths


def test_resume_without_an_index_lists_the_disk_and_rewrites_it(tmp_path):
  saved, paths = _SavedRun(tmp_path)
  os.remove(os.path.join(checkpoint.Directory(str(tmp_path)), 'checkpoint'))
  fresh = _Model(seed=1)
  ckpt = checkpoint.Checkpointer(str(tmp_path), {'model': fresh}, max_to_keep=2)
  assert ckpt.Resume() == paths[-1]
  _AssertSameValues(saved, fresh)
  state = tf.train.get_checkpoint_state(ckpt.directory)
  assert list(state.all_model_checkpoint_paths) == paths
  # The rebuilt index counts against max_to_keep: the oldest goes.
  ckpt.Save(30)
  assert [checkpoint.StepOf(p) for p in
          checkpoint.ListCheckpoints(ckpt.directory)] == [20, 30]


def test_resume_moves_a_damaged_checkpoint_aside_and_falls_back(tmp_path):
  _, paths = _SavedRun(tmp_path)
  with open(paths[-1] + '.data-00000-of-00001', 'r+b') as f:
    f.truncate(10)
  fresh = _Model(seed=1)
  ckpt = checkpoint.Checkpointer(str(tmp_path), {'model': fresh})
  assert ckpt.Resume() == paths[0]
  damaged = os.path.join(ckpt.directory, checkpoint.DAMAGED_SUBDIR)
  assert sorted(os.listdir(damaged)) == ['ckpt-20.data-00000-of-00001',
                                         'ckpt-20.index']
  assert ckpt.latest == paths[0]


def test_resume_refuses_when_nothing_restores_and_moves_nothing(tmp_path):
  _, paths = _SavedRun(tmp_path)
  for path in paths:
    open(path + '.index', 'wb').write(b'\0' * 64)
  before = sorted(os.listdir(checkpoint.Directory(str(tmp_path))))
  ckpt = checkpoint.Checkpointer(str(tmp_path), {'model': _Model(seed=1)})
  with pytest.raises(checkpoint.CheckpointDamagedError, match='ckpt-20, ckpt-10'):
    ckpt.Resume()
  assert sorted(os.listdir(ckpt.directory)) == before


def test_resume_removes_an_unfinished_save(tmp_path):
  _SavedRun(tmp_path)
  temp = os.path.join(checkpoint.Directory(str(tmp_path)), 'ckpt-30_temp')
  os.makedirs(temp)
  checkpoint.Checkpointer(str(tmp_path), {'model': _Model(seed=1)}).Resume()
  assert not os.path.exists(temp)


def test_restore_of_a_missing_file_is_damaged_not_a_mismatch(tmp_path):
  _, paths = _SavedRun(tmp_path)
  os.remove(paths[-1] + '.data-00000-of-00001')
  ckpt = checkpoint.Checkpointer(str(tmp_path), {'model': _Model(seed=1)})
  with pytest.raises(checkpoint.CheckpointDamagedError, match='ckpt-20'):
    ckpt.Restore(paths[-1], partial=True)


def test_a_keyed_object_restores_only_under_its_key(tmp_path):
  counter = tf.Variable(5)
  checkpoint.Checkpointer(str(tmp_path), {'model': _Model(seed=0)},
                          keyed={'position': (counter, 'batch_size : 16')}
                          ).Save(1)
  same, other = tf.Variable(0), tf.Variable(0)
  checkpoint.Checkpointer(str(tmp_path), {'model': _Model(seed=1)},
                          keyed={'position': (same, 'batch_size : 16')}
                          ).Restore()
  assert int(same.numpy()) == 5
  model = _Model(seed=1)
  checkpoint.Checkpointer(str(tmp_path), {'model': model},
                          keyed={'position': (other, 'batch_size : 8')}
                          ).Restore()
  assert int(other.numpy()) == 0  # not restored: another key
  _AssertSameValues(model, _Model(seed=0))  # everything else is


def test_a_failed_save_for_want_of_space_raises_storage_error(tmp_path,
                                                              monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path), {'model': _Model()})
  ckpt.Save(1)

  def FullDisk(*unused_args, **unused_kwargs):
    os.makedirs(os.path.join(ckpt.directory, 'ckpt-2_temp'))
    open(os.path.join(ckpt.directory, 'ckpt-2.index'), 'w').close()
    raise tf.errors.ResourceExhaustedError(None, None,
                                           'write: No space left on device')

  monkeypatch.setattr(ckpt._manager, 'save', FullDisk)
  with pytest.raises(checkpoint.StorageError, match='the disk is full') as e:
    ckpt.Save(2)
  assert 'ckpt-1 (step 1) is the latest intact' in str(e.value)
  assert sorted(os.listdir(ckpt.directory)) == [
      'checkpoint', 'ckpt-1.data-00000-of-00001', 'ckpt-1.index']


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_a_save_lets_it_finish_then_stops(tmp_path,
                                                              monkeypatch,
                                                              signum):
  ckpt = checkpoint.Checkpointer(str(tmp_path), {'model': _Model()})
  ckpt.Save(1)
  real_save = ckpt._manager.save

  def InterruptedSave(*args, **kwargs):
    os.kill(os.getpid(), signum)  # arrives while the save is under way
    return real_save(*args, **kwargs)

  monkeypatch.setattr(ckpt._manager, 'save', InterruptedSave)
  handler_before = signal.getsignal(signum)
  with pytest.raises(KeyboardInterrupt):
    ckpt.Save(2)
  assert sorted(os.listdir(ckpt.directory)) == [
      'checkpoint', 'ckpt-1.data-00000-of-00001', 'ckpt-1.index',
      'ckpt-2.data-00000-of-00001', 'ckpt-2.index']
  assert checkpoint.ListCheckpoints(ckpt.directory)[-1].endswith('ckpt-2')
  assert signal.getsignal(signum) is handler_before


def test_step_of_names_a_bad_name():
  with pytest.raises(ValueError, match="'garbage' is not a checkpoint name"):
    checkpoint.StepOf('garbage')
