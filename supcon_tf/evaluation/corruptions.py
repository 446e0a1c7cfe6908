"""`--mode=eval_corruptions`: errors on CIFAR-10-C / ImageNet-C, and mCE.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019 (https://arxiv.org/abs/1903.12261):
15 corruptions x 5 severities of the test images, read from the tfds datasets
`cifar10_corrupted/<corruption>_<severity>` and
`imagenet2012_corrupted/<corruption>_<severity>` (prepared offline, like every
supcon_tf dataset; nothing is downloaded). tfds's `cifar10_corrupted` is the
published CIFAR-10-C; its `imagenet2012_corrupted` is regenerated from the
ImageNet validation set with tfds's port of the corruption code, so errors on
it can differ slightly from those on the published ImageNet-C JPEGs.

With E_{s,c} the top-1 error of the classifier at severity s of corruption c
and E_clean its error on the clean eval split:

* every dataset: the mean error of each corruption over its severities, and
  their mean over corruptions (the "unnormalised mCE" of CIFAR-10-C papers);
* ImageNet-C, as the paper defines them (section 4):
    CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c},          mCE = mean_c CE_c,
    relative CE_c = sum_s (E_{s,c} - E_clean)
                    / sum_s (E^AlexNet_{s,c} - E^AlexNet_clean),
    relative mCE = mean_c relative CE_c.
  The paper's ResNet-50 figures (SupCon paper, Table 3): mCE 67.2 SupCon,
  68.6 cross-entropy.

The published AlexNet errors are means over the 5 severities, so the sums
above are computed as means (identical when all 5 severities are evaluated).
With `--severities` restricting the set, CE is reported but marked
`complete: false` (it is then not comparable with published numbers).

Results: `model_dir/corruption_results.json` and a table on stdout.
"""

import dataclasses
import json
import os
from typing import Dict, List, Mapping, Optional, Sequence

import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distribute
from supcon_tf import enums
from supcon_tf import errors
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.evaluation import results as results_lib
from supcon_tf.evaluation import runner
from supcon_tf.training import checkpoints

RESULTS_FILE = 'corruption_results.json'

# The 15 benchmark corruptions (the mCE set) and the 4 held-out ones; declared
# in config.py, which checks --corruptions when flags are parsed.
CORRUPTIONS = config_lib.CORRUPTIONS
EXTRA_CORRUPTIONS = config_lib.EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)

# Top-1 error of AlexNet on each ImageNet-C corruption, averaged over the 5
# severities: the normalisers of CE. Source: the ImageNet-C authors' numbers
# (github.com/hendrycks/robustness), as copied with that attribution into
# google-research/augmix `imagenet.py` (ALEXNET_ERR, "Raw AlexNet errors taken
# from https://github.com/hendrycks/robustness") and OpenMMLab mmpretrain's
# CorruptionError metric (`_get_ce_alexnet`).
ALEXNET_ERRORS = {
    'gaussian_noise': 0.886428,
    'shot_noise': 0.894468,
    'impulse_noise': 0.922640,
    'defocus_blur': 0.819880,
    'glass_blur': 0.826268,
    'motion_blur': 0.785948,
    'zoom_blur': 0.798360,
    'snow': 0.866816,
    'frost': 0.826572,
    'fog': 0.819324,
    'brightness': 0.564592,
    'contrast': 0.853204,
    'elastic_transform': 0.646056,
    'pixelate': 0.717840,
    'jpeg_compression': 0.606500,
}
# AlexNet's clean top-1 error on the ImageNet validation set, the E_clean of
# the relative mCE's normaliser. The paper's Table 1 lists 43.5 (rounded); the
# network it evaluates is torchvision's pretrained AlexNet
# (alexnet-owt-4df8aa71.pth, ImageNet-C/test.py of hendrycks/robustness),
# whose documented top-1 accuracy is 56.522%, i.e. an error of 0.43478.
ALEXNET_CLEAN_ERROR = 0.43478

# tfds dataset of the corrupted copies of each clean dataset.
CORRUPTED_DATASETS = {
    'cifar10': 'cifar10_corrupted',
    'imagenet2012': 'imagenet2012_corrupted',
}
# Datasets whose corrupted images are already the eval crop (ImageNet-C's are
# the 224 x 224 centre crops of the validation images): they are only resized
# to image_size, not cropped again.
_PRECROPPED = ('imagenet2012_corrupted',)
# tfds config names that differ from the paper's corruption names.
_TFDS_NAMES = {
    'cifar10_corrupted': {'glass_blur': 'frosted_glass_blur',
                          'elastic_transform': 'elastic'},
}


