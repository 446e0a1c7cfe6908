"""`--hparams`: the reference release's serialized hyperparameters.

The reference's launcher takes `--hparams="bs=1024,t=0.1,s1te=100,..."`, the
serialization of its `hparams.HParams` (comma-separated `abbrev=value`; stage
fields carry the prefix `s1` / `s2`; enums by their value, e.g. `au=sr`;
booleans as 0 / 1 / true / false; lists as `[a,b]`). When it is given, the
reference ignores every individual hyperparameter flag and starts from the
HParams class defaults (which differ from the flags' defaults: e.g. `t=1.0`,
`ul=0`, stage 2 as stage 1). `apply` does the same; an individual
hyperparameter flag passed together with `--hparams` is an error instead of
being ignored silently. No TensorFlow import.
"""

import csv
import enum
import re
from typing import Any, Dict, Tuple

from supcon_tf import config as config_lib
from supcon_tf import enums

E = enums

# abbrev -> (config key `section__field`, reference default, our flag).
_STAGE_FIELDS = {
    'te': ('epochs', 700.0, 'epochs'),
    'wu': ('warmup_epochs', 12.0, 'warmup_epochs'),
    'lr': ('base_learning_rate', 0.3, 'base_learning_rate'),
    'de': ('learning_rate_decay', E.DecayType.COSINE, 'learning_rate_decay'),
    'dr': ('decay_rate', 0.1, 'decay_rate'),
    'be': ('decay_boundary_epochs', (30, 60, 80, 90), 'decay_boundary_epochs'),
    'epd': ('epochs_per_decay', 2.4, 'epochs_per_decay'),
    'op': ('optimizer', E.Optimizer.RMSPROP, 'optimizer'),
    'ebn': ('update_encoder_batch_norm', True, 'update_encoder_batch_norm'),
    'rep': ('rmsprop_epsilon', 1.0, 'rmsprop_epsilon'),
    'cw': ('contrastive_loss_weight', 1.0, 'contrastive_loss_weight'),
    'xw': ('cross_entropy_loss_weight', 1.0, 'cross_entropy_loss_weight'),
    'wd': ('weight_decay', 1e-4, 'weight_decay'),
    'ed': ('use_encoder_weight_decay', True, 'use_encoder_weight_decay'),
    'pd': ('use_projection_head_weight_decay', True,
           'use_projection_head_weight_decay'),
    'cd': ('use_classification_head_weight_decay', True,
           'use_classification_head_weight_decay'),
}

