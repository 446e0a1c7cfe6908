"""Own data: `--dataset=folder:PATH`, `--dataset=npz:PATH`, tfds downloads.

Real image files (PNG, JPEG, BMP, GIF of mixed sizes, a grey and an RGBA
one, a non-image file) written from scikit-learn's digits, trained on end to
end (train_then_eval, export, serving); npz likewise; the stratified split;
one test per bad input; the two `--download` branches with a mocked builder.
"""

import io
import json
import os
import subprocess
import sys

from absl import flags
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from supcon_tf import config as config_lib
from supcon_tf import enums
from supcon_tf import main as main_lib
from supcon_tf.data import datasets
from supcon_tf.data import pipeline
from tests import data_testing
from tests.train_test import ONE_DEVICE
from tests.train_test import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ('png', 'jpeg', 'bmp', 'gif')
CLASSES = ('cat', 'dog', 'fish')  # Digits 0, 1, 2.
PER_CLASS = 10


def _digit(index: int) -> np.ndarray:
  """uint8 [8, 8] grey digit image `index` of scikit-learn's digits."""
  images, _ = datasets._digits_arrays()['train']  # pylint: disable=protected-access
  return images[index, :, :, 0]


def _digit_indices(label: int, count: int):
  _, labels = datasets._digits_arrays()['train']  # pylint: disable=protected-access
  return np.flatnonzero(labels == label)[:count]


def write_image_folder(root, per_class=PER_CLASS, classes=CLASSES):
  """class-per-subfolder tree of real files; returns {path: rgb uint8}.

  Mixed sizes (8..14 px) and formats; in class 0 file 0 is a grey PNG and
  file 1 an RGBA PNG; a README.txt is not an image.
  """
  written = {}
  for label, name in enumerate(classes):
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    for j, index in enumerate(_digit_indices(label, per_class)):
      size = 8 + 2 * (j % 4)
      grey = Image.fromarray(_digit(index)).resize((size, size + j % 2))
      rgb = np.asarray(grey.convert('RGB')).copy()
      rgb[..., 1] //= 2  # Colour, so channel handling is visible.
      image = Image.fromarray(rgb)
      fmt = FORMATS[j % len(FORMATS)]
      if label == 0 and j == 0:
        image, fmt = grey, 'png'
        rgb = np.repeat(np.asarray(grey)[..., None], 3, axis=-1)
      elif label == 0 and j == 1:
        alpha = np.full(rgb.shape[:2] + (1,), 128, np.uint8)
        image, fmt = Image.fromarray(np.concatenate([rgb, alpha], -1)), 'png'
      path = os.path.join(folder, f'{name}_{j:02d}.{fmt}')
      image.save(path)
      written[path] = rgb
  with open(os.path.join(root, classes[0], 'README.txt'), 'w') as f:
    f.write('not an image')
  return written


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('own') / 'photos')
  return root, write_image_folder(root)


def _folder(root, **kwargs) -> config_lib.DataConfig:
  return config_lib.DataConfig(dataset=f'folder:{root}', **kwargs)


def _run(config, mode):
  return main_lib.run(config.replace(runtime__mode=mode), ONE_DEVICE)


def _own_config(model_dir, dataset, **overrides):
  settings = dict(data__dataset=dataset, data__batch_size=8,
                  data__eval_batch_size=16, augment__image_size=8,
                  runtime__max_train_steps=1, runtime__steps_per_loop=1,
                  runtime__max_eval_steps=0)
  settings.update(overrides)
  return tiny_config(model_dir, **settings)


# -----------------------------------------------------------------------------
# Listing, decoding, the split.


