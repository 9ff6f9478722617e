"""The offline feature bank: class prototypes from images with image-level labels, the method's first stage.

Per image and class mask: semantic boundary purification (SBP: erosion, small regions dropped) → soft-masked feature
aggregation (SMFA: area-interpolated mask weights over the backbone's patch grid, weighted mean, L2-normalised) → one
vector per (image, class) plus one background vector per image → per-class outlier rejection. Region entries
(Config.region_entries, on by default) join them: the proposer's own regions in each bank image, named by the
(pseudo-)mask's majority class. Last, the search space (not the paper's): every vector centred on the bank's mean
and normalised again, and each one's hubness scored (Config.center_bank, hub_neighbours).

One idea a module:

- `purification`: SBP (erode, purify);
- `featurise`: images, masks and labels to bank entries, a batch at a time (bank_parts, featurise_batch);
- `parts`: the entries before outlier rejection (BankPart), kept on disk, merged and appended to;
- `outliers`: per-class outlier rejection;
- `centering`: the bank's vectors, and the queries searched in it, moved off the bank's mean (Config.center_bank);
- `hubness`: each vector's mean similarity to its nearest others, which the search discounts (Config.hub_penalty);
- `feature_bank`: the FeatureBank class (build, from_parts, save, load, its index);
- `storage`: the bank directory on disk: staged writes swapped in whole, checksums, the sealed manifest;
- `index_storage`: how the search index is stored beside the vectors, which are stored once (INDEX_STORAGE).
"""

from .feature_bank import FeatureBank
from .featurise import BankEntry, bank_parts, featurise_batch
from .index_storage import INDEX_STORAGE
from .outliers import drop_farthest, local_map, outlier_count, reject_outliers, reject_outliers_parts
from .parts import KINDS, BankPart, load_parts, merge_parts, save_parts
from .purification import erode, purify
from .storage import FORMAT, FORMAT_VERSION, SEAL

__all__ = ["BankEntry", "BankPart", "FORMAT", "FORMAT_VERSION", "FeatureBank", "INDEX_STORAGE", "KINDS", "SEAL",
           "bank_parts", "drop_farthest", "erode", "featurise_batch", "load_parts", "merge_parts", "outlier_count",
           "local_map", "purify", "reject_outliers", "reject_outliers_parts", "save_parts"]
