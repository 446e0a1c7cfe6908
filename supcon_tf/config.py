"""Flags and the frozen experiment config built from them exactly once.

Each config field is declared once, in the dataclasses below, with
`flag_field(default, help, ...)`: its default (the reference release's,
`hparams_flags.py` / `launcher.py`), its flag name (the field name unless
`flag=` says otherwise; the stage sections prefix theirs with `stage_<i>_`),
its help, how a flag value becomes the field value (`parse=`; list flags are
parsed by element type from the annotation) and its single-field validation
(`check=`). `define_flags()` and `config_from_flags()` are generated from
those declarations, so a flag is a thin override layer. `config_from_flags()`
is called once, in `main`, and the resulting `ExperimentConfig` is what every
other module receives. Invalid values fail here, with a message naming the
flag: single-field checks from the declarations, then the cross-field
constraints in `validate()`.

To add an option, add one line at the end of its section, e.g.

  new_option: int = flag_field(3, 'What it does; 0 = off.', check=at_least(0))

and nothing else: the flag, its parsing and `config_from_flags` follow.

This module imports no TensorFlow.
"""

import dataclasses
import enum
import json
import os
import typing
from typing import Any, Callable, Dict, Optional, Tuple, Type

from absl import flags

from supcon_tf import enums
from supcon_tf.errors import ConfigError

# Learning rates are given for this batch size and scaled by batch / 256.
BASE_BATCH_SIZE = 256

# Aliases of the reference's `--input_fn` values to tfds names.
DATASET_ALIASES = {
    'imagenet': 'imagenet2012',
    'imagenet2012': 'imagenet2012',
    'cifar10': 'cifar10',
    'cifar100': 'cifar100',
}

VALID_RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)
# ResNeXt has bottleneck blocks only (models/resnet.py RESNEXT_DEPTHS).
VALID_RESNEXT_DEPTHS = (50, 101, 152, 200)
# ResNeXt splits 2 * int(64 * width) channels into this many groups
# (models/resnet.py RESNEXT_GROUPS).
RESNEXT_GROUPS = 64

# The 15 benchmark corruptions of Hendrycks & Dietterich, in the paper's order
# (noise, blur, weather, digital); ImageNet-C's mCE averages exactly these.
CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression',
)
# The 4 held-out corruptions of the paper's appendix (tfds has them too); they
# can be evaluated with --corruptions but are not part of mCE.
EXTRA_CORRUPTIONS = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')


# -----------------------------------------------------------------------------
# Declaring a field: flag_field and its checks.

Check = Callable[[Any], Optional[str]]
# parse(flag value, flag name, FlagValues) -> field value.
Parse = Callable[[Any, str, flags.FlagValues], Any]

_UNSET = object()


def flag_field(default, help_text: str, *, flag: Optional[str] = None,
               parse: Optional[Parse] = None, check: Optional[Check] = None,
               flag_default: Any = _UNSET):
  """A config field and its command-line flag, declared in one place.

  Args:
    default: the field's default (also the flag's, unless `flag_default`).
    help_text: the flag's help; `{stage}` is replaced by the stage number in
      the stage sections.
    flag: the flag name; default the field name (prefixed `stage_<i>_` in
      the stage sections).
    parse: `parse(value, flag_name, flag_values)` -> field value, for flags
      whose value is not the field value as is (default: list flags by the
      annotation's element type, others unchanged).
    check: `check(value)` -> None if valid, else the error message (the flag
      name is prepended); see `greater`, `at_least`, `within`, `one_of`.
    flag_default: the flag's default where it differs from the field's
      (`--dataset` is '' and falls back to `--input_fn`).

  Returns:
    A `dataclasses.field` carrying the declaration in its metadata.
  """
  return dataclasses.field(default=default, metadata={
      'flag': flag, 'help': help_text, 'parse': parse, 'check': check,
      'flag_default': flag_default})


def section(default, *, stage: Optional[int] = None):
  """A section of ExperimentConfig; `stage` prefixes its flags stage_<i>_."""
  return dataclasses.field(default=default, metadata={'stage': stage})


def greater(bound) -> Check:
  return lambda v: None if v > bound else f'must be > {bound}, got {v}.'


def at_least(bound, note: str = '') -> Check:
  return lambda v: (None if v >= bound else
                    f'must be >= {bound}{note}, got {v}.')


def within(lo, hi, hi_open: bool = False) -> Check:
  """lo <= v <= hi (or < hi): 'must be in [lo, hi]'."""
  close = ')' if hi_open else ']'
  def check(v):
    ok = lo <= v < hi if hi_open else lo <= v <= hi
    return None if ok else f'must be in [{lo}, {hi}{close}, got {v}.'
  return check


def one_of(choices) -> Check:
  return lambda v: None if v in choices else f'{v} is not one of {choices}.'


def _increasing(v) -> Optional[str]:
  if all(x < y for x, y in zip(v, v[1:])):
    return None
  return f'must be strictly increasing, got {v}.'


def _positive_sizes(what: str) -> Check:
  return lambda v: (None if len(v) > 0 and all(u > 0 for u in v) else
                    f'needs one or more positive {what}, got {v}.')


def _crop_range(v) -> Optional[str]:
  if len(v) == 2 and 0 < v[0] <= v[1] <= 1:
    return None
  return f'needs two values 0 < min <= max <= 1, got {v}.'