def test_folder_files_classes_and_decoding(image_folder):
  root, written = image_folder
  info = datasets.get_dataset_info(_folder(root))
  assert info.class_names == CLASSES and info.num_classes == 3
  assert info.num_train_examples + info.num_eval_examples == 3 * PER_CLASS
  assert info.image_shape == (None, None, 3)
  paths, labels = [], []
  for training in (True, False):
    records, decode = datasets.load_split_records(_folder(root), training)
    assert decode is not None
    for path, label in records.as_numpy_iterator():
      paths.append(path.decode())
      labels.append(int(label))
  assert sorted(paths) == sorted(written)  # README.txt is not listed.
  assert labels == [CLASSES.index(os.path.basename(os.path.dirname(p)))
                    for p in paths]
  # Every format decodes to uint8 [h, w, 3]; lossless ones exactly (the grey
  # PNG as 3 equal channels, the RGBA PNG without its alpha).
  for path, want in written.items():
    got = datasets.decode_image_file(tf.constant(path)).numpy()
    assert got.dtype == np.uint8 and got.shape == want.shape, path
    if path.endswith(('.png', '.bmp')):
      np.testing.assert_array_equal(got, want, err_msg=path)
    else:  # JPEG / GIF (palette) are lossy.
      assert np.abs(got.astype(int) - want).mean() < 20, path


