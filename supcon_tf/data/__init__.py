"""Input data: datasets, image augmentation and the tf.data pipeline."""

from supcon_tf.data.datasets import DatasetError
from supcon_tf.data.datasets import DatasetInfo
from supcon_tf.data.datasets import get_dataset_info
from supcon_tf.data.datasets import load_split
from supcon_tf.data.pipeline import build_dataset
from supcon_tf.data.pipeline import steps_per_epoch
from supcon_tf.data.visualize import save_augmentation_grid