def _severities(v) -> Optional[str]:
  if len(v) > 0 and all(1 <= s <= 5 for s in v):
    return None
  return f'each must be in 1..5, got {v}.'


def _corruption_names(v) -> Optional[str]:
  allowed = CORRUPTIONS + EXTRA_CORRUPTIONS
  unknown = [c for c in v if c not in allowed]
  return (f'unknown {unknown}; allowed: {", ".join(allowed)}.' if unknown
          else None)


def _dataset_check(v) -> Optional[str]:
  if not v:
    return 'must name a dataset.'
  for prefix in ('folder:', 'npz:'):
    if v == prefix:
      example = '/data/my_images' + ('.npz' if prefix == 'npz:' else '')
      return f'{prefix} needs a path, e.g. --dataset={prefix}{example}.'
  return None


def _number_list(kind: type, what: str) -> Parse:
  """A list flag's strings -> a tuple of `kind`; ConfigError naming the flag."""
  def parse(values, flag: str, fv=None):
    del fv
    try:
      return tuple(kind(v) for v in values)
    except ValueError as e:
      raise ConfigError(f'--{flag}: expected {what}, got {values}.') from e
  return parse


float_list = _number_list(float, 'numbers')
int_list = _number_list(int, 'integers')


def str_list(values, flag: str, fv=None) -> Tuple[str, ...]:
  del flag, fv
  return tuple(v.strip() for v in values if v.strip())


def resolve_dataset(dataset: str, input_fn: str) -> str:
  """The dataset name: aliases resolved, own-data paths made absolute.

  `folder:PATH` / `npz:PATH` with a local relative PATH (or ~) become
  absolute, so that config.json names the same data from any directory.
  """
  name = dataset or input_fn
  for prefix in ('folder:', 'npz:'):
    if name.startswith(prefix) and len(name) > len(prefix):
      path = name[len(prefix):]
      if '://' not in path:
        path = os.path.abspath(os.path.expanduser(path))
      return prefix + path
  return DATASET_ALIASES.get(name, name)


def _dataset_from_flags(value, flag, fv) -> str:
  del flag
  return resolve_dataset(value, fv['input_fn'].value)