def test_stratified_split_is_stable_and_fixed_by_seed(image_folder):
  root, _ = image_folder
  labels = np.repeat(np.arange(3), [10, 5, 1])
  train, test = datasets.stratified_split(labels, 0.1, seed=0)
  # round(0.1 n) but >= 1 per class of >= 2 images; a lone image trains.
  assert np.bincount(labels[test], minlength=3).tolist() == [1, 1, 0]
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(16))
  for a, b in zip(datasets.stratified_split(labels, 0.1, seed=0),
                  (train, test)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(
      datasets.stratified_split(labels, 0.1, seed=2)[1], test)
  assert np.bincount(labels[datasets.stratified_split(labels, 0.5, 0)[1]],
                     minlength=3).tolist() == [5, 3, 0]  # 2.5 rounds up.

  def eval_paths(seed):
    datasets._folder_source.cache_clear()  # pylint: disable=protected-access
    records, _ = datasets.load_split_records(_folder(root, seed=seed), False)
    return [p for p, _ in records.as_numpy_iterator()]

  first = eval_paths(0)
  assert len(first) == 3  # 1 of 10 per class.
  assert eval_paths(0) == first  # Listing again: the same split.
  assert eval_paths(7) != first
  datasets._folder_source.cache_clear()  # pylint: disable=protected-access


def test_folder_cap_shards_and_resumable_stream(image_folder):
  root, _ = image_folder
  data = _folder(root, num_images=12)
  assert datasets.get_dataset_info(data).num_train_examples == 12
  whole = [p for p, _ in datasets.load_split_records(data, True)[0]
           .as_numpy_iterator()]
  shards = [[p for p, _ in datasets.load_split_records(
      data, True, tf.distribute.InputContext(2, i, 2))[0].as_numpy_iterator()]
            for i in range(2)]
  assert shards[0] + shards[1] == whole and len(shards[0]) == 6
  # The first 12 training images cover every class (seeded order).
  labels = [l for _, l in datasets.load_split_records(data, True)[0]
            .as_numpy_iterator()]
  assert set(labels) == {0, 1, 2}
  # Resuming at step 2 continues the stream exactly.
  config = _own_config('', f'folder:{root}', data__batch_size=4)
  full = pipeline.build_dataset(config, None, True).take(3)
  resumed = pipeline.build_dataset(config, None, True, start_step=2).take(1)
  np.testing.assert_array_equal(list(full)[2][0].numpy(),
                                list(resumed)[0][0].numpy())


def test_folder_with_train_and_val_subfolders(tmp_path):
  write_image_folder(str(tmp_path / 'train'), per_class=4)
  write_image_folder(str(tmp_path / 'val'), per_class=2, classes=CLASSES[1:])
  info = datasets.get_dataset_info(_folder(str(tmp_path)))
  assert (info.num_train_examples, info.num_eval_examples) == (12, 4)
  labels = [l for _, l in datasets.load_split(_folder(str(tmp_path)), False)
            .as_numpy_iterator()]
  assert labels == [1, 1, 2, 2]  # val/dog is class 1 as in train/.
  # train/ alone is split like a plain tree.
  os.rename(tmp_path / 'val', tmp_path / 'elsewhere')
  datasets._folder_source.cache_clear()  # pylint: disable=protected-access
  info = datasets.get_dataset_info(_folder(str(tmp_path)))
  assert info.class_names == CLASSES
  assert (info.num_train_examples, info.num_eval_examples) == (9, 3)
  datasets._folder_source.cache_clear()  # pylint: disable=protected-access


# -----------------------------------------------------------------------------
# End to end.


def _serve(export_dir, images):
  model = tf.saved_model.load(export_dir)
  return model.signatures['serving_default'](images=tf.constant(images))


def test_folder_train_then_eval_export_and_serving(image_folder, tmp_path):
  root, written = image_folder
  config = _own_config(tmp_path, f'folder:{root}')
  results = _run(config, enums.Mode.TRAIN_THEN_EVAL)
  assert results['num_examples'] == 3  # The held-out split, all of it.
  assert (tmp_path / 'class_names.txt').read_text().split('\n') == [
      *CLASSES, '']
  # Whitening: the first training images' per-channel pixel moments.
  stored = json.loads((tmp_path / 'whitening.json').read_text())
  records, _ = datasets.load_split_records(config.data, True)
  pixels = np.concatenate([
      (datasets.decode_image_file(p).numpy() / 255.0).reshape(-1, 3)
      for p, _ in records.as_numpy_iterator()])
  np.testing.assert_allclose(stored['mean'], pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stored['std'], pixels.std(0), rtol=1e-6)
  # Later runs on this model_dir read the stored numbers, not the images.
  stored['mean'] = [0.25, 0.5, 0.75]
  (tmp_path / 'whitening.json').write_text(json.dumps(stored))
  info = datasets.get_dataset_info(config.data, str(tmp_path))
  assert info.whitening_mean == (0.25, 0.5, 0.75)

  # Serving: raw images of another size, the predicted class by name.
  images = np.stack([np.asarray(Image.fromarray(rgb).resize((12, 12)))
                     for rgb in list(written.values())[:4]])
  out = _serve(str(tmp_path / 'export'), images)
  index = np.argmax(out['logits'].numpy(), axis=-1)
  np.testing.assert_array_equal(out['class_index'].numpy(), index)
  assert [n.decode() for n in out['class_name'].numpy()] == [
      CLASSES[i] for i in index]


def test_npz_train_then_eval_export_and_serving(tmp_path):
  images, labels = datasets._digits_arrays()['train']  # pylint: disable=protected-access
  keep = labels < 3
  x = images[keep][:60, :, :, 0].astype(np.float32) / 255.0  # Grey floats.
  y = labels[keep][:60]
  path = tmp_path / 'digits.npz'
  np.savez(path, x_train=x[:48], y_train=y[:48], x_test=x[48:],
           y_test=y[48:], class_names=np.array(['zero', 'one', 'two']))
  config = _own_config(tmp_path / 'run', f'npz:{path}')
  info = datasets.get_dataset_info(config.data)
  assert (info.num_train_examples, info.num_eval_examples,
          info.image_shape) == (48, 12, (8, 8, 3))
  first, _ = next(datasets.load_split(config.data, False).as_numpy_iterator())
  np.testing.assert_array_equal(first[..., 0], np.round(x[48] * 255))
  np.testing.assert_array_equal(first[..., 1], first[..., 0])
  results = _run(config, enums.Mode.TRAIN_THEN_EVAL)
  assert results['num_examples'] == 12
  out = _serve(str(tmp_path / 'run' / 'export'), images[:2])
  assert [n.decode() for n in out['class_name'].numpy()] == [
      ['zero', 'one', 'two'][i] for i in out['class_index'].numpy()]


def test_npz_without_test_split_is_split_like_folders(tmp_path):
  images, labels = datasets._digits_arrays()['train']  # pylint: disable=protected-access
  np.savez(tmp_path / 'd.npz', x_train=images[:100], y_train=labels[:100])
  data = config_lib.DataConfig(dataset=f'npz:{tmp_path / "d.npz"}')
  info = datasets.get_dataset_info(data)
  _, test = datasets.stratified_split(labels[:100], 0.1, 0)
  assert info.num_eval_examples == len(test)
  assert info.class_names == tuple(str(i) for i in range(10))
  got = [l for _, l in datasets.load_split(data, False).as_numpy_iterator()]
  assert got == labels[:100][test].tolist()


def test_show_augmentations_on_a_folder(image_folder, tmp_path):
  root, _ = image_folder
  path = _run(_own_config(tmp_path, f'folder:{root}'),
              enums.Mode.SHOW_AUGMENTATIONS)
  assert tf.io.decode_png(tf.io.read_file(path)).shape[-1] == 3


# -----------------------------------------------------------------------------
# Bad inputs: one line naming the path and the fix.


def _folder_error(root, **kwargs) -> str:
  datasets._folder_source.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(datasets.DatasetError) as e:
    datasets.get_dataset_info(_folder(str(root), **kwargs))
  message = str(e.value)
  assert '\n' not in message and str(root) in message
  return message


def test_missing_folder(tmp_path):
  assert 'does not exist; pass the root folder' in _folder_error(
      tmp_path / 'nope')


def test_folder_is_a_file(tmp_path):
  (tmp_path / 'x.zip').write_bytes(b'PK')
  assert 'is a file, not a folder' in _folder_error(tmp_path / 'x.zip')


def test_no_class_folders(tmp_path):
  Image.fromarray(_digit(0)).save(tmp_path / 'loose.png')
  assert 'no class folders' in _folder_error(tmp_path)


def test_class_folder_without_images(tmp_path):
  write_image_folder(str(tmp_path), per_class=2)
  os.makedirs(tmp_path / 'empty_class')
  (tmp_path / 'empty_class' / 'notes.txt').write_text('x')
  message = _folder_error(tmp_path)
  assert 'empty_class has no images' in message
  assert 'add some or remove the folder' in message


def test_fewer_than_two_classes(tmp_path):
  write_image_folder(str(tmp_path), per_class=2, classes=('only',))
  assert 'SupCon needs at least 2 classes' in _folder_error(tmp_path)


def test_eval_class_not_in_training(tmp_path):
  write_image_folder(str(tmp_path / 'train'), per_class=2)
  write_image_folder(str(tmp_path / 'test'), per_class=1,
                     classes=('cat', 'bird'))
  assert "does not have: ['bird']" in _folder_error(tmp_path)


def _with_corrupt_files(root):
  write_image_folder(root, per_class=6)
  bad = [os.path.join(root, 'dog', 'zz_garbage.jpg'),
         os.path.join(root, 'cat', 'zz_truncated.png')]
  with open(bad[0], 'wb') as f:
    f.write(b'not an image at all')
  buffer = io.BytesIO()
  Image.fromarray(_digit(5)).resize((30, 30)).save(buffer, format='PNG')
  with open(bad[1], 'wb') as f:
    f.write(buffer.getvalue()[:60])
  return bad


@pytest.mark.parametrize('sample', [0, 1000])
def test_corrupt_image_is_named(tmp_path, monkeypatch, sample):
  # sample 0: no whitening pass, the training stream meets the bad files;
  # 1000: the whitening statistics' pass at start-up does.
  monkeypatch.setattr(datasets, 'WHITENING_SAMPLE', sample)
  datasets._computed_whitening.cache_clear()  # pylint: disable=protected-access
  bad = _with_corrupt_files(str(tmp_path / 'data'))
  config = _own_config(tmp_path / 'run', f'folder:{tmp_path / "data"}',
                       data__batch_size=16, runtime__max_train_steps=2)
  datasets._folder_source.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(datasets.DatasetError) as e:
    _run(config, enums.Mode.PRETRAIN)
  datasets._computed_whitening.cache_clear()  # pylint: disable=protected-access
  message = str(e.value)
  assert f'cannot decode image file {sorted(bad)[0]} and 1 more' in message
  assert '--skip_corrupt_images' in message and '\n' not in message
  if not sample:
    assert message.startswith('[pretrain] reading the training data failed')


def test_skip_corrupt_images_counts_them(tmp_path, capsys):
  bad = _with_corrupt_files(str(tmp_path))
  data = _folder(str(tmp_path), skip_corrupt_images=True)
  datasets._folder_source.cache_clear()  # pylint: disable=protected-access
  info = datasets.get_dataset_info(data)
  assert info.num_skipped_images == 2
  assert info.num_train_examples + info.num_eval_examples == 18
  assert 'skipped 2 unreadable image file(s)' in capsys.readouterr().out
  paths = [p.decode() for training in (True, False) for p, _ in
           datasets.load_split_records(data, training)[0].as_numpy_iterator()]
  assert not set(bad) & set(paths)
  assert datasets.find_unreadable_images(sorted(bad) + paths[:2]) == sorted(
      bad)


def _npz_error(tmp_path, **arrays) -> str:
  path = tmp_path / 'data.npz'
  np.savez(path, **arrays)
  datasets._npz_source.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(datasets.DatasetError) as e:
    datasets.get_dataset_info(config_lib.DataConfig(dataset=f'npz:{path}'))
  assert str(path) in str(e.value) and '\n' not in str(e.value)
  return str(e.value)


X = np.zeros((6, 4, 4, 3), np.uint8)
Y = np.array([0, 1, 0, 1, 0, 1])


@pytest.mark.parametrize('arrays, pattern', [
    (dict(x_train=X, y_train=Y[:5]),
     'x_train has 6 images but y_train has 5 labels'),
    (dict(x_train=X, y_train=Y - 1), 'labels out of range [-1, 0]'),
    (dict(x_train=X, y_train=Y, x_test=X[:2], y_test=np.array([0, 2])),
     'y_test has labels out of range [0, 2]; class ids must be 0..1'),
    (dict(x_train=X, y_train=Y, class_names=np.array(['a'])),
     'y_train has labels out of range [0, 1]; class ids must be 0..0'),
    (dict(x_train=X, y_train=np.zeros(6, int)), 'needs at least 2'),
    (dict(x=X, y=Y), "has no ['x_train', 'y_train']"),
    (dict(x_train=X, y_train=Y, x_test=X), "has no ['y_test']"),
    (dict(x_train=X + 2.0, y_train=Y), 'float images must be in [0, 1]'),
    (dict(x_train=X[..., :2], y_train=Y), '1, 3 or 4 channels'),
])
def test_bad_npz(tmp_path, arrays, pattern):
  assert pattern in _npz_error(tmp_path, **arrays)


def test_npz_missing_or_not_an_archive(tmp_path):
  with pytest.raises(datasets.DatasetError, match='does not exist'):
    datasets.get_dataset_info(config_lib.DataConfig(
        dataset=f'npz:{tmp_path / "no.npz"}'))
  (tmp_path / 'bad.npz').write_text('hello')
  with pytest.raises(datasets.DatasetError, match='cannot read .* as a NumPy'):
    datasets.get_dataset_info(config_lib.DataConfig(
        dataset=f'npz:{tmp_path / "bad.npz"}'))


def _parse(*args) -> config_lib.ExperimentConfig:
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(['supcon_tf', *args])
  return config_lib.config_from_flags(fv)


def test_flags(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  data = _parse('--dataset=folder:photos').data
  assert data.dataset == f'folder:{tmp_path / "photos"}'  # Absolute.
  assert (data.folder_test_fraction, data.download,
          data.skip_corrupt_images) == (0.1, True, False)
  assert _parse('--dataset=npz:~/a.npz').data.dataset == (
      'npz:' + os.path.expanduser('~/a.npz'))
  # --whiten is --apply_whitening (one switch, the reference's name).
  assert _parse().augment.apply_whitening
  assert not _parse('--whiten=false').augment.apply_whitening
  assert not _parse('--nowhiten').augment.apply_whitening
  assert not _parse('--nodownload').data.download
  with pytest.raises(config_lib.ConfigError,
                     match=r'--dataset: folder: needs a path'):
    _parse('--dataset=folder:')
  with pytest.raises(config_lib.ConfigError,
                     match=r'--folder_test_fraction: must be in \(0, 1\)'):
    _parse('--folder_test_fraction=1')


def test_command_line_prints_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'supcon_tf.main', '--dataset=folder:/nonexistent',
       '--mode=train_then_eval', f'--model_dir={tmp_path}'],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert errors == ['error: --dataset=folder:/nonexistent: /nonexistent does '
                    'not exist; pass the root folder of your images, laid out'
                    ' as PATH/<class_name>/<images> (or PATH/train/... and '
                    'PATH/test/...).']
  assert 'Traceback' not in proc.stderr


# -----------------------------------------------------------------------------
# tfds: --download (default) and --nodownload, with a mocked download.


@pytest.fixture
def fake_mnist_download(tmp_path, monkeypatch):
  """Patches mnist's download_and_prepare to write a tiny prepared copy."""
  datasets.tfds_source.cache_clear()
  calls = []
  builder_cls = type(tfds.builder('mnist', data_dir=str(tmp_path)))

  def download_and_prepare(builder, *args, **kwargs):
    del args, kwargs
    calls.append(str(builder.data_dir))
    data_testing.write_tfds_dataset(
        str(tmp_path), 'mnist', {'train': 20, 'test': 10},
        version=str(builder.version), image_shape=(28, 28, 1),
        num_classes=10, features=builder.info.features)

  monkeypatch.setattr(builder_cls, 'download_and_prepare',
                      download_and_prepare)
  yield calls
  datasets.tfds_source.cache_clear()


def test_tfds_downloads_when_not_prepared(tmp_path, fake_mnist_download):
  data = config_lib.DataConfig(dataset='mnist', data_dir=str(tmp_path))
  info = datasets.get_dataset_info(data)
  assert len(fake_mnist_download) == 1
  assert (info.num_train_examples, info.num_eval_examples) == (20, 10)
  images, _ = next(datasets.load_split(data, True).batch(20)
                   .as_numpy_iterator())
  assert images.shape == (20, 28, 28, 3)
  datasets.tfds_source.cache_clear()
  datasets.get_dataset_info(data)
  assert len(fake_mnist_download) == 1  # Prepared now: no second download.


def test_tfds_nodownload_names_the_build_command(tmp_path,
                                                 fake_mnist_download):
  with pytest.raises(datasets.DatasetError) as e:
    datasets.get_dataset_info(config_lib.DataConfig(
        dataset='mnist', data_dir=str(tmp_path), download=False))
  assert not fake_mnist_download
  message = str(e.value)
  assert "Dataset 'mnist'" in message and '--nodownload was given' in message
  assert f'tfds build mnist --data_dir={tmp_path}' in message


def test_tfds_download_failure_names_the_build_command(tmp_path, monkeypatch):
  datasets.tfds_source.cache_clear()
  builder_cls = type(tfds.builder('mnist', data_dir=str(tmp_path)))

  def offline(builder, *args, **kwargs):
    raise ConnectionError('Name or service not known')

  monkeypatch.setattr(builder_cls, 'download_and_prepare', offline)
  with pytest.raises(datasets.DatasetError) as e:
    datasets.get_dataset_info(config_lib.DataConfig(
        dataset='mnist', data_dir=str(tmp_path)))
  datasets.tfds_source.cache_clear()
  message = str(e.value)
  assert ('Downloading it failed (ConnectionError: Name or service not '
          'known)') in message
  assert f'tfds build mnist --data_dir={tmp_path}' in message
