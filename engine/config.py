"""Every knob of the engine in one dataclass. The defaults are the ModuSeg paper's (arXiv 2604.07021) except where
measurement on VOC and CamVid together chose otherwise (erosion, the vote and top_k, region_entries;
docs/decisions.md gives the tables and the commands); `Config.paper()` restores the paper's exact settings."""

from __future__ import annotations

import dataclasses
import math
import reprlib
import warnings
from dataclasses import dataclass

from .constants import VOTE_TEMPERATURE
from .errors import InputError

VOTES = ("count", "balanced", "weighted", "softmax")

# a wrong value is shown cut short: a nested value (a YAML file's aliases share subtrees) could print as gigabytes
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 1, 80, 80
EROSIONS = ("fixed", "adaptive")
POOLINGS = ("soft", "hard")


# The method's own values (arXiv 2604.07021); Config.paper() applies them over any changed defaults.
PAPER_SETTINGS = dict(erosion_kernel=3, erosion_iterations=20, erosion="fixed", min_area=300, outlier_ratio=0.25,
                      background_outlier_ratio=0.0, pooling="soft", smfa_eps=1e-8, normalize_layers=False,
                      center_bank=False, hub_neighbours=0, hub_penalty=0.0, region_entries=False,
                      fill_unpainted=False, superpixel_vote=False, boundary_radius=0,
                      objectness_threshold=0.6, nms_iou_threshold=0.4, top_k=25, vote="count", index="Flat")

#: the fields a built bank fixes (FeatureBank.build, bank_parts read them; normalize_layers shapes its vectors and the
#: queries alike), so an engine searching it never uses another value; `moduseg eval` and `segment` refuse one, and
#: so does Engine for normalize_layers. index_train_size trains an index of the engine's own only where Config.index
#: names another approximate index than the bank's.
BANK_FIELDS = ("erosion_kernel", "erosion_iterations", "erosion", "outlier_ratio", "background_outlier_ratio",
               "min_vector_norm", "region_entries", "region_purity", "index_train_size", "normalize_layers",
               "center_bank", "hub_neighbours")