# -----------------------------------------------------------------------------
# The config. Declaration order within a section is the JSON's key order
# (sorted anyway) and the order of the single-field checks.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  architecture: enums.EncoderArchitecture = flag_field(
      enums.EncoderArchitecture.RESNET_V1,
      'Encoder architecture: resnet_v1 or resnext.',
      flag='resnet_architecture')
  depth: int = flag_field(50, f'ResNet depth, one of {VALID_RESNET_DEPTHS}.',
                          flag='resnet_depth',
                          check=one_of(VALID_RESNET_DEPTHS))
  width: float = flag_field(1.0, 'ResNet width multiplier.',
                            flag='resnet_width', check=greater(0))
  first_conv_kernel_size: int = flag_field(
      7, 'Kernel of the stem conv: 7 for ImageNet, 3 for CIFAR.',
      check=greater(0))
  first_conv_stride: int = flag_field(
      2, 'Stride of the stem conv: 2 for ImageNet, 1 for CIFAR.',
      check=greater(0))
  use_initial_max_pool: bool = flag_field(
      True, 'Max-pool after the stem (ImageNet yes, CIFAR no).')
  projection_head_layers: Tuple[int, ...] = flag_field(
      (2048, 128), 'Units of each dense layer of the projection head.',
      check=_positive_sizes('sizes'))
  use_projection_batch_norm: bool = flag_field(
      False, 'Batch norm in the projection head.')
  use_projection_batch_norm_beta: bool = flag_field(
      True, 'Projection head batch norm has a beta (bias).')
  normalize_embedding: bool = flag_field(
      True, 'L2-normalise the encoder output before both heads.')
  zero_initialize_classifier: bool = flag_field(
      False, 'Zero-init the classifier (else Glorot uniform).')
  stop_gradient_before_classification_head: bool = flag_field(
      True, 'No gradient from the classifier into the encoder.')
  stop_gradient_before_projection_head: bool = flag_field(
      False, 'No gradient from the projection head into the encoder.')
  use_global_batch_norm: bool = flag_field(
      True, 'Batch-norm statistics reduced across all replicas.')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  use_labels: bool = flag_field(
      True, 'Labels define positives (SupCon); False = SimCLR.')
  temperature: float = flag_field(0.07, 'Contrastive temperature.',
                                  check=greater(0))
  scale_by_temperature: bool = flag_field(
      True, 'Multiply the contrastive loss by the temperature.')
  contrast_mode: enums.LossContrastMode = flag_field(
      enums.LossContrastMode.ALL_VIEWS, 'all_views or one_view.')
  summation_location: enums.LossSummationLocation = flag_field(
      enums.LossSummationLocation.OUTSIDE,
      'outside (L_out, eq. 2) or inside (L_in, eq. 3).')
  denominator_mode: enums.LossDenominatorMode = flag_field(
      enums.LossDenominatorMode.ALL, 'all, one_positive or only_negatives.')
  # Checked against num_views in validate().
  positives_cap: int = flag_field(
      -1, 'Max positives other than the anchor\'s own views; -1 = no cap. A '
      'multiple of num_views.')
  label_smoothing: float = flag_field(
      0.0, 'Label smoothing of the cross-entropy loss.',
      check=within(0, 1, hi_open=True))
  use_bias_weight_decay: bool = flag_field(
      True, 'Include biases in weight decay.')
  # Anchor samples per block of the memory-bounded loss (losses.supcon_loss
  # chunk_size); 0 = all at once.
  loss_chunk_size: int = flag_field(
      0, 'Compute the contrastive loss over blocks of this many anchor '
      'samples per replica (memory O(N * chunk) instead of O(N^2)); 0 = all '
      'at once.', check=at_least(0, ' (0 = no chunking)'))
  # Beyond the reference (docs/beyond_reference_training.md).
  contrastive_loss: enums.ContrastiveLoss = flag_field(
      enums.ContrastiveLoss.SUPCON,
      'Stage-1 contrastive loss: supcon, or genscl (soft labels: needed with '
      '--mix, uses --teacher targets).')
  momentum: float = flag_field(
      0.999, 'EMA momentum of the key encoder and projection head.',
      check=within(0, 1, hi_open=True))
  queue_size: int = flag_field(
      0, 'Momentum-encoder keys kept as extra contrast samples (MoCo-style '
      'queue); 0 = off.', check=at_least(0, ' (0 = no queue)'))
  teacher: str = flag_field(
      '', 'Distil from this SavedModel (our --mode=export output): targets = '
      '(1 - w) labels + w softmax(teacher logits / T).')
  teacher_temperature: float = flag_field(
      1.0, 'T softening the teacher logits.', check=greater(0))
  teacher_weight: float = flag_field(
      0.5, 'w, the weight of the teacher in the targets.',
      check=within(0, 1))


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One training stage: 1 = encoder + projection head, 2 = classifier.

  Flags are `--stage_<i>_<field>`; stage 2's defaults are STAGE_2_DEFAULTS.
  """
  epochs: float = flag_field(700, 'Epochs of stage {stage}.',
                             check=at_least(0))
  # Checked against epochs in validate().
  warmup_epochs: float = flag_field(
      12.0, 'Linear learning-rate warmup epochs of stage {stage}.',
      check=at_least(0))
  base_learning_rate: float = flag_field(
      0.3, 'Stage {stage} learning rate per 256 images (scaled by batch_size '
      '/ 256).', check=at_least(0))
  optimizer: enums.Optimizer = flag_field(
      enums.Optimizer.RMSPROP, 'rmsprop, momentum, lars, adam or nesterov.')
  learning_rate_decay: enums.DecayType = flag_field(
      enums.DecayType.COSINE,
      'cosine, exponential, piecewise_linear or no_decay.')
  decay_rate: float = flag_field(
      0.1, 'Decay factor (exponential and piecewise_linear).',
      check=greater(0))
  decay_boundary_epochs: Tuple[float, ...] = flag_field(
      (30, 60, 80, 90), 'Epochs at which piecewise_linear decay steps.',
      check=_increasing)
  epochs_per_decay: float = flag_field(
      2.4, 'Epochs between exponential decays.', check=greater(0))
  update_encoder_batch_norm: bool = flag_field(
      True, 'Update encoder BN statistics in stage {stage}.')
  rmsprop_epsilon: float = flag_field(1.0, 'RMSProp epsilon.',
                                      check=greater(0))
  contrastive_loss_weight: float = flag_field(
      1.0, 'Contrastive loss weight in stage {stage}.', check=at_least(0))
  cross_entropy_loss_weight: float = flag_field(
      0.0, 'Cross-entropy loss weight in stage {stage}.', check=at_least(0))
  weight_decay: float = flag_field(
      0.0, 'Weight decay coefficient in stage {stage}.', check=at_least(0))
  use_encoder_weight_decay: bool = flag_field(
      True, 'Decay encoder weights in stage {stage}.')
  use_projection_head_weight_decay: bool = flag_field(
      True, 'Decay projection head weights in stage {stage}.')
  use_classification_head_weight_decay: bool = flag_field(
      False, 'Decay classification head weights in stage {stage}.')
  # Reference fidelity: MOMENTUM / NESTEROV as Keras SGD (rate inside the
  # velocity) instead of the reference's TF1 MomentumOptimizer.
  keras_momentum: bool = flag_field(
      False, 'Stage {stage} momentum / nesterov as Keras SGD (learning rate '
      'inside the velocity) instead of the reference\'s TF1 '
      'MomentumOptimizer (rate outside the accumulator).')


# Stage 2 differs from stage 1 in these reference defaults only.
STAGE_2_DEFAULTS = dict(
    epochs=200, base_learning_rate=0.05, rmsprop_epsilon=0.001,
    contrastive_loss_weight=0.0, cross_entropy_loss_weight=1.0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = flag_field(
      'imagenet2012', 'tfds image classification dataset name, "digits" '
      '(embedded, no download), folder:PATH (PATH/<class>/<images>) or '
      'npz:PATH (x_train, y_train[, x_test, y_test]). Empty = --input_fn.', flag_default='',
      parse=_dataset_from_flags, check=_dataset_check)
  data_dir: Optional[str] = flag_field(None, 'tfds data_dir.')
  # Global batches (all replicas together); divisibility by the replicas is
  # checked where the strategy is known (data/pipeline.py).
  batch_size: int = flag_field(2048, 'Global train batch size.',
                               check=greater(0))
  eval_batch_size: int = flag_field(128, 'Global eval batch size.',
                                    check=greater(0))
  num_views: int = flag_field(
      2, 'Augmented views per image in contrastive training.',
      check=at_least(1))
  num_images: int = flag_field(
      0, 'Use only the first N training images; 0 = all.', check=at_least(0))
  label_noise_prob: float = flag_field(
      0.0, 'Fraction of training labels replaced by random ones.',
      check=within(0, 1))
  shard_per_host: bool = flag_field(True, 'Shard the dataset between hosts.')
  seed: int = flag_field(0, 'Random seed.')
  # Class-balanced training batches (data/samplers.py).
  samples_per_class: int = flag_field(
      0, 'Class-balanced training batches: each global batch holds '
      'batch_size / M classes with M images each (M >= 2; 0 = off, plain '
      'shuffled batches).',
      check=lambda v: None if v == 0 or v >= 2 else (
          f'must be 0 (off) or >= 2 (so every anchor has a same-class '
          f'positive), got {v}.'))
  # Own data (folder:PATH / npz:PATH) and tfds downloads (data/datasets.py).
  folder_test_fraction: float = flag_field(
      0.1, 'folder:/npz: datasets without a test split: share of each class '
      'held out for eval (stratified, fixed by --seed).',
      check=lambda v: None if 0.0 < v < 1.0 else (
          f'must be in (0, 1), got {v}.'))
  download: bool = flag_field(
      True, 'Download and prepare a tfds dataset that is not prepared in '
      '--data_dir (as tfds.load); --nodownload for offline clusters.')
  skip_corrupt_images: bool = flag_field(
      False, 'folder: datasets: decode every file once at start-up and leave '
      'unreadable ones out (counted), instead of failing on them.')


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  image_size: int = flag_field(224, 'Side of model inputs.', check=greater(0))
  augmentation_type: enums.AugmentationType = flag_field(
      enums.AugmentationType.AUTOAUGMENT,
      'simclr, autoaugment, randaugment, stacked_randaugment or identity.')
  augmentation_magnitude: float = flag_field(
      0.5, 'Augmentation strength (RandAugment m / SimCLR s).',
      check=at_least(0))
  blur_probability: float = flag_field(
      0.5, 'Probability of Gaussian blur (SimCLR policies).',
      check=within(0, 1))
  defer_blurring: bool = flag_field(
      True, 'Blur on the accelerator in the train step.')
  use_pytorch_color_jitter: bool = flag_field(
      False, 'torchvision-style colour jitter.')
  apply_whitening: bool = flag_field(
      True, 'Per-dataset mean/std whitening where known (folder:/npz: data: '
      'computed from the training images, stored in model_dir).')
  crop_area_range: Tuple[float, float] = flag_field(
      (0.08, 1.0), 'Min,max fraction of the image area in a random crop.',
      check=_crop_range)
  eval_crop_method: enums.EvalCropMethod = flag_field(
      enums.EvalCropMethod.RESIZE_THEN_CROP,
      'resize_then_crop, crop_then_resize, crop_then_distort or identity.')
  crop_padding: int = flag_field(32, 'Padding of the eval centre crop.',
                                 check=at_least(0))
  warp_probability: float = flag_field(
      0.0, 'Probability of a random perspective warp.',
      check=within(0, 1))
  allow_mixed_precision: bool = flag_field(
      False, 'bfloat16 (float16 on GPU) compute, float32 variables.')
  # Not in the reference (which always flips).
  random_flip: bool = flag_field(
      True, 'Random left-right flips in training (off for digits, text, ...).')
  # Label mixing in the stage-1 train step (data/mixing.py); not reference.
  mix: enums.MixType = flag_field(
      enums.MixType.NONE,
      'Label mixing of stage-1 batches: none, cutmix or mixup.')
  mix_alpha: float = flag_field(
      1.0, 'Beta(alpha, alpha) of the CutMix / Mixup lambda.',
      check=greater(0))
  # Reference fidelity (README "Differences from the reference").
  pil_contrast: bool = flag_field(
      False, 'AutoAugment / RandAugment Contrast blends toward the mean grey '
      'level (PIL) instead of the reference library\'s h*w/256.')
  blur_sigma_per_image: bool = flag_field(
      False, 'Deferred blur draws one sigma per image instead of the '
      'reference\'s one per per-replica batch.')


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
  reference_ckpt: str = flag_field(
      '', 'Checkpoint (dir or prefix) to warm-start from.')
  warm_start_encoder: bool = flag_field(
      False, 'Load encoder weights from --reference_ckpt.')
  warm_start_projection_head: bool = flag_field(
      False, 'Load projection head weights from --reference_ckpt.')
  warm_start_classifier: bool = flag_field(
      False, 'Load classifier weights from --reference_ckpt.')
  batch_norm_in_train_mode: bool = flag_field(
      False, 'Batch norm in train mode when warm starting.')
  ignore_missing_checkpoint_vars: bool = flag_field(
      False, 'Do not fail on variables missing from --reference_ckpt.')


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  mode: enums.Mode = flag_field(
      enums.Mode.TRAIN_THEN_EVAL,
      ', '.join(m.value for m in enums.Mode) + '.')
  # Required by the modes that write or read it: checked in validate().
  model_dir: str = flag_field(
      '', 'Checkpoints, summaries, config.json, results.')
  export_dir: str = flag_field(
      '', 'SavedModel directory (default model_dir/export).')
  tpu: str = flag_field(
      '', 'Cloud TPU name or grpc:// address; empty = no TPU.')
  tpu_zone: Optional[str] = flag_field(None, 'GCE zone of the TPU.')
  gcp_project: Optional[str] = flag_field(None, 'GCP project of the TPU.')
  strategy: enums.StrategyType = flag_field(
      enums.StrategyType.AUTO,
      'auto, tpu, mirrored, multi_worker or one_device.')
  summary_interval_steps: int = flag_field(
      100, 'Steps between TensorBoard summaries.', check=greater(0))
  save_interval_steps: int = flag_field(
      1000, 'Steps between checkpoints.', check=greater(0))
  max_checkpoints_to_keep: int = flag_field(5, 'Checkpoints kept.',
                                            check=greater(0))
  steps_per_loop: int = flag_field(
      1000, 'Train steps per tf.function call.', check=greater(0))
  use_xla: bool = flag_field(False, 'jit_compile the train step.')
  max_train_steps: int = flag_field(
      0, 'Cap on steps per stage; 0 = epochs decide.', check=at_least(0))
  max_eval_steps: int = flag_field(
      0, 'Cap on eval batches; 0 = the whole test split.', check=at_least(0))
  # Reproducible training: op determinism and fixed seeds (see
  # training/trainer.py).
  deterministic: bool = flag_field(
      False, 'Reproducible training: enable TF op determinism and seed '
      'Python, NumPy, TF and Keras with --seed before the model is built, so '
      'an interrupted and resumed run equals an uninterrupted one.')
  override_config: bool = flag_field(
      False, 'Train in a --model_dir whose config.json holds a different '
      'experiment (the file is then replaced).')
  overwrite: bool = flag_field(False, 'Replace a non-empty --export_dir.')
  # Reference fidelity: checkpoint retention and the continuous eval job.
  keep_checkpoint_interval_secs: float = flag_field(
      60 * 60 * 1000 * 10, 'Keep one checkpoint per this many seconds '
      'permanently, besides the newest --max_checkpoints_to_keep (reference '
      'default: 10,000 hours).', check=at_least(0))
  eval_interval_secs: float = flag_field(
      60, 'continuous_eval: at least this many seconds between evaluations '
      '(new checkpoints are looked for this often).', check=at_least(0))
  eval_timeout_secs: float = flag_field(
      60 * 60, 'continuous_eval: stop after waiting this long for a new '
      'checkpoint.', check=at_least(0))
  # Gradient caching (training/grad_cache.py). Here rather than in a training
  # section: switching it between resumes of a model_dir changes no result
  # beyond batch-norm statistics (checkpoints.experiment_diff ignores runtime).
  micro_batch_size: int = flag_field(
      0, 'Stage 1 gradient caching: embed each replica\'s batch in '
      'micro-batches of this many images, take the loss over the whole '
      'batch, then backpropagate micro-batch by micro-batch (exact big '
      'contrastive batches in the memory of a small one, for one extra '
      'forward pass). Must divide the per-replica batch (--batch_size '
      '/ replicas); 0 = off. Ignored by stage 2.',
      check=at_least(0, ' (0 = off)'))


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  """Options of the modes eval_knn, eval_corruptions and plot_embeddings."""
  knn_k: Tuple[int, ...] = flag_field(
      (20, 200), 'eval_knn: neighbour counts k of the weighted kNN vote.',
      check=_positive_sizes('neighbour counts'))
  knn_temperature: float = flag_field(
      0.07, 'eval_knn: temperature T of the exp(cosine / T) vote weights.',
      check=greater(0))
  knn_chunk_size: int = flag_field(
      256, 'eval_knn: test embeddings scored against the train bank per '
      'block (memory chunk x num_train); 0 = all at once.',
      check=at_least(0, ' (0 = no chunking)'))
  corruptions: Tuple[str, ...] = flag_field(
      (), 'eval_corruptions: corruptions to evaluate (e.g. '
      'gaussian_noise,fog); empty = the 15 of ImageNet-C / CIFAR-10-C.',
      check=_corruption_names)
  severities: Tuple[int, ...] = flag_field(
      (1, 2, 3, 4, 5), 'eval_corruptions: severities (1..5) to evaluate.',
      check=_severities)
  corruption_dataset: str = flag_field(
      '', 'eval_corruptions: tfds dataset of corrupted images; empty = '
      '<dataset>_corrupted (cifar10_corrupted, imagenet2012_corrupted).')
  plot_max_points: int = flag_field(
      2000, 'plot_embeddings: test embeddings in the t-SNE plot and '
      'projector.', check=at_least(2))
  # Stage-1 embedding monitor (evaluation/monitor.py).
  monitor_every_epochs: float = flag_field(
      0.0, 'Stage 1: every E epochs, weighted kNN top-1 and collapse '
      'indicators of the embedding on fixed train / test subsets, printed '
      'and logged to TensorBoard; 0 = off.', check=at_least(0))
  monitor_bank_size: int = flag_field(
      2048, 'Monitor: the first N training images form the kNN bank.',
      check=at_least(1))
  monitor_query_size: int = flag_field(
      512, 'Monitor: the first N test images are the kNN queries.',
      check=at_least(1))
  # --mode=eval_retrieval (evaluation/retrieval_eval.py).
  retrieval_ks: Tuple[int, ...] = flag_field(
      (1, 2, 4, 8), 'eval_retrieval: the k of recall@k.')
  retrieval_chunk_size: int = flag_field(
      1024, 'eval_retrieval: queries scored per block (memory chunk x '
      'bank).', check=at_least(1))
  retrieval_max_neighbours: int = flag_field(
      1000, 'eval_retrieval: neighbours kept per query; R is capped at it.',
      check=at_least(1))


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: ModelConfig = section(ModelConfig())
  loss: LossConfig = section(LossConfig())
  data: DataConfig = section(DataConfig())
  augment: AugmentConfig = section(AugmentConfig())
  stage_1: StageConfig = section(StageConfig(), stage=1)
  stage_2: StageConfig = section(StageConfig(**STAGE_2_DEFAULTS), stage=2)
  warm_start: WarmStartConfig = section(WarmStartConfig())
  runtime: RuntimeConfig = section(RuntimeConfig())
  analysis: AnalysisConfig = section(AnalysisConfig())

  def replace(self, **sections) -> 'ExperimentConfig':
    """Returns a copy with whole sections or `section__field` values replaced.

    Example: `config.replace(data__batch_size=32, loss__temperature=0.1)`.
    Enum fields also take their members' names in any case
    (`runtime__mode='train_then_eval'`), tuple fields any sequence. The copy
    is validated.
    """
    updates: Dict[str, Any] = {}
    for key, value in sections.items():
      if '__' in key:
        section_name, field = key.split('__', 1)
        base = updates.get(section_name, getattr(self, section_name))
        if field in {f.name for f in dataclasses.fields(base)}:
          value = _coerce(type(base), field, value)
        updates[section_name] = dataclasses.replace(base, **{field: value})
      else:
        updates[key] = value
    new = dataclasses.replace(self, **updates)
    validate(new)
    return new

  def to_dict(self) -> Dict[str, Any]:
    """JSON-ready nested dict; enums as lower-case names, tuples as lists."""
    return _to_jsonable(dataclasses.asdict(self))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> 'ExperimentConfig':
    """Inverse of `to_dict` (e.g. for `model_dir/config.json`)."""
    sections = {}
    for f in dataclasses.fields(cls):
      if f.name in d:
        sections[f.name] = _section_from_dict(type(f.default), d[f.name])
    config = cls(**sections)
    validate(config)
    return config

  @classmethod
  def from_json(cls, text: str) -> 'ExperimentConfig':
    return cls.from_dict(json.loads(text))


def _to_jsonable(value):
  if isinstance(value, enum.Enum):
    return value.name.lower()
  if isinstance(value, dict):
    return {k: _to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_jsonable(v) for v in value]
  return value


def _section_from_dict(section_cls: Type[Any], d: Dict[str, Any]):
  kwargs = {}
  names = {f.name: f for f in dataclasses.fields(section_cls)}
  unknown = sorted(set(d) - set(names))
  if unknown:
    raise ConfigError(
        f'Unknown {section_cls.__name__} fields in config: {unknown}.')
  for name, value in d.items():
    kwargs[name] = _coerce(section_cls, name, value)
  return section_cls(**kwargs)


def _coerce(section_cls: Type[Any], name: str, value):
  """`value` as the type of the field's default: enum names to members
  (ConfigError naming the field if unknown), sequences to tuples."""
  default = getattr(section_cls(), name)
  if isinstance(default, enum.Enum):
    try:
      return enums.parse_enum(type(default), value)
    except ValueError as e:
      raise ConfigError(f'{section_cls.__name__}.{name}: {e}') from e
  if isinstance(default, tuple) and isinstance(value, (list, tuple)):
    return tuple(value)
  return value


def diff(a: ExperimentConfig, b: ExperimentConfig) -> Dict[str, Tuple[Any, Any]]:
  """Fields whose values differ, as {'section.field': (a_value, b_value)}."""
  da, db = a.to_dict(), b.to_dict()
  out = {}
  for section_name in da:
    for field in da[section_name]:
      if da[section_name][field] != db.get(section_name, {}).get(field):
        out[f'{section_name}.{field}'] = (
            da[section_name][field], db.get(section_name, {}).get(field))
  return out


# -----------------------------------------------------------------------------
# From the declarations to flags, and back.


@dataclasses.dataclass(frozen=True)
class FlagSpec:
  """One flag as generated from a field declaration."""
  flag: str  # The flag name.
  section: str  # The ExperimentConfig section, e.g. 'stage_1'.
  field: dataclasses.Field  # The field of the section's dataclass.
  default: Any  # The flag's default (not yet a flag string).
  help: str


def flag_specs():
  """Yields a FlagSpec per config field, in declaration order.

  Raises:
    TypeError: a field not declared with `flag_field` (e.g. one added in the
      old style, a plain default plus a hand-written DEFINE_*).
  """
  for s in dataclasses.fields(ExperimentConfig):
    stage = s.metadata.get('stage')
    for f in dataclasses.fields(s.default):
      if 'help' not in f.metadata:
        raise TypeError(
            f'{type(s.default).__name__}.{f.name} is not declared with '
            'config.flag_field(default, help, ...); every field is.')
      m = f.metadata
      flag = m['flag'] or f.name
      help_text = m['help']
      if stage is not None:
        flag = f'stage_{stage}_{flag}'
        help_text = help_text.format(stage=stage)
      default = (getattr(s.default, f.name) if m['flag_default'] is _UNSET
                 else m['flag_default'])
      yield FlagSpec(flag, s.name, f, default, help_text)


def _element_type(annotation):
  """int / float / str of a Tuple[...] annotation, else None."""
  if typing.get_origin(annotation) is tuple:
    return typing.get_args(annotation)[0]
  return None


def _define(fv: flags.FlagValues, spec: FlagSpec) -> None:
  """DEFINE_* the flag of `spec` on `fv`, by the field's annotation."""
  kind, default = spec.field.type, spec.default
  if isinstance(kind, type) and issubclass(kind, enum.Enum):
    flags.DEFINE_enum_class(spec.flag, default, kind, spec.help,
                            case_sensitive=False, flag_values=fv)
    return
  if _element_type(kind) is not None:
    define, default = flags.DEFINE_list, [str(x) for x in default]
  else:
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
              float: flags.DEFINE_float, str: flags.DEFINE_string,
              Optional[str]: flags.DEFINE_string}[kind]
  define(spec.flag, default, spec.help, flag_values=fv)


