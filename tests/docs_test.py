"""Every `python -m supcon_tf.main ...` command in README.md and docs/*.md
parses: its flags exist, its values are valid and its flagfiles resolve.

Commands are read the way a user copies them: backslash continuations are
joined, `[--optional=flags]` are kept (without brackets), shell variables
such as `$MODEL_DIR` become placeholder paths, and a comment after `#` is
dropped; templates with `<placeholders>` are skipped. Parsing is in process (`config_from_flags`, as `--dry_run` does); no
TensorFlow is needed.
"""

import glob
import os
import re
import shlex

from absl import flags
import pytest

from supcon_tf import config as config_lib
from supcon_tf import enums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PREFIX = 'python -m supcon_tf.main'


def _doc_files():
  return [os.path.join(ROOT, 'README.md')] + sorted(
      glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def _commands(path):
  """(line number, argv after the module) of each command in `path`."""
  lines = open(path, encoding='utf-8').read().split('\n')
  found = []
  i = 0
  while i < len(lines):
    line = lines[i]
    start = line.find(_PREFIX)
    if start < 0 or '`' in line[:start]:  # Prose mentions, e.g. `python -m`.
      i += 1
      continue
    first, text = i + 1, line[start + len(_PREFIX):]
    while text.rstrip().endswith('\\') and i + 1 < len(lines):
      i += 1
      text = text.rstrip()[:-1] + ' ' + lines[i]
    i += 1
    text = re.sub(r'\s#.*$', '', text)  # A trailing shell comment.
    if '<' in text:  # A template (`--flagfile=flags/<config>.cfg`).
      continue
    text = re.sub(r'\[(--[^\]]*)\]', r'\1', text)  # [--optional=flag].
    text = re.sub(r'\$\{?([A-Z_]+)\}?', lambda m: f'/tmp/{m.group(1).lower()}',
                  text)
    found.append((first, shlex.split(text)))
  return found


_ALL = [(os.path.relpath(path, ROOT), line, argv)
        for path in _doc_files() for line, argv in _commands(path)]


def test_the_docs_have_commands():
  # README: quickstart-style runs, serving, distributed, beyond-the-reference.
  assert len(_ALL) >= 15, _ALL
  assert any(path == 'README.md' for path, _, _ in _ALL)


@pytest.mark.parametrize('path,line,argv', _ALL,
                         ids=[f'{p}:{n}' for p, n, _ in _ALL])
def test_documented_command_parses(path, line, argv, monkeypatch):
  monkeypatch.chdir(ROOT)  # Nested flagfiles are relative to the root.
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  try:
    fv(['supcon_tf'] + argv)
    config = config_lib.config_from_flags(fv)
  except (flags.Error, config_lib.ConfigError, ValueError) as e:
    pytest.fail(f'{path}:{line}: {" ".join(argv)}\n  {type(e).__name__}: {e}')
  assert isinstance(config.runtime.mode, enums.Mode)


def test_extraction_joins_lines_and_substitutes(tmp_path):
  doc = tmp_path / 'doc.md'
  doc.write_text('Run `python -m supcon_tf.main` like this:\n```\n'
                 'python -m supcon_tf.main --flagfile=flags/quickstart_digits.cfg \\\n'
                 '    --model_dir=$MODEL_DIR [--seed=3]  # a comment\n'
                 'python -m supcon_tf.main --flagfile=flags/<config>.cfg\n```\n')
  assert _commands(str(doc)) == [
      (3, ['--flagfile=flags/quickstart_digits.cfg', '--model_dir=/tmp/model_dir',
           '--seed=3'])]


def _python_blocks(path):
  text = open(path, encoding='utf-8').read()
  return re.findall(r'```python\n(.*?)```', text, flags=re.S)


def test_readme_python_examples_run(monkeypatch):
  """The README's Python blocks run as printed, given the names they leave
  to the reader (`model`, `images`); the last line's training run is
  replaced by a check of the config it receives."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from supcon_tf import main  # pylint: disable=g-import-not-at-top

  # The serving block loads a user's export ('DIR/export'); the signature's
  # outputs are tested by train_test's SavedModel round trip.
  blocks = [b for b in _python_blocks(os.path.join(ROOT, 'README.md'))
            if "'DIR/" not in b]
  assert len(blocks) >= 2
  received = []

  def fake_run(config, strategy=None):
    del strategy
    main._preflight(config)  # pylint: disable=protected-access
    assert config.runtime.mode in main._handlers()  # pylint: disable=protected-access
    received.append(config)

  monkeypatch.setattr(main, 'run', fake_run)
  model = keras.Sequential([keras.layers.Input([2, 4]), keras.layers.Dense(8)])
  for block in blocks:
    scope = {'model': model, 'images': tf.random.uniform([2, 2, 32, 32, 3])}
    exec(compile(block, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
    if 'per_sample' in scope:
      assert scope['per_sample'].shape == (8,)
  assert len(received) == 1
  assert received[0].runtime.mode == enums.Mode.TRAIN_THEN_EVAL
