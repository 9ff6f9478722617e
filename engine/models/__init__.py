"""Model adapters and runtimes: backbones (dense features), proposers, pseudo-mask generators."""

from ..regions import Proposals
from .base import Backbone, Proposer, PseudoMasker
from .proposers import ground_truth_proposals


def create_backbone(name: str, **kwargs) -> Backbone:
    """A backbone by name (see engine.models.backbones.BACKBONES); imported here lazily so that `import engine`
    stays light."""
    from .backbones import create_backbone as create

    return create(name, **kwargs)


__all__ = ["Backbone", "Proposals", "Proposer", "PseudoMasker", "create_backbone", "ground_truth_proposals"]