_LIST_PARSERS = {int: int_list, float: float_list, str: str_list}


def _field_value(fv: flags.FlagValues, spec: FlagSpec):
  value = fv[spec.flag].value
  parse = spec.field.metadata['parse']
  if parse is None:
    element = _element_type(spec.field.type)
    parse = _LIST_PARSERS.get(element) if element is not None else None
  return value if parse is None else parse(value, spec.flag, fv)


def define_flags(fv: Optional[flags.FlagValues] = None) -> None:
  """Defines every flag on `fv` (default absl's FLAGS) once; idempotent."""
  fv = flags.FLAGS if fv is None else fv
  if 'resnet_depth' in fv:
    return
  for spec in flag_specs():
    _define(fv, spec)
  # Flags that are no config field.
  flags.DEFINE_string('input_fn', 'imagenet',
                      'Reference alias of --dataset (imagenet, cifar10, ...).',
                      flag_values=fv)
  flags.DEFINE_bool('dry_run', False,
                    'Print the resolved config as JSON and exit.',
                    flag_values=fv)
  flags.DEFINE_alias('whiten', 'apply_whitening', flag_values=fv)
  flags.DEFINE_string('hparams', None,
                      'The reference\'s serialized hparams (e.g. "bs=1024,'
                      't=0.1,s1te=100"): reference defaults plus these values '
                      'replace every hyperparameter flag (see '
                      'reference_hparams.py).', flag_values=fv)


