"""A missing tfds data set is an error that says where it was looked for and how to make it."""

import pytest

from lingvo_gpipe import base_input_generator
from tasks import tfds_input
from tests.tasks import tfds_fake


def test_missing_data_names_dataset_directory_and_build_command(tmp_path):
  with pytest.raises(base_input_generator.DataNotFoundError) as e:
    tfds_input.PreparedBuilder('wmt14_translate/de-en', str(tmp_path))
  message = str(e.value)
  assert f"'wmt14_translate/de-en' is not prepared in {tmp_path}" in message
  assert f'tfds build wmt14_translate/de-en --data_dir={tmp_path}' in message
  assert f'copy {tmp_path}/wmt14_translate to this machine' in message


def test_missing_imagenet_says_to_download_the_tar_files(tmp_path):
  with pytest.raises(base_input_generator.DataNotFoundError) as e:
    tfds_input.PreparedBuilder('imagenet2012', str(tmp_path))
  message = str(e.value)
  assert 'imagenet2012 may need files downloaded by hand' in message
  assert 'ILSVRC2012_img_train.tar' in message
  assert 'ILSVRC2012_img_val.tar' in message
  assert f'{tmp_path}/downloads/manual' in message
  assert f'tfds build imagenet2012 --data_dir={tmp_path}' in message


def test_prepared_data_is_found_and_other_versions_are_named(tmp_path):
  version_dir = tfds_fake.Prepare(
      'lm1b', tmp_path, {'train': [{'text': 'a b'}], 'test': [{'text': 'c'}]})
  builder = tfds_input.PreparedBuilder('lm1b', str(tmp_path))
  assert builder.info.splits['train'].num_examples == 1
  with pytest.raises(base_input_generator.DataNotFoundError) as e:
    tfds_input.PreparedBuilder('lm1b:0.0.1', str(tmp_path))
  assert 'cannot be loaded at version 0.0.1' in str(e.value)
  assert f'Found prepared versions there: {version_dir[-5:]}' in str(e.value)


def test_unknown_dataset_is_a_value_error(tmp_path):
  with pytest.raises(ValueError, match="dataset='no_such_data' is not a tfds"):
    tfds_input.PreparedBuilder('no_such_data', str(tmp_path))
