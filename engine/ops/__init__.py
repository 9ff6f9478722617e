"""The Python face of the compiled kernels in engine._C (csrc/): validate, convert, call — nothing else.

Regions are given as unions of atoms (engine.regions): an (H, W) atom map and an (N, A) membership matrix. Each op
returns exactly what its NumPy twin in engine.reference returns; the twins work on the materialised masks and are the
spec:

- soft_mask_pool(_batch)   SMFA: soft-masked feature aggregation, one L2-normalised vector per region
- mask_nms_raster(_batch)  class-specific greedy mask NMS + confidence-priority rasterisation
- top_k                    the exact search's selection of each query's K best bank rows (CPU)
- vote                     the retrieval vote over each query's K neighbours
- merge_regions            the embedded proposer's agglomerative merging of adjacent regions (CPU)
- slic_superpixels(_batch)  SLIC superpixels of Lab images (the embedded proposer's leaves, on either device)
- merge_regions_rac(_batch) merging in rounds of mutual nearest pairs (the parallel merge_regions, either device)

The `_batch` ops take a whole batch of images in one call (one launch sequence per batch, however many images and
regions). Each op has one body for both devices (csrc/<op>/<op>.h): NumPy arrays run the CPU (OpenMP) launcher,
torch tensors or CuPy arrays on a CUDA device run the CUDA launcher on the library's current stream and come back
as that library's arrays on that device (engine.arrays). `engine.reference` has the same functions with the same
signatures (host arrays only), so a caller picks an implementation by module (`Engine(kernels="reference")`).
"""

from ._core import _C  # noqa: F401 (the extension itself: tests count its calls, info reads it)
from ._core import build_info, check_regions, cuda_launches
from .naming import mask_nms_raster, mask_nms_raster_batch, soft_mask_pool, soft_mask_pool_batch, top_k, vote
from .proposer import (MergeTree, check_merge_inputs, merge_regions, merge_regions_rac, merge_regions_rac_batch,
                       slic_grid, slic_superpixels, slic_superpixels_batch)

__all__ = ["soft_mask_pool", "soft_mask_pool_batch", "mask_nms_raster", "mask_nms_raster_batch", "vote",
           "merge_regions", "MergeTree", "check_merge_inputs", "slic_superpixels", "slic_superpixels_batch",
           "slic_grid", "merge_regions_rac", "merge_regions_rac_batch", "check_regions", "build_info",
           "cuda_launches"]