HPARAMS: Dict[str, Tuple[str, Any, str]] = {
    'bs': ('data__batch_size', 2048, 'batch_size'),
    'ebs': ('data__eval_batch_size', 128, 'eval_batch_size'),
    'ea': ('model__architecture', E.EncoderArchitecture.RESNET_V1,
           'resnet_architecture'),
    'd': ('model__depth', 50, 'resnet_depth'),
    'w': ('model__width', 1.0, 'resnet_width'),
    'fk': ('model__first_conv_kernel_size', 7, 'first_conv_kernel_size'),
    'fs': ('model__first_conv_stride', 2, 'first_conv_stride'),
    'imp': ('model__use_initial_max_pool', True, 'use_initial_max_pool'),
    'phl': ('model__projection_head_layers', (2048, 128),
            'projection_head_layers'),
    'up': ('model__use_projection_batch_norm', False,
           'use_projection_batch_norm'),
    'pb': ('model__use_projection_batch_norm_beta', True,
           'use_projection_batch_norm_beta'),
    # Ours has one switch for both heads' input normalisation.
    'phn': ('model__normalize_embedding', True, 'normalize_embedding'),
    'chn': ('model__normalize_embedding', True, 'normalize_embedding'),
    'czi': ('model__zero_initialize_classifier', False,
            'zero_initialize_classifier'),
    'sgc': ('model__stop_gradient_before_classification_head', True,
            'stop_gradient_before_classification_head'),
    'sgp': ('model__stop_gradient_before_projection_head', False,
            'stop_gradient_before_projection_head'),
    'gbp': ('model__use_global_batch_norm', True, 'use_global_batch_norm'),
    'ul': ('loss__use_labels', False, 'use_labels'),
    't': ('loss__temperature', 1.0, 'temperature'),
    'cm': ('loss__contrast_mode', E.LossContrastMode.ALL_VIEWS,
           'contrast_mode'),
    'sl': ('loss__summation_location', E.LossSummationLocation.OUTSIDE,
           'summation_location'),
    'dm': ('loss__denominator_mode', E.LossDenominatorMode.ALL,
           'denominator_mode'),
    'pc': ('loss__positives_cap', -1, 'positives_cap'),
    'sbt': ('loss__scale_by_temperature', True, 'scale_by_temperature'),
    'ls': ('loss__label_smoothing', 0.0, 'label_smoothing'),
    'bd': ('loss__use_bias_weight_decay', True, 'use_bias_weight_decay'),
    'bf': ('augment__allow_mixed_precision', False, 'allow_mixed_precision'),
    'is': ('augment__image_size', 224, 'image_size'),
    'au': ('augment__augmentation_type', E.AugmentationType.SIMCLR,
           'augmentation_type'),
    'm': ('augment__augmentation_magnitude', 0.5, 'augmentation_magnitude'),
    'wp': ('augment__warp_probability', 0.0, 'warp_probability'),
    'bp': ('augment__blur_probability', 0.5, 'blur_probability'),
    'db': ('augment__defer_blurring', True, 'defer_blurring'),
    'pj': ('augment__use_pytorch_color_jitter', False,
           'use_pytorch_color_jitter'),
    'wh': ('augment__apply_whitening', True, 'apply_whitening'),
    'ar': ('augment__crop_area_range', (0.08, 1.0), 'crop_area_range'),
    'ec': ('augment__eval_crop_method', E.EvalCropMethod.RESIZE_THEN_CROP,
           'eval_crop_method'),
    'cp': ('augment__crop_padding', 32, 'crop_padding'),
    'nv': ('data__num_views', 2, 'num_views'),
    'ds': ('data__dataset', 'imagenet', 'input_fn'),
    'ms': ('data__num_images', -1, 'num_images'),
    'ln': ('data__label_noise_prob', 0.0, 'label_noise_prob'),
    'hs': ('data__shard_per_host', True, 'shard_per_host'),
    'wsc': ('warm_start__warm_start_classifier', False,
            'warm_start_classifier'),
    'wsp': ('warm_start__warm_start_projection_head', False,
            'warm_start_projection_head'),
    'wse': ('warm_start__warm_start_encoder', False, 'warm_start_encoder'),
    'wsi': ('warm_start__ignore_missing_checkpoint_vars', False,
            'ignore_missing_checkpoint_vars'),
    'wsb': ('warm_start__batch_norm_in_train_mode', False,
            'batch_norm_in_train_mode'),
}
for _i in (1, 2):
  for _abbrev, (_field, _default, _flag) in _STAGE_FIELDS.items():
    HPARAMS[f's{_i}{_abbrev}'] = (f'stage_{_i}__{_field}', _default,
                                  f'stage_{_i}_{_flag}')

# Flags that --hparams replaces (ours: --dataset is --input_fn's twin).
REPLACED_FLAGS = frozenset(flag for _, _, flag in HPARAMS.values()) | {
    'dataset'}

# One `name=value` clause: a quoted string, a [list] or a single token.
_CLAUSE = re.compile(
    r'\s*(?P<name>[a-zA-Z][\w.]*)\s*=\s*'
    r'(?:(?P<strval>"[^"]*")|\[(?P<vals>[^\]]*)\]|(?P<val>[^,\[]*))'
    r'\s*(?:$|,)')


