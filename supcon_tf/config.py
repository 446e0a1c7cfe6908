"""Flags and the frozen experiment config built from them exactly once.

The dataclasses below hold the one default of every field (the reference
release's defaults, `hparams_flags.py` / `launcher.py`); the absl flags take their
defaults from them, so a flag is a thin override layer. `config_from_flags()` is
called once, in `main`, and the resulting `ExperimentConfig` is what every other
module receives. Invalid values fail here, with a message naming the flag.

This module imports no TensorFlow.
"""

import dataclasses
import enum
import json
from typing import Any, Dict, Optional, Tuple, Type

from absl import flags

from supcon_tf import enums

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


class ConfigError(ValueError):
  """An invalid configuration value; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  architecture: enums.EncoderArchitecture = enums.EncoderArchitecture.RESNET_V1
  depth: int = 50
  width: float = 1.0
  first_conv_kernel_size: int = 7
  first_conv_stride: int = 2
  use_initial_max_pool: bool = True
  projection_head_layers: Tuple[int, ...] = (2048, 128)
  use_projection_batch_norm: bool = False
  use_projection_batch_norm_beta: bool = True
  normalize_embedding: bool = True
  zero_initialize_classifier: bool = False
  stop_gradient_before_classification_head: bool = True
  stop_gradient_before_projection_head: bool = False
  use_global_batch_norm: bool = True


@dataclasses.dataclass(frozen=True)
class LossConfig:
  use_labels: bool = True  # False = SimCLR (each sample its own class).
  temperature: float = 0.07
  scale_by_temperature: bool = True
  contrast_mode: enums.LossContrastMode = enums.LossContrastMode.ALL_VIEWS
  summation_location: enums.LossSummationLocation = (
      enums.LossSummationLocation.OUTSIDE)
  denominator_mode: enums.LossDenominatorMode = enums.LossDenominatorMode.ALL
  positives_cap: int = -1
  label_smoothing: float = 0.0
  use_bias_weight_decay: bool = True
  # Anchor samples per block of the memory-bounded loss (losses.supcon_loss
  # chunk_size); 0 = all at once.
  loss_chunk_size: int = 0
  # Beyond the reference (docs/beyond_reference_training.md).
  contrastive_loss: enums.ContrastiveLoss = enums.ContrastiveLoss.SUPCON
  momentum: float = 0.999  # EMA of the key encoder (momentum queue).
  queue_size: int = 0  # Keys in the momentum queue; 0 = off.
  teacher: str = ''  # Distillation teacher SavedModel; empty = off.
  teacher_temperature: float = 1.0
  teacher_weight: float = 0.5


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One training stage: 1 = encoder + projection head, 2 = classifier."""
  epochs: float = 700
  warmup_epochs: float = 12.0
  base_learning_rate: float = 0.3
  optimizer: enums.Optimizer = enums.Optimizer.RMSPROP
  learning_rate_decay: enums.DecayType = enums.DecayType.COSINE
  decay_rate: float = 0.1
  decay_boundary_epochs: Tuple[float, ...] = (30, 60, 80, 90)
  epochs_per_decay: float = 2.4
  update_encoder_batch_norm: bool = True
  rmsprop_epsilon: float = 1.0
  contrastive_loss_weight: float = 1.0
  cross_entropy_loss_weight: float = 0.0
  weight_decay: float = 0.0
  use_encoder_weight_decay: bool = True
  use_projection_head_weight_decay: bool = True
  use_classification_head_weight_decay: bool = False