def config_from_flags(fv: flags.FlagValues = flags.FLAGS) -> ExperimentConfig:
  """Builds and validates the ExperimentConfig from parsed flags."""
  kwargs: Dict[str, Dict[str, Any]] = {
      s.name: {} for s in dataclasses.fields(ExperimentConfig)}
  for spec in flag_specs():
    kwargs[spec.section][spec.field.name] = _field_value(fv, spec)
  config = ExperimentConfig(**{
      s.name: type(s.default)(**kwargs[s.name])
      for s in dataclasses.fields(ExperimentConfig)})
  if fv['hparams'].value is not None:
    from supcon_tf import reference_hparams  # pylint: disable=g-import-not-at-top
    config = reference_hparams.apply(config, fv['hparams'].value, fv)
  validate(config)
  return config


# -----------------------------------------------------------------------------
# Validation: the single-field checks of the declarations, then the
# constraints between fields (each names every flag involved).


def _check(condition: bool, flag: str, message: str):
  if not condition:
    raise ConfigError(f'--{flag}: {message}')


def validate(config: ExperimentConfig) -> None:
  """Raises ConfigError naming the flag(s) of the first invalid value."""
  for spec in flag_specs():
    check = spec.field.metadata['check']
    if check is not None:
      message = check(getattr(getattr(config, spec.section), spec.field.name))
      _check(message is None, spec.flag, message)
  _validate_model(config.model)
  l, d = config.loss, config.data
  _check(l.positives_cap == -1 or
         (l.positives_cap >= 0 and l.positives_cap % d.num_views == 0),
         'positives_cap',
         f'must be -1 (no cap) or a non-negative multiple of num_views '
         f'(= {d.num_views}), got {l.positives_cap}.')
  for i, stage in ((1, config.stage_1), (2, config.stage_2)):
    # optim.LearningRateSchedule: the warmup ends before the stage does. A
    # 0-epoch stage is skipped (trainer.train_stage), its warmup unused.
    _check(stage.epochs == 0 or stage.warmup_epochs < stage.epochs,
           f'stage_{i}_warmup_epochs',
           f'{stage.warmup_epochs:g} must be < --stage_{i}_epochs '
           f'({stage.epochs:g}): lower --stage_{i}_warmup_epochs (e.g. '
           f'--stage_{i}_warmup_epochs=0) or raise --stage_{i}_epochs.')
  r = config.runtime
  _check(r.micro_batch_size == 0 or
         (r.micro_batch_size <= d.batch_size and
          d.batch_size % r.micro_batch_size == 0), 'micro_batch_size',
         f'{r.micro_batch_size} must divide --batch_size={d.batch_size} (and '
         'the per-replica batch, --batch_size / replicas); 0 = off.')
  _check(d.samples_per_class == 0 or d.batch_size % d.samples_per_class == 0,
         'samples_per_class',
         f'--batch_size ({d.batch_size}) must be a multiple of '
         f'--samples_per_class ({d.samples_per_class}).')
  an = config.analysis
  _check(len(an.retrieval_ks) > 0 and
         all(1 <= k <= an.retrieval_max_neighbours for k in an.retrieval_ks),
         'retrieval_ks',
         f'each k must be in [1, --retrieval_max_neighbours = '
         f'{an.retrieval_max_neighbours}], got {an.retrieval_ks}.')
  _validate_beyond_reference(config)


