"""supcon_tf: Supervised Contrastive Learning (Khosla et al., 2020) for TF 2 / Keras 3."""

__version__ = '0.1.0'