# Stage 2 differs from stage 1 in these reference defaults only.
STAGE_2_DEFAULTS = dict(
    epochs=200, base_learning_rate=0.05, rmsprop_epsilon=0.001,
    contrastive_loss_weight=0.0, cross_entropy_loss_weight=1.0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = 'imagenet2012'  # tfds name, or 'digits' (embedded).
  data_dir: Optional[str] = None
  batch_size: int = 2048  # Global train batch (all replicas together).
  eval_batch_size: int = 128
  num_views: int = 2
  num_images: int = 0  # Use only the first N training images; 0 = all.
  label_noise_prob: float = 0.0
  shard_per_host: bool = True
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  image_size: int = 224
  augmentation_type: enums.AugmentationType = enums.AugmentationType.AUTOAUGMENT
  augmentation_magnitude: float = 0.5
  blur_probability: float = 0.5
  defer_blurring: bool = True
  use_pytorch_color_jitter: bool = False
  apply_whitening: bool = True
  crop_area_range: Tuple[float, float] = (0.08, 1.0)
  eval_crop_method: enums.EvalCropMethod = enums.EvalCropMethod.RESIZE_THEN_CROP
  crop_padding: int = 32
  warp_probability: float = 0.0
  allow_mixed_precision: bool = False  # bfloat16 images and compute.
  random_flip: bool = True  # Not in the reference (which always flips).
  # Label mixing in the stage-1 train step (data/mixing.py); not reference.
  mix: enums.MixType = enums.MixType.NONE
  mix_alpha: float = 1.0


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
  reference_ckpt: str = ''
  warm_start_encoder: bool = False
  warm_start_projection_head: bool = False
  warm_start_classifier: bool = False
  batch_norm_in_train_mode: bool = False
  ignore_missing_checkpoint_vars: bool = False


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  mode: enums.Mode = enums.Mode.TRAIN_THEN_EVAL
  model_dir: str = ''
  export_dir: str = ''
  tpu: str = ''
  tpu_zone: Optional[str] = None
  gcp_project: Optional[str] = None
  strategy: enums.StrategyType = enums.StrategyType.AUTO
  summary_interval_steps: int = 100
  save_interval_steps: int = 1000
  max_checkpoints_to_keep: int = 5
  steps_per_loop: int = 1000
  use_xla: bool = False
  max_train_steps: int = 0  # Cap on steps per stage; 0 = epochs decide.
  max_eval_steps: int = 0  # Cap on eval batches; 0 = the whole test split.
  # Reproducible training: op determinism and fixed seeds (see train.py).
  deterministic: bool = False
  # Train in a model_dir whose config.json holds a different experiment.
  override_config: bool = False
  # Replace a non-empty --export_dir.
  overwrite: bool = False
  # Gradient caching (training/grad_cache.py): stage 1 embeds each replica's
  # batch in micro-batches of this many images; 0 = off. Stage 2 ignores it.
  micro_batch_size: int = 0


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  """Options of the modes eval_knn, eval_corruptions and plot_embeddings."""
  knn_k: Tuple[int, ...] = (20, 200)  # Neighbours of the weighted kNN vote.
  knn_temperature: float = 0.07  # T of the exp(cos / T) votes (Wu et al.).
  knn_chunk_size: int = 256  # Test embeddings scored per block; 0 = all.
  # Empty = the 15 benchmark corruptions of Hendrycks & Dietterich.
  corruptions: Tuple[str, ...] = ()
  severities: Tuple[int, ...] = (1, 2, 3, 4, 5)
  corruption_dataset: str = ''  # Empty = <dataset>_corrupted.
  plot_max_points: int = 2000  # Test embeddings in the t-SNE plot.


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: ModelConfig = ModelConfig()
  loss: LossConfig = LossConfig()
  data: DataConfig = DataConfig()
  augment: AugmentConfig = AugmentConfig()
  stage_1: StageConfig = StageConfig()
  stage_2: StageConfig = StageConfig(**STAGE_2_DEFAULTS)
  warm_start: WarmStartConfig = WarmStartConfig()
  runtime: RuntimeConfig = RuntimeConfig()
  analysis: AnalysisConfig = AnalysisConfig()

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
        section, field = key.split('__', 1)
        base = updates.get(section, getattr(self, section))
        if field in {f.name for f in dataclasses.fields(base)}:
          value = _coerce(type(base), field, value)
        updates[section] = dataclasses.replace(base, **{field: value})
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
  for section in da:
    for field in da[section]:
      if da[section][field] != db.get(section, {}).get(field):
        out[f'{section}.{field}'] = (da[section][field],
                                     db.get(section, {}).get(field))
  return out


# -----------------------------------------------------------------------------
# Validation.


def _check(condition: bool, flag: str, message: str):
  if not condition:
    raise ConfigError(f'--{flag}: {message}')


def validate(config: ExperimentConfig) -> None:
  """Raises ConfigError naming the flag of the first invalid value."""
  m, l, d, a = config.model, config.loss, config.data, config.augment
  _check(m.depth in VALID_RESNET_DEPTHS, 'resnet_depth',
         f'{m.depth} is not one of {VALID_RESNET_DEPTHS}.')
  _check(m.width > 0, 'resnet_width', f'must be > 0, got {m.width}.')
  _check(m.first_conv_kernel_size > 0, 'first_conv_kernel_size',
         f'must be > 0, got {m.first_conv_kernel_size}.')
  _check(m.first_conv_stride > 0, 'first_conv_stride',
         f'must be > 0, got {m.first_conv_stride}.')
  _check(len(m.projection_head_layers) > 0 and
         all(u > 0 for u in m.projection_head_layers),
         'projection_head_layers',
         f'needs one or more positive sizes, got {m.projection_head_layers}.')
  _check(l.temperature > 0, 'temperature',
         f'must be > 0, got {l.temperature}.')
  _check(l.positives_cap == -1 or
         (l.positives_cap >= 0 and l.positives_cap % d.num_views == 0),
         'positives_cap',
         f'must be -1 (no cap) or a non-negative multiple of num_views '
         f'(= {d.num_views}), got {l.positives_cap}.')
  _check(0.0 <= l.label_smoothing < 1.0, 'label_smoothing',
         f'must be in [0, 1), got {l.label_smoothing}.')
  _check(l.loss_chunk_size >= 0, 'loss_chunk_size',
         f'must be >= 0 (0 = no chunking), got {l.loss_chunk_size}.')
  _check(d.batch_size > 0, 'batch_size', f'must be > 0, got {d.batch_size}.')
  _check(d.eval_batch_size > 0, 'eval_batch_size',
         f'must be > 0, got {d.eval_batch_size}.')
  _check(d.num_views >= 1, 'num_views', f'must be >= 1, got {d.num_views}.')
  _check(d.num_images >= 0, 'num_images', f'must be >= 0, got {d.num_images}.')
  _check(0.0 <= d.label_noise_prob <= 1.0, 'label_noise_prob',
         f'must be in [0, 1], got {d.label_noise_prob}.')
  _check(bool(d.dataset), 'dataset', 'must name a dataset.')
  _check(a.image_size > 0, 'image_size', f'must be > 0, got {a.image_size}.')
  _check(a.augmentation_magnitude >= 0, 'augmentation_magnitude',
         f'must be >= 0, got {a.augmentation_magnitude}.')
  for name in ('blur_probability', 'warp_probability'):
    value = getattr(a, name)
    _check(0.0 <= value <= 1.0, name, f'must be in [0, 1], got {value}.')
  lo, hi = (a.crop_area_range + (None, None))[:2]
  _check(len(a.crop_area_range) == 2 and 0 < lo <= hi <= 1, 'crop_area_range',
         f'needs two values 0 < min <= max <= 1, got {a.crop_area_range}.')
  _check(a.crop_padding >= 0, 'crop_padding',
         f'must be >= 0, got {a.crop_padding}.')
  for i, stage in ((1, config.stage_1), (2, config.stage_2)):
    p = f'stage_{i}_'
    _check(stage.epochs >= 0, p + 'epochs', f'must be >= 0, got {stage.epochs}.')
    _check(stage.warmup_epochs >= 0, p + 'warmup_epochs',
           f'must be >= 0, got {stage.warmup_epochs}.')
    _check(stage.base_learning_rate >= 0, p + 'base_learning_rate',
           f'must be >= 0, got {stage.base_learning_rate}.')
    _check(stage.weight_decay >= 0, p + 'weight_decay',
           f'must be >= 0, got {stage.weight_decay}.')
    _check(stage.decay_rate > 0, p + 'decay_rate',
           f'must be > 0, got {stage.decay_rate}.')
    _check(stage.epochs_per_decay > 0, p + 'epochs_per_decay',
           f'must be > 0, got {stage.epochs_per_decay}.')
    _check(stage.rmsprop_epsilon > 0, p + 'rmsprop_epsilon',
           f'must be > 0, got {stage.rmsprop_epsilon}.')
    b = stage.decay_boundary_epochs
    _check(all(x < y for x, y in zip(b, b[1:])), p + 'decay_boundary_epochs',
           f'must be strictly increasing, got {b}.')
    for w in ('contrastive_loss_weight', 'cross_entropy_loss_weight'):
      _check(getattr(stage, w) >= 0, p + w,
             f'must be >= 0, got {getattr(stage, w)}.')
  r = config.runtime
  for name in ('summary_interval_steps', 'save_interval_steps',
               'max_checkpoints_to_keep', 'steps_per_loop'):
    _check(getattr(r, name) > 0, name, f'must be > 0, got {getattr(r, name)}.')
  for name in ('max_train_steps', 'max_eval_steps'):
    _check(getattr(r, name) >= 0, name, f'must be >= 0, got {getattr(r, name)}.')
  _check(r.micro_batch_size >= 0, 'micro_batch_size',
         f'must be >= 0 (0 = off), got {r.micro_batch_size}.')
  _check(r.micro_batch_size == 0 or
         (r.micro_batch_size <= d.batch_size and
          d.batch_size % r.micro_batch_size == 0), 'micro_batch_size',
         f'{r.micro_batch_size} must divide --batch_size={d.batch_size} (and '
         'the per-replica batch, --batch_size / replicas); 0 = off.')
  an = config.analysis
  _check(len(an.knn_k) > 0 and all(k > 0 for k in an.knn_k), 'knn_k',
         f'needs one or more positive neighbour counts, got {an.knn_k}.')
  _check(an.knn_temperature > 0, 'knn_temperature',
         f'must be > 0, got {an.knn_temperature}.')
  _check(an.knn_chunk_size >= 0, 'knn_chunk_size',
         f'must be >= 0 (0 = no chunking), got {an.knn_chunk_size}.')
  _check(len(an.severities) > 0 and all(1 <= s <= 5 for s in an.severities),
         'severities', f'each must be in 1..5, got {an.severities}.')
  _check(an.plot_max_points >= 2, 'plot_max_points',
         f'must be >= 2, got {an.plot_max_points}.')
  _validate_beyond_reference(config)


def _validate_beyond_reference(config: ExperimentConfig) -> None:
  """GenSCL, label mixing, distillation and the momentum queue."""
  l, a = config.loss, config.augment
  genscl = l.contrastive_loss == enums.ContrastiveLoss.GENSCL
  contrastive = config.stage_1.contrastive_loss_weight > 0
  _check(a.mix_alpha > 0, 'mix_alpha', f'must be > 0, got {a.mix_alpha}.')
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
  _check(l.queue_size >= 0, 'queue_size',
         f'must be >= 0 (0 = no queue), got {l.queue_size}.')
  _check(0.0 <= l.momentum < 1.0, 'momentum',
         f'must be in [0, 1), got {l.momentum}.')
  if l.queue_size > 0:
    _check(l.positives_cap == -1, 'positives_cap',
           'must be -1 with --queue_size > 0 (capping is not defined for '
           'queued keys).')
  if genscl or l.queue_size > 0:
    _check(l.loss_chunk_size == 0, 'loss_chunk_size',
           'must be 0 with --contrastive_loss=genscl or --queue_size > 0 '
           '(those losses are computed densely).')
  _check(l.teacher_temperature > 0, 'teacher_temperature',
         f'must be > 0, got {l.teacher_temperature}.')
  _check(0.0 <= l.teacher_weight <= 1.0, 'teacher_weight',
         f'must be in [0, 1], got {l.teacher_weight}.')
  _check(not l.teacher or (genscl and contrastive) or
         config.stage_1.cross_entropy_loss_weight > 0, 'teacher',
         'the teacher\'s targets feed GenSCL and the cross-entropy, and this '
         'run has neither in stage 1 (SupCon keeps hard labels): pass '
         '--contrastive_loss=genscl or --stage_1_cross_entropy_loss_weight > '
         '0.')


# -----------------------------------------------------------------------------
# Flags. Defaults come from the dataclasses above.

_M, _L, _D, _A = ModelConfig(), LossConfig(), DataConfig(), AugmentConfig()
_S1, _S2 = StageConfig(), StageConfig(**STAGE_2_DEFAULTS)
_W, _R = WarmStartConfig(), RuntimeConfig()
_AN = AnalysisConfig()


class _Definer:
  """`DEFINE_*` bound to one FlagValues (tests use private ones)."""

  def __init__(self, fv: flags.FlagValues):
    self._fv = fv

  def __getattr__(self, kind):
    define = getattr(flags, 'DEFINE_' + kind)
    return lambda *args, **kwargs: define(*args, flag_values=self._fv,
                                          **kwargs)

  def enum(self, name, default: enum.Enum, help_text):
    flags.DEFINE_enum_class(name, default, type(default), help_text,
                            case_sensitive=False, flag_values=self._fv)


def define_flags(fv: Optional[flags.FlagValues] = None) -> None:
  """Defines every flag on `fv` (default absl's FLAGS) once; idempotent."""
  fv = flags.FLAGS if fv is None else fv
  if 'resnet_depth' in fv:
    return
  d = _Definer(fv)
  # Batch sizes (global, all replicas together).
  d.integer('batch_size', _D.batch_size, 'Global train batch size.')
  d.integer('eval_batch_size', _D.eval_batch_size,
            'Global eval batch size.')
  # Architecture.
  d.enum('resnet_architecture', _M.architecture,
         'Encoder architecture: resnet_v1 or resnext.')
  d.integer('resnet_depth', _M.depth,
            f'ResNet depth, one of {VALID_RESNET_DEPTHS}.')
  d.float('resnet_width', _M.width, 'ResNet width multiplier.')
  d.integer('first_conv_kernel_size', _M.first_conv_kernel_size,
            'Kernel of the stem conv: 7 for ImageNet, 3 for CIFAR.')
  d.integer('first_conv_stride', _M.first_conv_stride,
            'Stride of the stem conv: 2 for ImageNet, 1 for CIFAR.')
  d.bool('use_initial_max_pool', _M.use_initial_max_pool,
         'Max-pool after the stem (ImageNet yes, CIFAR no).')
  d.list('projection_head_layers',
         [str(x) for x in _M.projection_head_layers],
         'Units of each dense layer of the projection head.')
  d.bool('use_projection_batch_norm', _M.use_projection_batch_norm,
         'Batch norm in the projection head.')
  d.bool('use_projection_batch_norm_beta',
         _M.use_projection_batch_norm_beta,
         'Projection head batch norm has a beta (bias).')
  d.bool('normalize_embedding', _M.normalize_embedding,
         'L2-normalise the encoder output before both heads.')
  d.bool('zero_initialize_classifier', _M.zero_initialize_classifier,
         'Zero-init the classifier (else Glorot uniform).')
  d.bool('stop_gradient_before_classification_head',
         _M.stop_gradient_before_classification_head,
         'No gradient from the classifier into the encoder.')
  d.bool('stop_gradient_before_projection_head',
         _M.stop_gradient_before_projection_head,
         'No gradient from the projection head into the encoder.')
  d.bool('use_global_batch_norm', _M.use_global_batch_norm,
         'Batch-norm statistics reduced across all replicas.')
  # Loss.
  d.bool('use_labels', _L.use_labels,
         'Labels define positives (SupCon); False = SimCLR.')
  d.float('temperature', _L.temperature, 'Contrastive temperature.')
  d.bool('scale_by_temperature', _L.scale_by_temperature,
         'Multiply the contrastive loss by the temperature.')
  d.enum('contrast_mode', _L.contrast_mode, 'all_views or one_view.')
  d.enum('summation_location', _L.summation_location,
         'outside (L_out, eq. 2) or inside (L_in, eq. 3).')
  d.enum('denominator_mode', _L.denominator_mode,
         'all, one_positive or only_negatives.')
  d.integer('positives_cap', _L.positives_cap,
            'Max positives other than the anchor\'s own views; -1 '
            '= no cap. A multiple of num_views.')
  d.float('label_smoothing', _L.label_smoothing,
          'Label smoothing of the cross-entropy loss.')
  d.bool('use_bias_weight_decay', _L.use_bias_weight_decay,
         'Include biases in weight decay.')
  d.integer('loss_chunk_size', _L.loss_chunk_size,
            'Compute the contrastive loss over blocks of this many anchor '
            'samples per replica (memory O(N * chunk) instead of O(N^2)); '
            '0 = all at once.')
  # Beyond the reference (docs/beyond_reference_training.md).
  d.enum('contrastive_loss', _L.contrastive_loss,
         'Stage-1 contrastive loss: supcon, or genscl (soft labels: needed '
         'with --mix, uses --teacher targets).')
  d.enum('mix', _A.mix,
         'Label mixing of stage-1 batches: none, cutmix or mixup.')
  d.float('mix_alpha', _A.mix_alpha,
          'Beta(alpha, alpha) of the CutMix / Mixup lambda.')
  d.string('teacher', _L.teacher,
           'Distil from this SavedModel (our --mode=export output): targets '
           '= (1 - w) labels + w softmax(teacher logits / T).')
  d.float('teacher_temperature', _L.teacher_temperature,
          'T softening the teacher logits.')
  d.float('teacher_weight', _L.teacher_weight,
          'w, the weight of the teacher in the targets.')
  d.integer('queue_size', _L.queue_size,
            'Momentum-encoder keys kept as extra contrast samples (MoCo-'
            'style queue); 0 = off.')
  d.float('momentum', _L.momentum,
          'EMA momentum of the key encoder and projection head.')
  # Stages.
  for i, s in ((1, _S1), (2, _S2)):
    p = f'stage_{i}_'
    d.float(p + 'contrastive_loss_weight', s.contrastive_loss_weight,
            f'Contrastive loss weight in stage {i}.')
    d.float(p + 'cross_entropy_loss_weight',
            s.cross_entropy_loss_weight,
            f'Cross-entropy loss weight in stage {i}.')
    d.float(p + 'weight_decay', s.weight_decay,
            f'Weight decay coefficient in stage {i}.')
    d.bool(p + 'use_encoder_weight_decay',
           s.use_encoder_weight_decay,
           f'Decay encoder weights in stage {i}.')
    d.bool(p + 'use_projection_head_weight_decay',
           s.use_projection_head_weight_decay,
           f'Decay projection head weights in stage {i}.')
    d.bool(p + 'use_classification_head_weight_decay',
           s.use_classification_head_weight_decay,
           f'Decay classification head weights in stage {i}.')
    d.float(p + 'epochs', s.epochs, f'Epochs of stage {i}.')
    d.float(p + 'warmup_epochs', s.warmup_epochs,
            f'Linear learning-rate warmup epochs of stage {i}.')
    d.float(p + 'base_learning_rate', s.base_learning_rate,
            f'Stage {i} learning rate per 256 images (scaled by '
            'batch_size / 256).')
    d.enum(p + 'optimizer', s.optimizer,
           'rmsprop, momentum, lars, adam or nesterov.')
    d.enum(p + 'learning_rate_decay', s.learning_rate_decay,
           'cosine, exponential, piecewise_linear or no_decay.')
    d.float(p + 'decay_rate', s.decay_rate,
            'Decay factor (exponential and piecewise_linear).')
    d.list(p + 'decay_boundary_epochs',
           [str(int(x)) for x in s.decay_boundary_epochs],
           'Epochs at which piecewise_linear decay steps.')
    d.float(p + 'epochs_per_decay', s.epochs_per_decay,
            'Epochs between exponential decays.')
    d.bool(p + 'update_encoder_batch_norm',
           s.update_encoder_batch_norm,
           f'Update encoder BN statistics in stage {i}.')
    d.float(p + 'rmsprop_epsilon', s.rmsprop_epsilon,
            'RMSProp epsilon.')
  # Data.
  d.string('dataset', '',
           'tfds image classification dataset name, or "digits" '
           '(embedded, no download). Empty = --input_fn.')
  d.string('input_fn', 'imagenet',
           'Reference alias of --dataset (imagenet, cifar10, ...).')
  d.string('data_dir', _D.data_dir, 'tfds data_dir.')
  d.integer('num_views', _D.num_views,
            'Augmented views per image in contrastive training.')
  d.integer('num_images', _D.num_images,
            'Use only the first N training images; 0 = all.')
  d.float('label_noise_prob', _D.label_noise_prob,
          'Fraction of training labels replaced by random ones.')
  d.bool('shard_per_host', _D.shard_per_host,
         'Shard the dataset between hosts.')
  d.integer('seed', _D.seed, 'Random seed.')
  # Preprocessing.
  d.bool('allow_mixed_precision', _A.allow_mixed_precision,
         'bfloat16 (float16 on GPU) compute, float32 variables.')
  d.integer('image_size', _A.image_size, 'Side of model inputs.')
  d.enum('augmentation_type', _A.augmentation_type,
         'simclr, autoaugment, randaugment, stacked_randaugment or '
         'identity.')
  d.float('augmentation_magnitude', _A.augmentation_magnitude,
          'Augmentation strength (RandAugment m / SimCLR s).')
  d.float('blur_probability', _A.blur_probability,
          'Probability of Gaussian blur (SimCLR policies).')
  d.bool('defer_blurring', _A.defer_blurring,
         'Blur on the accelerator in the train step.')
  d.bool('use_pytorch_color_jitter', _A.use_pytorch_color_jitter,
         'torchvision-style colour jitter.')
  d.bool('apply_whitening', _A.apply_whitening,
         'Per-dataset mean/std whitening where known.')
  d.list('crop_area_range', [str(x) for x in _A.crop_area_range],
         'Min,max fraction of the image area in a random crop.')
  d.enum('eval_crop_method', _A.eval_crop_method,
         'resize_then_crop, crop_then_resize, crop_then_distort or '
         'identity.')
  d.integer('crop_padding', _A.crop_padding,
            'Padding of the eval centre crop.')
  d.float('warp_probability', _A.warp_probability,
          'Probability of a random perspective warp.')
  d.bool('random_flip', _A.random_flip,
         'Random left-right flips in training (off for digits, text, ...).')
  # Warm start.
  d.string('reference_ckpt', _W.reference_ckpt,
           'Checkpoint (dir or prefix) to warm-start from.')
  d.bool('warm_start_encoder', _W.warm_start_encoder,
         'Load encoder weights from --reference_ckpt.')
  d.bool('warm_start_projection_head', _W.warm_start_projection_head,
         'Load projection head weights from --reference_ckpt.')
  d.bool('warm_start_classifier', _W.warm_start_classifier,
         'Load classifier weights from --reference_ckpt.')
  d.bool('batch_norm_in_train_mode', _W.batch_norm_in_train_mode,
         'Batch norm in train mode when warm starting.')
  d.bool('ignore_missing_checkpoint_vars',
         _W.ignore_missing_checkpoint_vars,
         'Do not fail on variables missing from --reference_ckpt.')
  # Runtime.
  d.enum('mode', _R.mode, ', '.join(m.value for m in enums.Mode) + '.')
  d.string('model_dir', _R.model_dir,
           'Checkpoints, summaries, config.json, results.')
  d.string('export_dir', _R.export_dir,
           'SavedModel directory (default model_dir/export).')
  d.string('tpu', _R.tpu,
           'Cloud TPU name or grpc:// address; empty = no TPU.')
  d.string('tpu_zone', _R.tpu_zone, 'GCE zone of the TPU.')
  d.string('gcp_project', _R.gcp_project, 'GCP project of the TPU.')
  d.enum('strategy', _R.strategy,
         'auto, tpu, mirrored, multi_worker or one_device.')
  d.integer('summary_interval_steps', _R.summary_interval_steps,
            'Steps between TensorBoard summaries.')
  d.integer('save_interval_steps', _R.save_interval_steps,
            'Steps between checkpoints.')
  d.integer('max_checkpoints_to_keep', _R.max_checkpoints_to_keep,
            'Checkpoints kept.')
  d.integer('steps_per_loop', _R.steps_per_loop,
            'Train steps per tf.function call.')
  d.bool('use_xla', _R.use_xla, 'jit_compile the train step.')
  d.integer('max_train_steps', _R.max_train_steps,
            'Cap on steps per stage; 0 = epochs decide.')
  d.integer('max_eval_steps', _R.max_eval_steps,
            'Cap on eval batches; 0 = the whole test split.')
  d.bool('deterministic', _R.deterministic,
         'Reproducible training: enable TF op determinism and seed Python, '
         'NumPy, TF and Keras with --seed before the model is built, so an '
         'interrupted and resumed run equals an uninterrupted one.')
  d.bool('override_config', _R.override_config,
         'Train in a --model_dir whose config.json holds a different '
         'experiment (the file is then replaced).')
  d.bool('overwrite', _R.overwrite,
         'Replace a non-empty --export_dir.')
  d.integer('micro_batch_size', _R.micro_batch_size,
            'Stage 1 gradient caching: embed each replica\'s batch in '
            'micro-batches of this many images, take the loss over the whole '
            'batch, then backpropagate micro-batch by micro-batch (exact big '
            'contrastive batches in the memory of a small one, for one extra '
            'forward pass). Must divide the per-replica batch (--batch_size '
            '/ replicas); 0 = off. Ignored by stage 2.')
  # Analysis modes (eval_knn, eval_corruptions, plot_embeddings).
  d.list('knn_k', [str(k) for k in _AN.knn_k],
         'eval_knn: neighbour counts k of the weighted kNN vote.')
  d.float('knn_temperature', _AN.knn_temperature,
          'eval_knn: temperature T of the exp(cosine / T) vote weights.')
  d.integer('knn_chunk_size', _AN.knn_chunk_size,
            'eval_knn: test embeddings scored against the train bank per '
            'block (memory chunk x num_train); 0 = all at once.')
  d.list('corruptions', list(_AN.corruptions),
         'eval_corruptions: corruptions to evaluate (e.g. gaussian_noise,fog);'
         ' empty = the 15 of ImageNet-C / CIFAR-10-C.')
  d.list('severities', [str(s) for s in _AN.severities],
         'eval_corruptions: severities (1..5) to evaluate.')
  d.string('corruption_dataset', _AN.corruption_dataset,
           'eval_corruptions: tfds dataset of corrupted images; empty = '
           '<dataset>_corrupted (cifar10_corrupted, imagenet2012_corrupted).')
  d.integer('plot_max_points', _AN.plot_max_points,
            'plot_embeddings: test embeddings in the t-SNE plot and '
            'projector.')
  d.bool('dry_run', False,
         'Print the resolved config as JSON and exit.')


def _float_list(name: str, values) -> Tuple[float, ...]:
  try:
    return tuple(float(v) for v in values)
  except ValueError as e:
    raise ConfigError(f'--{name}: expected numbers, got {values}.') from e


def _int_list(name: str, values) -> Tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except ValueError as e:
    raise ConfigError(f'--{name}: expected integers, got {values}.') from e


def resolve_dataset(dataset: str, input_fn: str) -> str:
  name = dataset or input_fn
  return DATASET_ALIASES.get(name, name)


def config_from_flags(fv: flags.FlagValues = flags.FLAGS) -> ExperimentConfig:
  """Builds and validates the ExperimentConfig from parsed flags."""
  def stage(i):
    p = f'stage_{i}_'
    g = lambda name: fv[p + name].value  # pylint: disable=unnecessary-lambda-assignment
    return StageConfig(
        epochs=g('epochs'), warmup_epochs=g('warmup_epochs'),
        base_learning_rate=g('base_learning_rate'), optimizer=g('optimizer'),
        learning_rate_decay=g('learning_rate_decay'),
        decay_rate=g('decay_rate'),
        decay_boundary_epochs=_float_list(p + 'decay_boundary_epochs',
                                          g('decay_boundary_epochs')),
        epochs_per_decay=g('epochs_per_decay'),
        update_encoder_batch_norm=g('update_encoder_batch_norm'),
        rmsprop_epsilon=g('rmsprop_epsilon'),
        contrastive_loss_weight=g('contrastive_loss_weight'),
        cross_entropy_loss_weight=g('cross_entropy_loss_weight'),
        weight_decay=g('weight_decay'),
        use_encoder_weight_decay=g('use_encoder_weight_decay'),
        use_projection_head_weight_decay=g('use_projection_head_weight_decay'),
        use_classification_head_weight_decay=g(
            'use_classification_head_weight_decay'))

  config = ExperimentConfig(
      model=ModelConfig(
          architecture=fv.resnet_architecture, depth=fv.resnet_depth,
          width=fv.resnet_width,
          first_conv_kernel_size=fv.first_conv_kernel_size,
          first_conv_stride=fv.first_conv_stride,
          use_initial_max_pool=fv.use_initial_max_pool,
          projection_head_layers=_int_list('projection_head_layers',
                                           fv.projection_head_layers),
          use_projection_batch_norm=fv.use_projection_batch_norm,
          use_projection_batch_norm_beta=fv.use_projection_batch_norm_beta,
          normalize_embedding=fv.normalize_embedding,
          zero_initialize_classifier=fv.zero_initialize_classifier,
          stop_gradient_before_classification_head=(
              fv.stop_gradient_before_classification_head),
          stop_gradient_before_projection_head=(
              fv.stop_gradient_before_projection_head),
          use_global_batch_norm=fv.use_global_batch_norm),
      loss=LossConfig(
          use_labels=fv.use_labels, temperature=fv.temperature,
          scale_by_temperature=fv.scale_by_temperature,
          contrast_mode=fv.contrast_mode,
          summation_location=fv.summation_location,
          denominator_mode=fv.denominator_mode,
          positives_cap=fv.positives_cap, label_smoothing=fv.label_smoothing,
          use_bias_weight_decay=fv.use_bias_weight_decay,
          loss_chunk_size=fv.loss_chunk_size,
          contrastive_loss=fv.contrastive_loss, momentum=fv.momentum,
          queue_size=fv.queue_size, teacher=fv.teacher,
          teacher_temperature=fv.teacher_temperature,
          teacher_weight=fv.teacher_weight),
      data=DataConfig(
          dataset=resolve_dataset(fv.dataset, fv.input_fn),
          data_dir=fv.data_dir, batch_size=fv.batch_size,
          eval_batch_size=fv.eval_batch_size, num_views=fv.num_views,
          num_images=fv.num_images, label_noise_prob=fv.label_noise_prob,
          shard_per_host=fv.shard_per_host, seed=fv.seed),
      augment=AugmentConfig(
          image_size=fv.image_size, augmentation_type=fv.augmentation_type,
          augmentation_magnitude=fv.augmentation_magnitude,
          blur_probability=fv.blur_probability,
          defer_blurring=fv.defer_blurring,
          use_pytorch_color_jitter=fv.use_pytorch_color_jitter,
          apply_whitening=fv.apply_whitening,
          crop_area_range=_float_list('crop_area_range', fv.crop_area_range),
          eval_crop_method=fv.eval_crop_method, crop_padding=fv.crop_padding,
          warp_probability=fv.warp_probability,
          allow_mixed_precision=fv.allow_mixed_precision,
          random_flip=fv.random_flip, mix=fv.mix,
          mix_alpha=fv.mix_alpha),
      stage_1=stage(1),
      stage_2=stage(2),
      warm_start=WarmStartConfig(
          reference_ckpt=fv.reference_ckpt,
          warm_start_encoder=fv.warm_start_encoder,
          warm_start_projection_head=fv.warm_start_projection_head,
          warm_start_classifier=fv.warm_start_classifier,
          batch_norm_in_train_mode=fv.batch_norm_in_train_mode,
          ignore_missing_checkpoint_vars=fv.ignore_missing_checkpoint_vars),
      runtime=RuntimeConfig(
          mode=fv.mode, model_dir=fv.model_dir, export_dir=fv.export_dir,
          tpu=fv.tpu, tpu_zone=fv.tpu_zone, gcp_project=fv.gcp_project,
          strategy=fv.strategy,
          summary_interval_steps=fv.summary_interval_steps,
          save_interval_steps=fv.save_interval_steps,
          max_checkpoints_to_keep=fv.max_checkpoints_to_keep,
          steps_per_loop=fv.steps_per_loop, use_xla=fv.use_xla,
          max_train_steps=fv.max_train_steps,
          max_eval_steps=fv.max_eval_steps,
          deterministic=fv.deterministic,
          override_config=fv.override_config, overwrite=fv.overwrite,
          micro_batch_size=fv.micro_batch_size),
      analysis=AnalysisConfig(
          knn_k=_int_list('knn_k', fv.knn_k),
          knn_temperature=fv.knn_temperature,
          knn_chunk_size=fv.knn_chunk_size,
          corruptions=tuple(c.strip() for c in fv.corruptions if c.strip()),
          severities=_int_list('severities', fv.severities),
          corruption_dataset=fv.corruption_dataset,
          plot_max_points=fv.plot_max_points),
  )
  validate(config)
  return config
