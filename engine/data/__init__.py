"""Dataset readers: the VOC layout (PASCAL VOC, CamVid), image files and image-level labels."""

from .voc import VOC_CLASSES, Sample, VOCDataset, load_image, load_label_map, save_label_map

__all__ = ["VOC_CLASSES", "Sample", "VOCDataset", "load_image", "load_label_map", "save_label_map"]
