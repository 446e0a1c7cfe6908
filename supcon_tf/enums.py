"""Every mode switch of supcon_tf as an Enum.

This module imports no TensorFlow so that configs and flag parsing stay cheap.
Member values are the reference release's short codes (``'a'``, ``'o'``, ...) so a
serialised reference hparams string maps one to one; ``parse_enum`` also accepts
the member name in any case (``ALL_VIEWS``, ``all_views``) and members themselves.
"""

import enum
from typing import Type, TypeVar, Union

E = TypeVar('E', bound=enum.Enum)


@enum.unique
class AugmentationType(enum.Enum):
  """Training-time augmentation policy."""
  SIMCLR = 's'  # Chen et al. 2020, https://arxiv.org/abs/2002.05709
  AUTOAUGMENT = 'a'  # Cubuk et al. 2018, ImageNet policy.
  RANDAUGMENT = 'r'  # Cubuk et al. 2019.
  STACKED_RANDAUGMENT = 'sr'  # SimCLR followed by RandAugment.
  IDENTITY = 'i'


@enum.unique
class LossContrastMode(enum.Enum):
  ALL_VIEWS = 'a'  # Every view is an anchor.
  ONE_VIEW = 'o'  # Only the first view of each sample is an anchor.


@enum.unique
class LossSummationLocation(enum.Enum):
  OUTSIDE = 'o'  # L_out, paper eq. 2: mean over positives outside the log.
  INSIDE = 'i'  # L_in, paper eq. 3: mean over positives inside the log.


@enum.unique
class LossDenominatorMode(enum.Enum):
  ALL = 'a'  # Every other sample (positives and negatives).
  ONE_POSITIVE = 'o'  # The numerator's positive plus all negatives.
  ONLY_NEGATIVES = 'n'  # Negatives only.


@enum.unique
class Optimizer(enum.Enum):
  RMSPROP = 'r'
  MOMENTUM = 'm'
  LARS = 'l'
  ADAM = 'a'
  NESTEROV = 'n'


@enum.unique
class EncoderArchitecture(enum.Enum):
  RESNET_V1 = 'r1'
  RESNEXT = 'rx'


@enum.unique
class DecayType(enum.Enum):
  COSINE = 'c'
  EXPONENTIAL = 'e'
  PIECEWISE_LINEAR = 'p'
  NO_DECAY = 'n'


@enum.unique
class EvalCropMethod(enum.Enum):
  """How eval images are brought to `image_size` (reference semantics)."""
  # Resize so the short side is image_size + crop_padding, then centre-crop
  # image_size x image_size.
  RESIZE_THEN_CROP = 'rc'
  # Centre-crop a square of side short_side * image_size / (image_size +
  # crop_padding), then resize to image_size x image_size.
  CROP_THEN_RESIZE = 'cr'
  # Centre-crop image_size / (image_size + crop_padding) of each side (keeps the
  # aspect ratio), then resize to a square, which distorts the image.
  CROP_THEN_DISTORT = 'cd'
  # Nothing: the image must already be image_size x image_size.
  IDENTITY = 'i'


@enum.unique
class Mode(enum.Enum):
  """What `python -m supcon_tf.main` does."""
  PRETRAIN = 'pretrain'  # Stage 1: encoder + projection head.
  CLASSIFIER = 'classifier'  # Stage 2: classification head, frozen encoder.
  TRAIN = 'train'  # Stage 1 then stage 2 (the reference's `train`).
  TRAIN_THEN_EVAL = 'train_then_eval'  # Both stages, then eval.
  EVAL = 'eval'  # Top-1 / top-5 on the test split.
  EXPORT = 'export'  # SavedModel for serving.
  SHOW_AUGMENTATIONS = 'show_augmentations'  # PNG grid of augmented views.
  EVAL_KNN = 'eval_knn'  # Weighted kNN accuracy of the embedding.
  EVAL_CORRUPTIONS = 'eval_corruptions'  # ImageNet-C / CIFAR-10-C errors.
  PLOT_EMBEDDINGS = 'plot_embeddings'  # t-SNE plot and projector files.
  # The reference's eval job: evaluate and export each new checkpoint of
  # model_dir until the one at the last train step.
  CONTINUOUS_EVAL = 'continuous_eval'
  EVAL_RETRIEVAL = 'eval_retrieval'  # Precision@1, MAP@R, recall@k, NMI.


@enum.unique
class StrategyType(enum.Enum):
  """Which tf.distribute strategy to build."""
  AUTO = 'auto'  # TPU if --tpu, multi-worker if TF_CONFIG, mirrored if >1 GPU.
  TPU = 'tpu'
  MIRRORED = 'mirrored'
  MULTI_WORKER = 'multi_worker'
  ONE_DEVICE = 'one_device'


@enum.unique
class MixType(enum.Enum):
  """Label-mixing augmentation applied to whole batches."""
  NONE = 'none'
  CUTMIX = 'cutmix'
  MIXUP = 'mixup'


@enum.unique
class ContrastiveLoss(enum.Enum):
  """The stage-1 contrastive loss."""
  SUPCON = 'supcon'  # Khosla et al. 2020 (losses.supcon_loss).
  GENSCL = 'genscl'  # Kim et al. 2022, soft labels (genscl.genscl_loss).


def parse_enum(enum_cls: Type[E], value: Union[E, str]) -> E:
  """Returns the member of `enum_cls` named or valued `value`.

  Accepts a member, its name in any case (`'ALL_VIEWS'`, `'all_views'`) or its
  value (`'a'`).

  Raises:
    ValueError: naming the value and the allowed names.
  """
  if isinstance(value, enum_cls):
    return value
  if isinstance(value, str):
    key = value.strip()
    for member in enum_cls:
      if key.upper() == member.name or key == member.value:
        return member
  allowed = ', '.join(m.name.lower() for m in enum_cls)
  raise ValueError(
      f'Unknown {enum_cls.__name__} value {value!r}; allowed: {allowed}.')
