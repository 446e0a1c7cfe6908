"""Installs supcon_tf: `pip install .` or `pip install -e .[test]`."""

import re
import pathlib

import setuptools

_ROOT = pathlib.Path(__file__).parent
_VERSION = re.search(r"__version__ = '([^']+)'",
                     (_ROOT / 'supcon_tf' / '__init__.py').read_text()).group(1)

setuptools.setup(
    name='supcon_tf',
    version=_VERSION,
    description=('Supervised Contrastive Learning (Khosla et al., 2020) for '
                 'TensorFlow 2 / Keras 3: losses, ResNets, tf.data pipelines, '
                 'TPU/GPU training.'),
    long_description=(_ROOT / 'README.md').read_text()
    if (_ROOT / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=setuptools.find_packages(include=['supcon_tf', 'supcon_tf.*']),
    install_requires=[
        'tensorflow>=2.16',
        'keras>=3',
        'tensorflow-datasets',
        'tensorboard',  # tf.summary needs it; TF 2.21 no longer pulls it in.
        'absl-py',
        'numpy',
        'scikit-learn',
    ],
    extras_require={
        'test': ['pytest', 'pytest-timeout', 'matplotlib'],
        'plot': ['matplotlib'],
    },
    entry_points={
        'console_scripts': ['supcon_tf=supcon_tf.main:run_main'],
    },
)
