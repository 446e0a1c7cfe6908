"""SupCon models: ResNet v1 / ResNeXt encoders, heads and their wiring.

Public API:
  build_encoder, feature_dim                      (resnet.py)
  ProjectionHead, ClassificationHead, l2_normalize (heads.py)
  SupConModel, build_model, build_experiment_model, mixed_precision_policy,
  EMBEDDING, NORMALIZED_EMBEDDING, PROJECTION, LOGITS, OUTPUT_KEYS
                                                  (supcon_model.py)
  weight_decay_variables, l2_weight_decay         (weight_decay.py)
"""

from supcon_tf.models.heads import ClassificationHead
from supcon_tf.models.heads import l2_normalize
from supcon_tf.models.heads import ProjectionHead
from supcon_tf.models.resnet import build_encoder
from supcon_tf.models.resnet import feature_dim
from supcon_tf.models.supcon_model import build_experiment_model
from supcon_tf.models.supcon_model import build_model
from supcon_tf.models.supcon_model import EMBEDDING
from supcon_tf.models.supcon_model import LOGITS
from supcon_tf.models.supcon_model import mixed_precision_policy
from supcon_tf.models.supcon_model import NORMALIZED_EMBEDDING
from supcon_tf.models.supcon_model import OUTPUT_KEYS
from supcon_tf.models.supcon_model import PROJECTION
from supcon_tf.models.supcon_model import SupConModel
from supcon_tf.models.weight_decay import l2_weight_decay
from supcon_tf.models.weight_decay import weight_decay_variables

__all__ = [
    'build_encoder', 'feature_dim', 'ProjectionHead', 'ClassificationHead',
    'l2_normalize', 'SupConModel', 'build_model', 'build_experiment_model', 'mixed_precision_policy',
    'EMBEDDING', 'NORMALIZED_EMBEDDING', 'PROJECTION', 'LOGITS', 'OUTPUT_KEYS',
    'weight_decay_variables', 'l2_weight_decay',
]