class CorruptionError(errors.UserError, ValueError):
  """Bad corruption settings or data; the message says what to do."""


# -----------------------------------------------------------------------------
# Arithmetic (pure).


def mean_errors(errors: Mapping[str, Mapping[int, float]]) -> Dict[str, float]:
  """{corruption: mean error over its evaluated severities}."""
  return {c: sum(by_severity.values()) / len(by_severity)
          for c, by_severity in errors.items() if by_severity}


def corruption_summary(errors: Mapping[str, Mapping[int, float]],
                       clean_error: Optional[float] = None,
                       alexnet_errors: Optional[Mapping[str, float]] = None,
                       alexnet_clean_error: float = ALEXNET_CLEAN_ERROR,
                       ) -> Dict:
  """Mean errors, and CE / mCE / relative mCE when AlexNet errors are given.

  Args:
    errors: {corruption: {severity: top-1 error in [0, 1]}}.
    clean_error: top-1 error on the clean eval split (for relative CE).
    alexnet_errors: {corruption: AlexNet error averaged over the 5
      severities} (ALEXNET_ERRORS for ImageNet-C), or None for unnormalised
      results only (CIFAR-10-C).
    alexnet_clean_error: AlexNet's clean error.

  Returns:
    {'mean_error': {c: mean_s E_{s,c}}, 'mean_corruption_error': mean_c of
    those (unnormalised), and with `alexnet_errors`: 'corruption_error':
    {c: CE_c}, 'mCE', and with `clean_error` also 'relative_corruption_error'
    and 'relative_mCE'}. CE and mCE cover the corruptions that have an AlexNet
    error (the 15 benchmark ones); all values are fractions (x100 for %).
  """
  means = mean_errors(errors)
  if not means:
    raise CorruptionError('No corruption errors to summarise.')
  summary: Dict = {
      'mean_error': means,
      'mean_corruption_error': sum(means.values()) / len(means),
  }
  if alexnet_errors is None:
    return summary
  normalised = [c for c in means if c in alexnet_errors]
  if not normalised:
    return summary
  ce = {c: means[c] / alexnet_errors[c] for c in normalised}
  summary['corruption_error'] = ce
  summary['mCE'] = sum(ce.values()) / len(ce)
  if clean_error is not None:
    relative = {c: (means[c] - clean_error) /
                   (alexnet_errors[c] - alexnet_clean_error)
                for c in normalised}
    summary['relative_corruption_error'] = relative
    summary['relative_mCE'] = sum(relative.values()) / len(relative)
  return summary


# -----------------------------------------------------------------------------
# Data.


def corrupted_dataset_name(config: config_lib.ExperimentConfig) -> str:
  """`--corruption_dataset`, or the corrupted twin of `--dataset`."""
  name = config.analysis.corruption_dataset
  if name:
    return name
  base = datasets.base_name(config.data.dataset)
  if base not in CORRUPTED_DATASETS:
    raise CorruptionError(
        f'--dataset={config.data.dataset} has no known corrupted version '
        f'(known: {sorted(CORRUPTED_DATASETS)}); pass '
        '--corruption_dataset=cifar10_corrupted or imagenet2012_corrupted '
        '(the model must have the same classes).')
  return CORRUPTED_DATASETS[base]


def selected_corruptions(config: config_lib.ExperimentConfig) -> List[str]:
  """`--corruptions` (default: the 15 benchmark corruptions), validated."""
  names = list(config.analysis.corruptions) or list(CORRUPTIONS)
  allowed = CORRUPTIONS + EXTRA_CORRUPTIONS
  unknown = [n for n in names if n not in allowed]
  if unknown:
    raise CorruptionError(
        f'--corruptions: unknown {unknown}; allowed: {", ".join(allowed)}.')
  return names


def tfds_config_name(dataset: str, corruption: str, severity: int) -> str:
  """tfds name of one corrupted set, e.g. 'cifar10_corrupted/fog_3'."""
  base = datasets.base_name(dataset)
  config_name = _TFDS_NAMES.get(base, {}).get(corruption, corruption)
  return f'{dataset}/{config_name}_{severity}'


def _open(name: str, data_dir: Optional[str]):
  # The tfds checks (prepared offline, image classification) and their
  # error messages are those of datasets.py.
  return datasets.tfds_source(name, data_dir)  # pylint: disable=protected-access