def _validate_model(m: ModelConfig) -> None:
  """What models/resnet.py would refuse when the model is built."""
  resnext = m.architecture == enums.EncoderArchitecture.RESNEXT
  _check(not resnext or m.depth in VALID_RESNEXT_DEPTHS, 'resnet_depth',
         f'{m.depth} is not a ResNeXt depth (--resnet_architecture=resnext '
         f'has bottleneck blocks only): one of {VALID_RESNEXT_DEPTHS}.')
  _check(int(64 * m.width) >= 1, 'resnet_width',
         f'{m.width} gives no stem filter (int(64 * width) must be >= 1).')
  _check(not resnext or (2 * int(64 * m.width)) % RESNEXT_GROUPS == 0,
         'resnet_width',
         f'{m.width}: --resnet_architecture=resnext splits '
         f'2 * int(64 * width) channels into {RESNEXT_GROUPS} groups, so the '
         'width must be a multiple of 0.5.')


def _validate_beyond_reference(config: ExperimentConfig) -> None:
  """GenSCL, label mixing, distillation and the momentum queue."""
  l, a = config.loss, config.augment
  genscl = l.contrastive_loss == enums.ContrastiveLoss.GENSCL
  contrastive = config.stage_1.contrastive_loss_weight > 0
  _check(not (a.mix != enums.MixType.NONE and contrastive and l.use_labels
              and not genscl), 'contrastive_loss',
         f'--mix={a.mix.value} gives soft (mixed) labels, which SupCon '
         'cannot use (its positives need hard labels): pass '
         '--contrastive_loss=genscl, or --mix=none, or '
         '--stage_1_contrastive_loss_weight=0.')
  _check(not genscl or l.use_labels, 'contrastive_loss',
         'genscl needs labels (--use_labels); without them use supcon '
         '(SimCLR).')
  if genscl:
    _check(l.positives_cap == -1, 'positives_cap',
           'must be -1 with --contrastive_loss=genscl (no positives cap).')
    _check(l.summation_location == enums.LossSummationLocation.OUTSIDE and
           l.denominator_mode == enums.LossDenominatorMode.ALL,
           'summation_location',
           'GenSCL has one form (it generalises L_out with denominator '
           'all): use --summation_location=outside --denominator_mode=all '
           'with --contrastive_loss=genscl.')
  if l.queue_size > 0:
    _check(l.positives_cap == -1, 'positives_cap',
           'must be -1 with --queue_size > 0 (capping is not defined for '
           'queued keys).')
  if genscl or l.queue_size > 0:
    _check(l.loss_chunk_size == 0, 'loss_chunk_size',
           'must be 0 with --contrastive_loss=genscl or --queue_size > 0 '
           '(those losses are computed densely).')
  _check(not l.teacher or (genscl and contrastive) or
         config.stage_1.cross_entropy_loss_weight > 0, 'teacher',
         'the teacher\'s targets feed GenSCL and the cross-entropy, and this '
         'run has neither in stage 1 (SupCon keeps hard labels): pass '
         '--contrastive_loss=genscl or --stage_1_cross_entropy_loss_weight > '
         '0.')


