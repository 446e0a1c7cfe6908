"""What every benchmark prints about the machine and how it saves its table."""

import datetime
import os
import platform
from typing import List


def machine_line() -> str:
  """'# date  processor  N CPUs  TF x  Keras y' (no newline)."""
  # Imported here: loss_memory's parent process measures children and
  # does not load TensorFlow itself.
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return (f'# {datetime.date.today()}  '
          f'{platform.processor() or platform.machine()}  '
          f'{os.cpu_count()} CPUs  TF {tf.__version__}  '
          f'Keras {keras.__version__}')


def save(text: str, path: str, append: bool = False) -> None:
  """Writes (or appends) `text` to `path`, creating its folder."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a' if append else 'w') as f:
    f.write(text)
  print(f'Written to {path}')


def format_table(header: List[str], rows: List[List[str]]) -> str:
  """Aligned text table: first column left-aligned, the others right."""
  widths = [max(len(r[i]) for r in rows + [header])
            for i in range(len(header))]

  def line(row):
    return '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(row, widths)))
  return '\n'.join([line(header), line(['-' * w for w in widths])] +
                   [line(r) for r in rows])