def knob(default, help: str, section: str | None = None):
    """A Config field: its default and its meaning in a sentence or two (`help`: what `moduseg --help` says of its
    flag, and Config's docstring); `section` heads a group of fields in that docstring."""
    metadata = {"help": help} if section is None else {"help": help, "section": section}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class Config:
    """Knobs of bank building and inference. Each field's meaning is written next to it (its `help`), listed below
    and in the --help of its `moduseg` flag."""

    erosion_kernel: int = knob(3, "side of the square structuring element of SBP's erosion (3 = 3x3).",
                               section="Bank building (semantic boundary purification, soft-masked aggregation, "
                                       "outlier rejection)")
    erosion_iterations: int = knob(20, "how many times SBP erodes each class mask (20 x 3x3 = one 41x41 erosion). "
                                       "Raising it purifies boundaries more but erases thin objects.")
    erosion: str = knob("adaptive", '"fixed" is the paper\'s erosion; "adaptive" shrinks the erosion for a region it '
                                    "would erase whole, so thin classes (poles, pedestrians) keep bank vectors.")
    min_area: int = knob(300, "regions (bank masks after erosion, region entries, inference proposals, and the "
                              "superpixels the superpixel vote searches on their own) smaller than this many pixels "
                              "are dropped.")
    outlier_ratio: float = knob(0.25, "fraction of each foreground class's prototypes farthest from the class mean "
                                      "that is dropped.")
    background_outlier_ratio: float = knob(0.0, "the same for background prototypes (the paper never filters "
                                                "background: 0).")
    pooling: str = knob("soft", '"soft" is SMFA (patch weight = fraction of the patch the mask covers); "hard" is '
                                "the ablation without SMFA (a patch counts fully when the mask covers its centre "
                                "pixel, else not at all).")
    smfa_eps: float = knob(1e-8, "added to the summed soft-mask weight before dividing, as in the paper (1e-8).")
    normalize_layers: bool = knob(True, "with a multi-layer backbone (feature groups), L2-normalise each layer's part "
                                        "of a pooled vector before the whole vector, so that every layer weighs the "
                                        "same in the cosine; False normalises the pooled vector once, as the paper "
                                        "does. Bank and queries must agree: an engine takes the bank's.")
    center_bank: bool = knob(True, "subtract the mean of the bank's vectors from them and normalise again, and the "
                                   "same from every query before its search (engine.bank.centering), so that the "
                                   "cosine compares what tells regions apart rather than what they all share; the "
                                   "paper searches SMFA's vectors as they are (False).")
    hub_neighbours: int = knob(10, "each bank vector's hubness is its mean similarity to this many nearest other "
                                   "bank vectors (engine.bank.hubness), computed when the bank is made: an exact "
                                   "search of the bank against itself, quadratic in its size (0 = none, for banks "
                                   "of millions of vectors).")
    min_vector_norm: float = knob(1e-6, "bank vectors with a smaller L2 norm before normalisation (empty masks) are "
                                        "dropped.")
    region_entries: bool = knob(True, "add the proposer's regions in each bank image, named by the mask's majority "
                                      "class, to the class prototypes, so that queries (often parts or stuff) meet "
                                      "entries of their own kind; the paper's bank has class prototypes only.")
    region_purity: float = knob(0.5, "a region becomes an entry only when its majority class covers at least this "
                                     "fraction of it.")

    objectness_threshold: float = knob(0.6, "proposals with a lower objectness score are dropped (tau_obj).",
                                       section="Inference")
    nms_iou_threshold: float = knob(0.4, "a proposal whose mask IoU with a kept, more confident proposal of the same "
                                         "class is above this is suppressed (tau_nms).")
    top_k: int = knob(15, "neighbours retrieved from the bank per proposal (K). Under the count vote a larger K "
                          "smooths the vote but lets classes with many bank vectors (background) outvote small "
                          "classes; the softmax vote weighs far neighbours down, so K matters less.")
    vote: str = knob("softmax", '"count" is the paper\'s vote (most neighbours wins); "balanced" divides each '
                                "class's votes by its number of bank vectors; \"weighted\" scores each class by the "
                                "summed similarity of its neighbours; \"softmax\" by the sum of exp((s - s_max) / "
                                "vote_temperature) over its neighbours' similarities s (s_max: the nearest's).")
    vote_temperature: float = knob(VOTE_TEMPERATURE, "the softmax vote's temperature, in cosine similarity: a "
                                                       "neighbour this much farther than the nearest counts 1/e as "
                                                       "much. Centred cosines (center_bank) spread wider than "
                                                       "SMFA's own: 0.03 suits a bank built without centring.")
    hub_penalty: float = knob(0.25, "a bank vector's similarity to a query is lowered by this times its hubness "
                                    "before the top K, so that vectors near everything (hubs) stop deciding votes "
                                    "(the bank side of CSLS); 0 = off, the paper's search.")
    fill_unpainted: bool = knob(True, "where the bank has no background vector (a data set whose every pixel is a "
                                      "class, such as CamVid), pixels the engine's proposer's regions left "
                                      "unpainted take the class of the nearest painted pixel instead of "
                                      "background. Proposals given to segment_batch are painted as given.")
    superpixel_vote: bool = knob(True, "the engine's proposer's regions nest (cuts of one merge tree over its "
                                       "superpixels): after painting, each superpixel takes the class whose vote "
                                       "shares, summed over every region that contains it, are largest, instead of "
                                       "the class of the one region that painted it (engine.retrieval). False = "
                                       "the paper's painting alone. Proposals given to segment_batch are painted "
                                       "as given.")
    unsure_margin: float = knob(0.2, "the superpixel vote also searches a superpixel on its own, and adds its "
                                     "query's shares to the sum, where the two largest summed shares are within this "
                                     "fraction of the sum, or where no region covers it (superpixels smaller than "
                                     "min_area excepted): its own evidence decides where the regions around it "
                                     "disagree, for one more query each. 0 = never; 1 = every superpixel.")
    boundary_radius: int = knob(8, "after painting, each class boundary is snapped to the image's edges by a guided "
                                    "filter of this window radius (pixels) over the class indicators, guided by the "
                                    "grey image (engine.boundaries): the embedded proposer's regions are unions of "
                                    "half-scale superpixels. 0 = off (the paper). Proposals given to segment_batch "
                                    "are exact by assumption: their boundaries are painted as given.")
    boundary_eps: float = knob(0.01, "the guided filter's regulariser (grey levels in 0..1, squared): edges weaker "
                                     "than about its square root are smoothed over rather than followed.")
    gpu_proposer: bool = knob(True, "on a CUDA device the embedded proposer runs there: SLIC superpixels and rounds "
                                    "of merges of mutual nearest pairs (engine.ops.proposer's kernels), with nothing "
                                    "per image on the host. Against the host's watershed and closest-pair merging "
                                    "(mIoU, docs/decisions.md): 1.3 below on VOC with a ground truth bank, 1.2 below "
                                    "with a pseudo mask bank, 1.2 above on CamVid. False keeps "
                                    "the host's proposer on a GPU engine (in a thread pool). The CPU always uses the "
                                    "host's.")
    index: str = knob("Flat", 'FAISS index factory string over inner product ("Flat" is exact; "IVF4096,Flat" for '
                              "large banks).")
    nprobe: int = knob(16, "inverted lists visited per query by IVF indexes.")
    refine: int = knob(8, "an index whose scores come from compressed codes (IVF-PQ, scalar quantizers) shortlists "
                          "refine x top_k candidates, rescores them exactly from the bank's vectors (memory-mapped "
                          "for a loaded bank) and keeps the best top_k: PQ codes cannot order close neighbours. 0 = "
                          "off (the codes' own top_k). Exact indexes (Flat, IVF-Flat) ignore it. Each candidate is "
                          "a row read, from disk when the bank is larger than memory. The default, 8: at 100k "
                          "vectors recall@5 is at its plateau from 4; on 10M clustered 208-d vectors under "
                          "IVF4096,PQ52 recall@5 goes 0.266 -> 0.503 (0.941 at 64) and the true nearest is always "
                          "in the 5, for 0.1 ms a query more with the vectors cached, 2 ms read from disk "
                          "(docs/decisions.md).")
    index_train_size: int = knob(262144, "at most this many bank vectors (a fixed random sample) train an index that "
                                         "needs training (IVF centroids); FAISS wants some 40-256 per list, and "
                                         "training on millions takes hours.")
    batch_size: int = knob(4, "images per backbone call (images are bucketed by padded size first), and per chunk of "
                              "a long segment_batch list.")
    max_image_pixels: int = knob(1 << 23, "larger images are refused with InputError: memory grows with the pixels "
                                          "(the backbone's activations, the feature map, the superpixels). Measured "
                                          "peak process memory with the default backbone on the CPU: 2.1 GB for "
                                          "2896 x 2896 (the default, 8.4 M pixels), 4.4 GB for 4096 x 4096.")
    num_threads: int = knob(0, "threads for the compiled ops and the model runtime; 0 lets each library choose.")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            ok = (isinstance(value, bool) if kind is bool else
                  isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
                  isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
            if not ok:
                raise InputError(f"Config.{f.name} must be a {kind.__name__}, got {type(value).__name__} "
                                 f"{_SHORT.repr(value)}")
        if self.erosion_kernel < 1 or self.erosion_kernel % 2 == 0:
            raise InputError(f"Config.erosion_kernel must be a positive odd integer, got {self.erosion_kernel}")
        for name in ("erosion_iterations", "min_area", "num_threads", "refine", "boundary_radius", "hub_neighbours"):
            if getattr(self, name) < 0:
                raise InputError(f"Config.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("top_k", "batch_size", "nprobe", "index_train_size", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise InputError(f"Config.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("outlier_ratio", "background_outlier_ratio", "objectness_threshold", "nms_iou_threshold",
                     "region_purity", "unsure_margin"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # NaN fails this too
                raise InputError(f"Config.{name} must be in [0, 1], got {value}")
        # a guard against dividing by an empty mask's zero weight, not a knob: inf or NaN makes every vector zero or
        # NaN (every image all background), 0 or less can divide by zero, and at 1 it already equals the whole mask
        # weight of a min_area region (300 px on a stride-16 grid: 1.2 patches)
        if not (math.isfinite(self.smfa_eps) and 0.0 < self.smfa_eps <= 1.0):
            raise InputError(f"Config.smfa_eps must be a finite number in (0, 1] (the paper's 1e-8), got "
                             f"{self.smfa_eps}")
        if not (math.isfinite(self.vote_temperature) and self.vote_temperature > 0.0):
            raise InputError(f"Config.vote_temperature must be a finite number > 0, got {self.vote_temperature}")
        if not (math.isfinite(self.hub_penalty) and self.hub_penalty >= 0.0):
            raise InputError(f"Config.hub_penalty must be a finite number >= 0, got {self.hub_penalty}")
        if not (math.isfinite(self.boundary_eps) and self.boundary_eps > 0.0):
            raise InputError(f"Config.boundary_eps must be a finite number > 0, got {self.boundary_eps}")
        if not (math.isfinite(self.min_vector_norm) and self.min_vector_norm >= 0.0):
            raise InputError(f"Config.min_vector_norm must be a finite number >= 0, got {self.min_vector_norm}")
        if not self.index.strip():
            raise InputError("Config.index must be a FAISS index factory string (\"Flat\", \"IVF4096,Flat\"), got "
                             f"{self.index!r}")
        if self.vote not in VOTES:
            raise InputError(f"Config.vote must be one of {VOTES}, got {self.vote!r}")
        if self.pooling not in POOLINGS:
            raise InputError(f"Config.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.erosion not in EROSIONS:
            raise InputError(f"Config.erosion must be one of {EROSIONS}, got {self.erosion!r}")

    @classmethod
    def paper(cls, **changes) -> "Config":
        """The paper's exact settings (count vote, fixed 20 x 3x3 erosion, K = 25, SMFA, ...), whatever the
        engine's defaults are."""
        return cls(**{**PAPER_SETTINGS, **changes})

    @property
    def erosion_size(self) -> int:
        """Side of the single square erosion equivalent to `erosion_iterations` erosions by the small kernel."""
        return 1 + (self.erosion_kernel - 1) * self.erosion_iterations

    def layer_groups(self, groups) -> tuple[int, ...]:
        """The feature groups (a backbone's layer widths) each normalised on its own when a vector is pooled or
        centred: `groups` under normalize_layers, else none (the whole vector at once)."""
        return tuple(int(g) for g in groups) if self.normalize_layers else ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown Config fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def _field_list() -> str:
    """Config's fields as its docstring lists them: a section's heading, then `name: help`, wrapped."""
    import textwrap

    lines = []
    for f in dataclasses.fields(Config):
        if "section" in f.metadata:
            lines += ["", f"    {f.metadata['section']}:"]
        lines += textwrap.wrap(f"{f.name}: {f.metadata['help']}", 116, initial_indent=" " * 8,
                               subsequent_indent=" " * 12)
    return "\n".join(lines) + "\n"


Config.__doc__ = f"{Config.__doc__}\n{_field_list()}"


def check_bank_config(config: Config, bank_config: Config) -> None:
    """What an engine's Config may differ in from the Config its bank was built with: a bank-building field
    (BANK_FIELDS) is the bank's, whatever the engine's says (a warning names both values; the CLI refuses them), and
    normalize_layers must agree (queries are pooled as the bank's vectors were): an InputError."""
    fixed = [name for name in BANK_FIELDS if name != "normalize_layers"
             and getattr(config, name) != getattr(bank_config, name)
             and not (name == "index_train_size" and config.index not in ("Flat", bank_config.index))]
    if fixed:
        warnings.warn(f"Config {', '.join(f'{n}={getattr(config, n)!r}' for n in fixed)} ignored: the bank was built "
                      f"with {', '.join(f'{n}={getattr(bank_config, n)!r}' for n in fixed)}, which its vectors keep; "
                      "rebuild the bank to change them", stacklevel=3)
    if config.normalize_layers != bank_config.normalize_layers:
        raise InputError(f"Config.normalize_layers={config.normalize_layers} but the bank's vectors were made with "
                         f"normalize_layers={bank_config.normalize_layers}: queries must be pooled as the bank was "
                         "(rebuild the bank to change it)")
