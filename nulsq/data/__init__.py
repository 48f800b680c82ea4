"""Datasets and loaders: `build(cfg.dataset, device, seed, rank, world_size) -> DataBundle`.

Importing the package registers every dataset in DATASETS (one module each).
"""

from nulsq.data import cifar, digits, imagenet, synthetic  # noqa: F401  (register the datasets)
from nulsq.data.bundle import DATASETS, DataBundle, Loader, build

__all__ = ["DATASETS", "DataBundle", "Loader", "build"]