def _eval_split(source) -> str:
  for split in ('test', 'validation'):
    if split in source.split_sizes:
      return split
  raise CorruptionError(
      f'{source.builder.info.full_name} has neither a test nor a validation '
      f'split (splits: {sorted(source.split_sizes)}).')


def check_prepared(names: Sequence[str], data_dir: Optional[str],
                   num_classes: int) -> None:
  """Fails before any evaluation when a corrupted set is unusable.

  Raises:
    datasets.DatasetError: listing every set that is not prepared, with the
      commands that prepare them.
    CorruptionError: a set whose classes differ from the model's.
  """
  missing, first_message = [], ''
  for name in names:
    try:
      source = _open(name, data_dir)
    except datasets.DatasetError as e:
      missing.append(name)
      first_message = first_message or str(e)
      continue
    classes = int(source.builder.info.features[source.label_key].num_classes)
    if classes != num_classes:
      raise CorruptionError(
          f'{name} has {classes} classes but the model has {num_classes}.')
  if missing:
    base = names[0].split('/')[0]
    shown = ' '.join(missing[:4]) + (' ...' if len(missing) > 4 else '')
    raise datasets.DatasetError(
        f'--mode=eval_corruptions needs {len(missing)} corrupted dataset(s) '
        f'that are not prepared in data_dir {data_dir!r}: '
        f'{", ".join(missing[:8])}{" ..." if len(missing) > 8 else ""}.\n'
        'Each corruption and severity is its own tfds config. Prepare them '
        'on a machine with internet access, e.g.\n'
        f'  tfds build {shown} --data_dir=<data_dir>\n'
        f'and copy <data_dir>/{base} into this data_dir, or evaluate fewer '
        'with --corruptions=gaussian_noise,fog --severities=1,3.\n'
        f'For the first missing one, tfds says:\n{first_message}')


def corrupted_examples(name: str, data_dir: Optional[str],
                       input_context: Optional[tf.distribute.InputContext]
                       ) -> tf.data.Dataset:
  """(uint8 [h, w, 3], int32 []) examples of this pipeline's shard."""
  source = _open(name, data_dir)
  split = _eval_split(source)
  total = source.split_sizes[split]
  num_shards, shard_id = 1, 0
  if input_context is not None and input_context.num_input_pipelines > 1:
    num_shards = input_context.num_input_pipelines
    shard_id = input_context.input_pipeline_id
  start, end = datasets.shard_bounds(total, num_shards, shard_id)
  ds = source.builder.as_dataset(split=f'{split}[{start}:{end}]',
                                 shuffle_files=False)
  image_key, label_key = source.image_key, source.label_key
  return ds.map(
      lambda ex: (datasets.to_rgb_uint8(ex[image_key]),  # pylint: disable=protected-access
                  tf.cast(ex[label_key], tf.int32)),
      num_parallel_calls=tf.data.AUTOTUNE)


def _augment_config_for(dataset: str, config: config_lib.ExperimentConfig
                        ) -> config_lib.AugmentConfig:
  if datasets.base_name(dataset) in _PRECROPPED:
    # Square, already cropped: the whole image resized to image_size.
    return dataclasses.replace(
        config.augment, eval_crop_method=enums.EvalCropMethod.CROP_THEN_RESIZE,
        crop_padding=0)
  return config.augment


# -----------------------------------------------------------------------------
# The mode.


def format_table(results: Mapping) -> str:
  """The per-corruption table printed by `--mode=eval_corruptions` (in %)."""
  severities = results['severities']
  has_ce = 'corruption_error' in results
  has_rel = 'relative_corruption_error' in results
  header = f'{"corruption":<18}' + ''.join(f'{"s" + str(s):>7}'
                                           for s in severities)
  header += f'{"mean":>8}' + (f'{"CE":>8}' if has_ce else '') + (
      f'{"relCE":>8}' if has_rel else '')
  lines = [header, '-' * len(header)]
  for c, by_severity in results['errors'].items():
    row = f'{c:<18}' + ''.join(f'{100 * by_severity[str(s)]:>7.2f}'
                               for s in severities)
    row += f'{100 * results["mean_error"][c]:>8.2f}'
    if has_ce:
      ce = results['corruption_error'].get(c)
      row += f'{100 * ce:>8.2f}' if ce is not None else f'{"-":>8}'
    if has_rel:
      rel = results['relative_corruption_error'].get(c)
      row += f'{100 * rel:>8.2f}' if rel is not None else f'{"-":>8}'
    lines.append(row)
  lines.append('-' * len(header))
  lines.append(f'clean error {100 * results["clean_error"]:.2f}; mean '
               'corruption error (unnormalised) '
               f'{100 * results["mean_corruption_error"]:.2f}')
  if has_ce:
    line = f'mCE {100 * results["mCE"]:.2f}'
    if has_rel:
      line += f'; relative mCE {100 * results["relative_mCE"]:.2f}'
    line += ' (AlexNet = 100; paper ResNet-50: SupCon 67.2, CE 68.6)'
    if not results['complete']:
      line += ('  [partial: not all 15 corruptions x 5 severities, not '
               'comparable with published mCE]')
    lines.append(line)
  return '\n'.join(lines)


