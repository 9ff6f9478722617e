"""The engine's proposals for a batch: the ones the caller gives are kept, the engine's proposer makes the rest.

On a GPU engine the proposer runs where the features are when it can (`runs_on_device`, Config.gpu_proposer: the
embedded proposer's SLIC and merging kernels), so its regions never come down; otherwise it runs on the host, given
the backbone's features (copied down) when it reads them, one image per worker of a thread pool on a GPU engine so
that the host keeps up with the device, in one call on a CPU engine whose cores the other stages already use.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from .arrays import host_all
from .config import Config
from .errors import InputError, ModelError
from .regions import Proposals


class BatchProposer:
    """proposer: an object with `propose(images, **features)` (see engine.models.base.Proposer), a name the
    registry resolves on first use ("embedded"), or None (proposals must always be given)."""

    def __init__(self, proposer, config: Config, device: str) -> None:
        self.proposer = proposer
        self.config, self.device = config, device
        self._lock = threading.Lock()  # a named proposer is made once, whichever thread asks first
        self._host_pool = (None if device == "cpu" else
                           ThreadPoolExecutor(config.num_threads or os.cpu_count() or 1,
                                              thread_name_prefix="moduseg-host"))

    def __call__(self, images: list, proposals: list, features: list, positions: list, stride: int,
                 groups) -> list[Proposals]:
        """One Proposals per image (checked against its image): the given ones, the proposer's for the others
        (None in `proposals`); `features`, `stride` and `groups` are the backbone's, `positions` the images' indices
        in the caller's list (for errors)."""
        missing = [i for i, p in enumerate(proposals) if p is None]
        if missing:
            proposer = self.resolved()
            uses_features = getattr(proposer, "uses_features", False)
            if self.on_device(proposer):
                made = proposer.propose_on_device([images[i] for i in missing], [features[i] for i in missing],
                                                  stride, groups)
            else:
                maps = host_all([features[i] for i in missing]) if uses_features else [None] * len(missing)
                shared = dict(stride=stride, groups=groups) if uses_features else None
                made = self._on_host(proposer, [images[i] for i in missing], maps, shared)
            if len(made) != len(missing):
                raise ModelError(f"proposer {getattr(proposer, 'name', '?')} returned {len(made)} proposal "
                                 f"sets for {len(missing)} images")
            proposals = list(proposals)
            for i, p in zip(missing, made):
                proposals[i] = p
        for i, image, p in zip(positions, images, proposals):
            if not isinstance(p, Proposals):
                raise InputError(f"proposals[{i}]: expected engine.Proposals, got {type(p).__name__}")
            if p.shape != image.shape[:2]:
                raise InputError(f"proposals[{i}]: atoms of shape {p.shape}, the image is {image.shape[:2]}")
        return proposals

    def resolved(self):
        """The proposer itself, made from its name on first use."""
        if self.proposer is None:
            raise InputError("no proposals given and this engine has no proposer: pass proposals=[...] or construct "
                             "the Engine with a proposer")
        with self._lock:
            if isinstance(self.proposer, str):
                from .models.embedded import resolve_proposer

                self.proposer = resolve_proposer(self.proposer, self.config, on_device=self.device != "cpu")
        return self.proposer

    def on_device(self, proposer) -> bool:
        """Whether `proposer` runs where the features are: a GPU engine's proposer with `propose_on_device`."""
        return self.device != "cpu" and getattr(proposer, "runs_on_device", False)

    def _on_host(self, proposer, images: list, maps: list, shared: dict | None) -> list:
        """A host proposer over a batch (given the feature maps and `shared` stride and groups when it reads them):
        in one call without a pool, else one image per worker."""
        def call(images, maps):
            return proposer.propose(images, **(dict(features=maps, **shared) if shared is not None else {}))

        if self._host_pool is None or len(images) < 2:
            return call(images, maps)
        futures = [self._host_pool.submit(call, [image], [f]) for image, f in zip(images, maps)]
        return [future.result()[0] for future in futures]