# Modes that write into --model_dir, and modes that read a checkpoint from it
# (or from --reference_ckpt).
MODEL_DIR_WRITERS = (enums.Mode.PRETRAIN, enums.Mode.CLASSIFIER,
                     enums.Mode.TRAIN, enums.Mode.TRAIN_THEN_EVAL,
                     enums.Mode.SHOW_AUGMENTATIONS, enums.Mode.PLOT_EMBEDDINGS,
                     enums.Mode.CONTINUOUS_EVAL)
MODEL_DIR_READERS = (enums.Mode.EVAL, enums.Mode.EXPORT, enums.Mode.EVAL_KNN,
                     enums.Mode.EVAL_CORRUPTIONS, enums.Mode.EVAL_RETRIEVAL)
# Why a writer needs --model_dir, where it is not for checkpoints.
_MODEL_DIR_USE = {
    enums.Mode.SHOW_AUGMENTATIONS: 'its output goes there',
    enums.Mode.PLOT_EMBEDDINGS: 'its output goes there',
    enums.Mode.CONTINUOUS_EVAL: 'the directory the training job writes its '
                                'checkpoints to',
}


def check_model_dir(config: ExperimentConfig,
                    error: Type[Exception] = ConfigError) -> None:
  """The one check of `--model_dir` against `--mode`; raises `error`.

  Not part of `validate` (a config without a model_dir is valid: `--dry_run`,
  tests); `main` calls it before running a mode, and the trainer, the
  checkpoint loader and the modes call it with their own error class.
  """
  r = config.runtime
  if r.model_dir:
    return
  if r.mode in MODEL_DIR_WRITERS:
    why = _MODEL_DIR_USE.get(
        r.mode, 'checkpoints, config.json and summaries go there')
    raise error(f'--model_dir is required for --mode={r.mode.value} '
                f'({why}).')
  if r.mode in MODEL_DIR_READERS and not config.warm_start.reference_ckpt:
    raise error(f'--model_dir is required for --mode={r.mode.value} '
                '(or --reference_ckpt=CHECKPOINT).')
