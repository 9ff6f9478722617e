"""Pseudo-masks from CLIP (ViT-B/16) and image-level labels, in the manner of the training-free CLIP segmenters the
paper builds on (CorrCLIP; SCLIP and ClearCLIP before it).

What is computed, per image:
- every class name and background name is embedded by CLIP's text tower, averaged over a short list of prompt
  templates (each template embedding L2-normalised, averaged, renormalised);
- the image (short side resized to `short_side`, zero-padded to a multiple of 16, position embeddings interpolated to
  the grid) goes through the vision tower up to its last block, whose attention is replaced by a correlation
  attention over patch tokens: SCLIP's correlative self-attention softmax(q qᵀ) + softmax(k kᵀ) ("qq+kk", default) or
  ClearCLIP's softmax(q qᵀ) ("qq"); the last block's residual and feed-forward branch are dropped (ClearCLIP's
  finding that they carry the noise), then the final layer norm and projection give one embedding per patch;
- optionally (`regions`, a Proposer such as SamProposer or Mask2FormerProposer) attention is restricted to patches
  inside the same proposal: CorrCLIP's "scope reconstruction". CorrCLIP's other parts (correlation values from a DINO
  backbone, map correction) and SCLIP's sliding 224-px windows are not implemented: the whole image goes through once;
- patch-text cosine similarity x CLIP's logit scale gives logits, upsampled bilinearly to the image; the classes not
  in the image's labels are excluded (their logits are -inf: a class absent from the labels can never appear), the
  background names compete with the labelled classes and map to 0, and `background_threshold` sends pixels whose
  winning class is less probable than it to background.

Two ways to get the model: Hugging Face transformers' `CLIPModel` + its tokenizer from a local directory (or a hub id
with hub access: openai/clip-vit-base-patch16), or open_clip's `create_model('ViT-B-16', pretrained=<local
checkpoint>)` (OpenAI's or open_clip's ViT-B/16 file). No weights can be downloaded here.

Exercised here (tests/models/test_clip_masker.py) with a randomly initialised CLIPModel of tiny width/depth (patch 16, the
ViT-B/16 layout) and a tiny character-level CLIPTokenizer: output shape and dtype, never a class outside the labels,
background 0, the threshold, both attention variants, region restriction. Not exercised: the open_clip path (open_clip
imports torchvision, which cannot be installed beside the project's CPU torch 2.13 here), pseudo-mask quality.
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

from ..errors import InputError, ModelError
from ..utils import check_image, pad_to_multiple
from .base import Proposer, PseudoMasker

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

#: a short subset of CLIP's ImageNet prompt templates
TEMPLATES = (
    "a photo of a {}.", "a photo of the {}.", "a bad photo of a {}.", "a photo of a small {}.",
    "a photo of a large {}.", "a cropped photo of a {}.", "a close-up photo of a {}.", "a bright photo of a {}.",
)

#: stuff names that compete with the labelled classes and map to background (0)
BACKGROUND_NAMES = ("sky", "wall", "tree", "grass", "road", "ground", "floor", "ceiling", "building", "water",
                    "mountain", "field", "sand", "window", "fence", "rock", "cloud")

ATTENTIONS = ("qq+kk", "qq")


def correlation_attention(q, k, v, heads: int, mode: str = "qq+kk", allowed=None):
    """Self-attention with correlation weights. q, k, v: (B, N, D) projected tokens; allowed: optional (B, N, N)
    bool, False where token i may not attend to token j. Returns (B, N, D) (before the output projection).

    "qq+kk": softmax(q qᵀ / sqrt(d)) + softmax(k kᵀ / sqrt(d)) (SCLIP); "qq": softmax(q qᵀ / sqrt(d)) (ClearCLIP).
    """
    import torch

    batch, tokens, width = q.shape
    split = lambda t: t.reshape(batch, tokens, heads, width // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scale = (width // heads) ** -0.5
    bias = None
    if allowed is not None:
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))[:, None]

    def weights(a):
        scores = a @ a.transpose(-1, -2) * scale
        return (scores if bias is None else scores + bias).softmax(-1)

    attn = weights(q) if mode == "qq" else weights(q) + weights(k)
    return (attn @ v).transpose(1, 2).reshape(batch, tokens, width)


class _HFTower:
    """transformers CLIPModel: text embeddings and dense patch embeddings."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        vision = model.config.vision_config
        self.patch, self.heads = int(vision.patch_size), int(vision.num_attention_heads)

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def text(self, prompts: list[str]):
        inputs = self.tokenizer(prompts, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        out = self.model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                           attention_mask=inputs["attention_mask"].to(device))
        return getattr(out, "pooler_output", out)  # transformers 5 returns an output object, 4.x a tensor

    def dense(self, pixels, mode: str, allowed=None):
        vision = self.model.vision_model
        hidden = vision(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
        last = vision.encoder.layers[-1]
        x = last.layer_norm1(hidden[-2][:, 1:])  # input of the last block, CLS dropped
        attn = last.self_attn
        x = attn.out_proj(correlation_attention(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), self.heads, mode,
                                                allowed))
        return self.model.visual_projection(vision.post_layernorm(x))


