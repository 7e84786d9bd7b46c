"""TfdsInput: reads a TensorFlow Datasets (tfds) data set already prepared on disk.

Invariant: nothing is ever downloaded. `_Read(split, training)` returns the
examples of a data set that `tfds build` (or `download_and_prepare`) has
written under `data_dir`; when it is not there, DataNotFoundError names the
data set, the directory looked in, and how to prepare it, including the
manual download some data sets (e.g. imagenet2012) need first.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

from lingvo_gpipe import base_input_generator
from lingvo_gpipe.core import hyperparams


class TfdsInput(base_input_generator.BaseInputGenerator):
  """Base of the generators that read a prepared tfds data set."""

  @classmethod
  def Params(cls) -> hyperparams.InstantiableParams:
    p = super().Params()
    p.Define('dataset', hyperparams.REQUIRED,
             "tfds name: 'name', 'name/config', optionally ':version' "
             "(e.g. 'wmt14_translate/de-en:1.0.0').")
    return p

  def __init__(self, params: hyperparams.InstantiableParams):
    super().__init__(params)
    self._builder = None

  def _Builder(self) -> tfds.core.DatasetBuilder:
    """The builder of the prepared data set (looked up once)."""
    if self._builder is None:
      self._builder = PreparedBuilder(self.params.dataset, self.params.data_dir)
    return self._builder

  def _Read(self, split: str, training: bool) -> tf.data.Dataset:
    """Examples of `split` as tfds feature dicts; files shuffled when training."""
    return self._Builder().as_dataset(
        split=split, shuffle_files=training,
        read_config=tfds.ReadConfig(shuffle_seed=self.params.seed))


def PreparedBuilder(dataset: str,
                    data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The tfds builder of `dataset` in `data_dir`; DataNotFoundError if unprepared.

  Args:
    dataset: tfds name, 'name[/config][:version]'.
    data_dir: root of the tfds data directories; None: tfds's default
      ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  """
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise ValueError(f'dataset={dataset!r} is not a tfds data set: {e}') from None
  except AssertionError as e:
    # A version neither prepared in data_dir nor buildable by this tfds; the
    # builder of the code's version still says where to look and what to run.
    default = tfds.builder(dataset.split(':')[0], data_dir=data_dir)
    raise base_input_generator.DataNotFoundError(_HowToPrepare(
        dataset, default, f'{e} Looked in {default.data_path.parent}.')) from None
  if not builder.is_prepared():
    raise base_input_generator.DataNotFoundError(_HowToPrepare(
        dataset, builder, f'tfds data set {dataset!r} is not prepared in '
        f'{builder.data_dir} (data_dir={builder.data_dir_root}).'))
  return builder


def _HowToPrepare(dataset: str, builder: tfds.core.DatasetBuilder,
                  problem: str) -> str:
  root = builder.data_dir_root
  name = dataset.split(':')[0]  # `tfds build` takes the config, not the version.
  lines = [problem, 'lingvo-gpipe reads prepared data and never downloads.']
  other = _PreparedVersions(builder.data_path.parent)
  if other:
    lines.append(f'Found prepared versions there: {", ".join(other)}; read '
                 f"one with dataset='{name}:<version>'.")
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    lines += [
        f'Preparing {name} may need files downloaded by hand first; tfds says:',
        builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip(),
        f'Put such files in {root / "downloads" / "manual"} (the manual_dir '
        'tfds uses by default) or pass --manual_dir=<dir holding them> to '
        'the command below.']
  lines += [
      'To prepare it, run on a machine with internet access:',
      f'  tfds build {name} --data_dir={root}',
      f'then copy {root / name.split("/")[0]} to this machine (same path '
      'below data_dir), or set data_dir to the directory that holds it.']
  return '\n'.join(lines)


def _PreparedVersions(dataset_dir) -> list[str]:
  if not dataset_dir.is_dir():
    return []
  return sorted(d.name for d in dataset_dir.iterdir()
                if (d / 'dataset_info.json').is_file())