def evaluate_corruptions(config: config_lib.ExperimentConfig,
                         strategy: tf.distribute.Strategy,
                         model: Optional[models.SupConModel] = None) -> Dict:
  """Errors on every selected corruption and severity; see the module doc."""
  analysis = config.analysis
  info = datasets.get_dataset_info(
      config.data, config.runtime.model_dir)
  dataset = corrupted_dataset_name(config)
  names = selected_corruptions(config)
  severities = sorted(set(int(s) for s in analysis.severities))
  bad = [s for s in severities if s not in SEVERITIES]
  if bad or not severities:
    raise CorruptionError(
        f'--severities: {list(analysis.severities)}; each must be in 1..5.')
  sets = {(c, s): tfds_config_name(dataset, c, s)
          for c in names for s in severities}
  check_prepared(list(sets.values()), config.data.data_dir, info.num_classes)
  if model is None:
    model = checkpoints.load_model_for_inference(config, info, strategy)
  max_batches = config.runtime.max_eval_steps

  model_runner = runner.Runner(model, strategy)
  correct, count = model_runner.count_top1(
      lambda ctx: runner.eval_batches(config, ctx, training_split=False),
      max_batches)
  if count == 0:
    raise CorruptionError(f'The eval split of {info.name} is empty.')
  clean_error = 1.0 - correct / count
  clean_count = count

  augment_config = _augment_config_for(dataset, config)
  errors: Dict[str, Dict[int, float]] = {c: {} for c in names}
  num_examples: Dict[str, int] = {}
  for (c, s), name in sets.items():
    def dataset_fn(ctx, name=name):
      return runner.batch_eval_examples(
          corrupted_examples(name, config.data.data_dir, ctx), config, info,
          ctx, augment_config)
    correct, count = model_runner.count_top1(dataset_fn, max_batches)
    if count == 0:
      raise CorruptionError(f'{name} has no examples.')
    errors[c][s] = 1.0 - correct / count
    num_examples[name] = count
    print(f'[eval_corruptions] {name}: error {100 * errors[c][s]:.2f}% '
          f'({count} images)', flush=True)

  imagenet = datasets.base_name(dataset) == 'imagenet2012_corrupted'
  summary = corruption_summary(
      errors, clean_error, ALEXNET_ERRORS if imagenet else None)
  checkpoint = checkpoints.latest_model_checkpoint(
      config.runtime.model_dir) or ''
  results = {
      'dataset': dataset,
      'clean_dataset': info.name,
      'checkpoint': checkpoint,
      'severities': severities,
      'clean_error': clean_error,
      'clean_num_examples': clean_count,
      'errors': {c: {str(s): e for s, e in by.items()}
                 for c, by in errors.items()},
      'num_examples': num_examples,
      'complete': (set(CORRUPTIONS) <= set(names) and
                   severities == list(SEVERITIES) and not max_batches),
  }
  results.update(summary)
  table = format_table(results)
  model_dir = config.runtime.model_dir
  if model_dir and distribute.is_chief(strategy):
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(os.path.join(model_dir, RESULTS_FILE), 'w') as f:
      f.write(json.dumps(results, indent=2))
    scalars = {'corruptions/mean_corruption_error':
                   results['mean_corruption_error'],
               'corruptions/clean_error': clean_error}
    for key in ('mCE', 'relative_mCE'):
      if key in results:
        scalars[f'corruptions/{key}'] = results[key]
    results_lib.write_scalars(os.path.join(model_dir, 'logs', 'eval'), scalars,
                                results_lib.checkpoint_step(checkpoint))
  print(f'[eval_corruptions] {dataset} (model trained on {info.name}, '
        f'checkpoint {checkpoint or "?"}), top-1 error in %:\n{table}',
        flush=True)
  return results


def run_eval_corruptions(config: config_lib.ExperimentConfig,
                         strategy: tf.distribute.Strategy) -> Dict:
  """The `--mode=eval_corruptions` handler."""
  return evaluate_corruptions(config, strategy)