class _OpenClipTower:
    """open_clip VisionTransformer CLIP (ViT-B-16 and the like)."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        visual = model.visual
        self.patch = int(visual.conv1.kernel_size[0])
        self.heads = int(visual.transformer.resblocks[-1].attn.num_heads)

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def text(self, prompts: list[str]):
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(prompts).to(device))

    def dense(self, pixels, mode: str, allowed=None):
        import torch
        import torch.nn.functional as F

        visual = self.model.visual
        x = visual.conv1(pixels)
        batch, width, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos = visual.positional_embedding.to(x.dtype)
        side = int(round((pos.shape[0] - 1) ** 0.5))
        grid = pos[1:].reshape(1, side, side, width).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        cls = visual.class_embedding.to(x.dtype).expand(batch, 1, width) + pos[:1]
        x = torch.cat([cls, x + grid.reshape(1, h * w, width)], dim=1)
        x = visual.ln_pre(x)
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for block in blocks[:-1]:
            x = block(x)
        x = x if batch_first else x.transpose(0, 1)
        last = blocks[-1]
        y = last.ln_1(x[:, 1:])
        q, k, v = F.linear(y, last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)
        y = last.attn.out_proj(correlation_attention(q, k, v, self.heads, mode, allowed))
        return visual.ln_post(y) @ visual.proj


class ClipPseudoMasker(PseudoMasker):
    """CLIP dense pseudo-masks restricted to the image-level labels.

    tower: built by `from_pretrained` (transformers) or `from_open_clip`.
    class_names: class_names[i] names class id i + 1 (0 is background).
    background_names: names that compete with the classes and map to 0 (empty: background only by threshold).
    templates: prompt templates with one "{}".
    attention: "qq+kk" (SCLIP's correlative self-attention) or "qq" (ClearCLIP) in the last block.
    short_side: the image's short side is resized to this before the vision tower (larger: finer maps, slower).
    background_threshold: a pixel whose winning class has a lower softmax probability (over the labelled classes
        and background names) becomes background; 0 disables it.
    regions: optional Proposer; patches attend only to patches in the same proposal (CorrCLIP's scope restriction).
    device: "cpu" or "cuda".
    """

    name = "clip"

    def __init__(self, tower, class_names: Sequence[str], *, background_names: Sequence[str] = BACKGROUND_NAMES,
                 templates: Sequence[str] = TEMPLATES, attention: str = "qq+kk", short_side: int = 336,
                 background_threshold: float = 0.0, regions: Proposer | None = None, device: str = "cpu") -> None:
        import torch

        if not class_names or len(class_names) > 254:
            raise InputError(f"ClipPseudoMasker: need 1..254 class names (uint8 maps), got {len(class_names)}")
        if attention not in ATTENTIONS:
            raise InputError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if not templates or any("{}" not in t for t in templates):
            raise InputError("templates: need at least one, each with a '{}' for the class name")
        if short_side < tower.patch:
            raise InputError(f"short_side must be >= the patch size {tower.patch}, got {short_side}")
        if not 0.0 <= background_threshold <= 1.0:
            raise InputError(f"background_threshold must be in [0, 1], got {background_threshold}")
        if not background_names and background_threshold == 0.0:
            raise InputError("ClipPseudoMasker: give background_names or a background_threshold > 0, or every pixel "
                             "is foreground")
        self.tower = tower
        tower.model.to(device)
        self.device = device
        self.class_names, self.background_names = list(class_names), list(background_names)
        self.templates, self.attention = list(templates), attention
        self.short_side, self.background_threshold, self.regions = int(short_side), float(background_threshold), regions
        with torch.inference_mode():
            # rows: background names first, then classes 1..C
            self.text_embeddings = self._embed(self.background_names + self.class_names)
            self.scale = tower.logit_scale()

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, class_names: Sequence[str], *, dtype: str = "float32",
                        **knobs) -> "ClipPseudoMasker":
        """transformers CLIPModel and its tokenizer from a local directory (or a hub id with hub access)."""
        from .transformers_io import load_model, require

        transformers = require("transformers", "transformers")
        model = load_model("CLIPModel", path_or_id, dtype)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(path_or_id))
        except OSError as error:
            raise ModelError(f"no CLIP tokenizer files (vocab.json, merges.txt) in {os.fspath(path_or_id)!r}: "
                             f"{error}") from error
        return cls(_HFTower(model, tokenizer), class_names, **knobs)

    @classmethod
    def from_open_clip(cls, class_names: Sequence[str], *, pretrained: str | os.PathLike | None,
                       architecture: str = "ViT-B-16", **knobs) -> "ClipPseudoMasker":
        """open_clip model `architecture` with weights from the local checkpoint `pretrained` (None: random)."""
        try:
            import open_clip
        except ImportError as error:
            raise ModelError("the open_clip path needs open-clip-torch (pip install open-clip-torch; it imports "
                             "torchvision): " + str(error)) from error
        if pretrained is not None and not os.path.isfile(pretrained):
            raise ModelError(f"open_clip checkpoint {os.fspath(pretrained)!r} is not a file")
        model = open_clip.create_model(architecture, pretrained=None if pretrained is None else os.fspath(pretrained))
        return cls(_OpenClipTower(model, open_clip.get_tokenizer(architecture)), class_names, **knobs)

    def _embed(self, names: list[str], chunk: int = 256):
        """(len(names), D) unit text embeddings, each the renormalised mean of its unit template embeddings."""
        import torch

        prompts = [t.format(name) for name in names for t in self.templates]
        per_prompt = torch.cat([self.tower.text(prompts[i:i + chunk]).float() for i in range(0, len(prompts), chunk)])
        per_prompt = per_prompt / per_prompt.norm(dim=-1, keepdim=True)
        mean = per_prompt.reshape(len(names), len(self.templates), -1).mean(1)
        return mean / mean.norm(dim=-1, keepdim=True)

    def _check_labels(self, labels, index: int) -> list[int]:
        ids = sorted({int(c) for c in labels})
        bad = [c for c in ids if not 1 <= c <= len(self.class_names)]
        if bad:
            raise InputError(f"labels[{index}]: class ids {bad} outside 1..{len(self.class_names)} "
                             f"(0 is background and is never an image-level label)")
        return ids

    def _allowed(self, image: np.ndarray, scale: float, grid: tuple[int, int]):
        """(1, N, N) bool: True where patches share the best-scoring proposal covering their centres."""
        import torch

        proposals = self.regions.propose([image])[0]
        h, w = grid
        ys = np.minimum(((np.arange(h) + 0.5) * self.tower.patch / scale).astype(int), image.shape[0] - 1)
        xs = np.minimum(((np.arange(w) + 0.5) * self.tower.patch / scale).astype(int), image.shape[1] - 1)
        region = np.full((h, w), -1)
        if len(proposals):
            covered = proposals.masks[:, ys][:, :, xs]  # (P, h, w)
            best = np.argmax(covered * (proposals.objectness[:, None, None] + 1.0), axis=0)
            region = np.where(covered.any(0), best, -1)
        region = torch.from_numpy(region.reshape(-1))
        return (region[:, None] == region[None, :])[None].to(self.device)

    def logits(self, image: np.ndarray, labels: Sequence[int]) -> tuple[np.ndarray, list[int]]:
        """(H, W, B + L) float32 logits of the background names then the labelled classes, and the ids of the
        columns (0 for background names)."""
        import torch
        import torch.nn.functional as F

        image = check_image(image)
        ids = self._check_labels(labels, 0)
        height, width = image.shape[:2]
        scale = self.short_side / min(height, width)
        new_h, new_w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
        pixels = pad_to_multiple((resized.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD, self.tower.patch)
        grid = (pixels.shape[0] // self.tower.patch, pixels.shape[1] // self.tower.patch)
        rows = list(range(len(self.background_names))) + [len(self.background_names) + c - 1 for c in ids]
        dtype = next(self.tower.model.parameters()).dtype
        with torch.inference_mode():
            allowed = None if self.regions is None else self._allowed(image, scale, grid)
            tensor = torch.from_numpy(pixels.transpose(2, 0, 1)[None].copy()).to(self.device, dtype)
            patches = self.tower.dense(tensor, self.attention, allowed)[0].float()
            patches = patches / patches.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            logits = self.scale * patches @ self.text_embeddings[rows].to(patches.device).T  # (h*w, columns)
            logits = logits.T.reshape(1, len(rows), *grid)
            logits = F.interpolate(logits, size=pixels.shape[:2], mode="bilinear", align_corners=False)
            logits = F.interpolate(logits[:, :, :new_h, :new_w], size=(height, width), mode="bilinear",
                                   align_corners=False)
        return logits[0].permute(1, 2, 0).cpu().numpy(), [0] * len(self.background_names) + ids

    def generate(self, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]]) -> list[np.ndarray]:
        if len(images) != len(labels):
            raise InputError(f"generate: {len(images)} images but {len(labels)} label lists")
        out = []
        for index, (image, image_labels) in enumerate(zip(images, labels)):
            image = check_image(image, f"images[{index}]")
            ids = self._check_labels(image_labels, index)
            if not ids:
                out.append(np.zeros(image.shape[:2], np.uint8))
                continue
            logits, columns = self.logits(image, ids)
            # classes outside the labels are not columns at all: the same as -inf logits
            probs = softmax(logits)
            winner = probs.argmax(-1)
            label_map = np.asarray(columns, np.uint8)[winner]
            if self.background_threshold > 0:
                label_map[np.take_along_axis(probs, winner[..., None], -1)[..., 0] < self.background_threshold] = 0
            out.append(label_map)
        return out


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)
