"""Data: in-memory image sets, the data set registry, partitions, long-tail, augmentation."""

from fedtrust.data.types import Dataset, ImageSet

__all__ = ["Dataset", "ImageSet"]
