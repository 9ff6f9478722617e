"""ModuSeg engine: training-free weakly supervised semantic segmentation.

    bank = engine.FeatureBank.build(samples, backbone, class_names)   # offline, from image-level labels
    results = engine.Engine(bank, proposer=...).segment_batch(images)  # inference by retrieval
"""

from .bank import FeatureBank
from .batches import Result
from .config import Config
from .errors import BankError, InputError, ModelError, ModuSegError
from .models import create_backbone
from .regions import Proposals
from .pipeline import Engine, segment_batch

__version__ = "0.1.0"

__all__ = [
    "Config", "Engine", "FeatureBank", "Proposals", "Result", "segment_batch", "create_backbone",
    "ModuSegError", "InputError", "BankError", "ModelError", "__version__",
]