def _error(message: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(f'--hparams: {message}')


def _parse_scalar(name: str, text: str, default):
  """`text` as the type of the reference default `default`."""
  text = text.strip()
  try:
    if isinstance(default, bool):
      if text in ('true', 'True'):
        return True
      if text in ('false', 'False'):
        return False
      return bool(int(text))
    if isinstance(default, enum.Enum):
      return type(default)(text)
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
    return text
  except ValueError as e:
    expected = (', '.join(m.value for m in type(default))
                if isinstance(default, enum.Enum) else type(default).__name__)
    raise _error(f'{name}={text!r} is not a valid value (expected '
                 f'{expected}).') from e


def parse(serialized: str) -> Dict[str, Any]:
  """`abbrev=value,...` -> {abbrev: value} typed as the reference's HParams.

  Raises:
    config_lib.ConfigError: malformed text, an unknown or repeated name, or a
      value of the wrong type.
  """
  values: Dict[str, Any] = {}
  pos = 0
  serialized = serialized.strip()
  while pos < len(serialized):
    m = _CLAUSE.match(serialized, pos)
    if not m or m.end() == pos:
      raise _error(f'cannot parse {serialized[pos:]!r}; expected '
                   'comma-separated name=value pairs.')
    pos = m.end()
    name = m.group('name')
    if name not in HPARAMS:
      raise _error(f'unknown hyperparameter {name!r}; known: '
                   f'{", ".join(sorted(HPARAMS))}.')
    if name in values:
      raise _error(f'{name} is assigned twice.')
    default = HPARAMS[name][1]
    is_list = isinstance(default, tuple)
    scalar_default = default[0] if is_list else default
    if m.group('vals') is not None:
      if not is_list:
        raise _error(f'{name} takes one value, got [{m.group("vals")}].')
      items = next(csv.reader([m.group('vals')])) if m.group('vals') else []
      values[name] = tuple(_parse_scalar(name, v, scalar_default)
                           for v in items)
    else:
      text = (m.group('strval')[1:-1] if m.group('strval') is not None
              else m.group('val'))
      if not text.strip():
        raise _error(f'{name} has an empty value.')
      value = _parse_scalar(name, text, scalar_default)
      values[name] = (value,) if is_list else value
  return values


def apply(config: config_lib.ExperimentConfig, serialized: str,
          fv=None) -> config_lib.ExperimentConfig:
  """`config` with every hyperparameter set as the reference's `--hparams`.

  Args:
    config: the config built from the flags (non-hyperparameter flags such
      as --mode, --model_dir, --tpu and ours are kept).
    serialized: the `--hparams` text.
    fv: the parsed FlagValues, to reject hyperparameter flags given
      alongside (None: not checked).

  Returns:
    The validated config: the reference HParams defaults plus `serialized`.

  Raises:
    config_lib.ConfigError: see `parse`; also a hyperparameter flag given
      alongside, or phn != chn.
  """
  if fv is not None:
    given = sorted(f for f in REPLACED_FLAGS if f in fv and fv[f].present)
    if given:
      raise _error(
          f'replaces the individual hyperparameter flags, but '
          f'{", ".join("--" + f for f in given)} was given too (the '
          'reference would ignore it): put it into --hparams or drop it.')
  parsed = parse(serialized)
  if parsed.get('phn', True) != parsed.get('chn', True):
    raise _error('phn and chn must be equal (one --normalize_embedding '
                 'switch normalises both heads\' inputs here).')
  updates: Dict[str, Any] = {}
  for abbrev, (key, default, _) in HPARAMS.items():
    value = parsed.get(abbrev, default)
    if key == 'data__dataset':
      value = config_lib.resolve_dataset('', value)
    elif key == 'data__num_images':
      value = max(int(value), 0)  # Reference -1 = all = our 0.
    elif key.endswith('decay_boundary_epochs'):
      value = tuple(float(v) for v in value)
    updates[key] = value
  return config.replace(**updates)
