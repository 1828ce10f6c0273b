"""Modality tokenizers: raw items of each kind become tokens of the trunk's width d.

Each tokenizer has two halves: ``encode`` turns raw items into tensors on the CPU
(no parameters, so a data loader could run it), and ``forward`` turns those into
token embeddings (B x L x d) and an attention mask. Non-text tokens enter the
trunk through ``inputs_embeds``; BERT adds its own position and token-type
embeddings and its LayerNorm. A learned modality embedding marks the modality.

The trainable parameters of a tokenizer are its modality's projector: the
parameters that sites holding this modality share (docs/DESIGN.md, "What crosses the network").
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..data.scenario import ModalitySpec

Encoded = dict[str, torch.Tensor]


class ModalityTokenizer(nn.Module):
    """Base: a modality embedding added to every token."""

    def __init__(self, spec: ModalitySpec, width: int, token_scale: float):
        super().__init__()
        self.spec = spec
        self.width = width
        self.token_scale = token_scale
        self.modality_embedding = nn.Parameter(torch.randn(width) * token_scale)

    def encode(self, items: Any) -> Encoded:  # pragma: no cover - abstract
        raise NotImplementedError

    def tokens(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self.tokens(encoded)
        return embeds + self.modality_embedding, mask


class TextTokenizer(ModalityTokenizer):
    """The trunk's own tokenizer and (frozen) word embeddings."""

    def __init__(self, spec: ModalitySpec, word_embeddings: nn.Embedding, hf_tokenizer: Any, max_tokens: int):
        super().__init__(spec, word_embeddings.embedding_dim, float(word_embeddings.weight.std()))
        self.word_embeddings = word_embeddings  # shared with the trunk, frozen
        self.hf_tokenizer = hf_tokenizer
        self.max_tokens = max_tokens

    def encode(self, items: Sequence[str]) -> Encoded:
        if isinstance(items, str):
            raise TypeError("text items must be a sequence of strings, not one string")
        out = self.hf_tokenizer(list(items), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def tokens(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        return self.word_embeddings(encoded["input_ids"]), encoded["attention_mask"]


class CodeSetTokenizer(ModalityTokenizer):
    """A learned embedding per code; a sample's codes are its tokens (order carries no meaning)."""

    def __init__(self, spec: ModalitySpec, width: int, token_scale: float):
        super().__init__(spec, width, token_scale)
        if not spec.vocab:
            raise ValueError(f"modality {spec.name!r} is of kind 'codes' but has an empty vocab")
        self.codes = nn.Embedding(len(spec.vocab) + 1, width, padding_idx=0)  # 0 pads; code i is row i + 1
        nn.init.normal_(self.codes.weight, std=token_scale)
        with torch.no_grad():
            self.codes.weight[0].zero_()

    def encode(self, items: Sequence[Sequence[int]]) -> Encoded:
        n_codes = len(self.spec.vocab)
        longest = max((len(c) for c in items), default=1)
        ids = torch.zeros(len(items), max(longest, 1), dtype=torch.long)
        for row, codes in enumerate(items):
            if len(codes) == 0:
                raise ValueError(f"a sample of modality {self.spec.name!r} has no codes; every sample needs at least one")
            for col, code in enumerate(codes):
                if not 0 <= int(code) < n_codes:
                    raise ValueError(f"code id {code} is outside the vocabulary of {self.spec.name!r} (0..{n_codes - 1})")
                ids[row, col] = int(code) + 1
        return {"code_ids": ids, "attention_mask": (ids > 0).long()}

    def tokens(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes(encoded["code_ids"]), encoded["attention_mask"]


class _ArrayTokenizer(ModalityTokenizer):
    """Standardise with public anchor statistics, cut into patches, project linearly."""

    def __init__(self, spec: ModalitySpec, width: int, token_scale: float, stats: tuple[np.ndarray, np.ndarray] | None, patch_dim: int):
        super().__init__(spec, width, token_scale)
        shape = tuple(spec.shape)
        mean, std = stats if stats is not None else (np.zeros(shape, np.float32), np.ones(shape, np.float32))
        self.register_buffer("mean", torch.tensor(np.broadcast_to(mean, shape), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(np.broadcast_to(std, shape), dtype=torch.float32).clamp_min(1e-6))
        self.project = nn.Linear(patch_dim, width)
        # Tokens should start at the scale of the trunk's word embeddings, where its LayerNorm and attention were trained.
        nn.init.normal_(self.project.weight, std=token_scale / math.sqrt(patch_dim))
        nn.init.zeros_(self.project.bias)

    def encode(self, items: np.ndarray | torch.Tensor) -> Encoded:
        x = torch.tensor(np.asarray(items, dtype=np.float32))
        if tuple(x.shape[1:]) != tuple(self.spec.shape):
            raise ValueError(f"modality {self.spec.name!r} expects items of shape {tuple(self.spec.shape)}, got {tuple(x.shape[1:])}")
        return {"values": x}

    def patches(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def tokens(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        x = (encoded["values"] - self.mean) / self.std
        tokens = self.project(self.patches(x))
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)


class PatchTokenizer(_ArrayTokenizer):
    """Vectors (chunks of ``patch`` features) and images (``patch`` x ``patch`` tiles)."""

    def __init__(self, spec: ModalitySpec, width: int, token_scale: float, stats=None, patch: int | None = None):
        if spec.kind == "image":
            if len(spec.shape) != 2:
                raise ValueError(f"image modality {spec.name!r} needs shape (H, W), got {spec.shape}")
            self.patch = patch or 4
            patch_dim = self.patch * self.patch
        elif spec.kind == "vector":
            if len(spec.shape) != 1:
                raise ValueError(f"vector modality {spec.name!r} needs shape (D,), got {spec.shape}")
            self.patch = patch or 8
            patch_dim = self.patch
        else:
            raise ValueError(f"PatchTokenizer handles 'vector' and 'image', not {spec.kind!r}")
        super().__init__(spec, width, token_scale, stats, patch_dim)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        if self.spec.kind == "vector":
            pad = (-x.shape[1]) % p
            x = nn.functional.pad(x, (0, pad))
            return x.reshape(x.shape[0], -1, p)
        pad_h, pad_w = (-x.shape[1]) % p, (-x.shape[2]) % p
        x = nn.functional.pad(x, (0, pad_w, 0, pad_h))
        b, h, w = x.shape
        return x.reshape(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, (h // p) * (w // p), p * p)


class SignalTokenizer(_ArrayTokenizer):
    """Multichannel signals (C x T): non-overlapping windows of ``window`` steps across all channels."""

    def __init__(self, spec: ModalitySpec, width: int, token_scale: float, stats=None, window: int | None = None):
        if spec.kind != "signal" or len(spec.shape) != 2:
            raise ValueError(f"signal modality {spec.name!r} needs kind 'signal' and shape (C, T), got {spec.kind!r} {spec.shape}")
        self.window = window or 10
        super().__init__(spec, width, token_scale, stats, spec.shape[0] * self.window)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        w = self.window
        x = nn.functional.pad(x, (0, (-x.shape[2]) % w))
        b, c, t = x.shape
        return x.reshape(b, c, t // w, w).permute(0, 2, 1, 3).reshape(b, t // w, c * w)


def build_tokenizer(spec: ModalitySpec, trunk: nn.Module, hf_tokenizer: Any, max_text_tokens: int,
                    stats: tuple[np.ndarray, np.ndarray] | None = None) -> ModalityTokenizer:
    word_embeddings = trunk.embeddings.word_embeddings
    width = word_embeddings.embedding_dim
    scale = float(word_embeddings.weight.detach().std())
    if spec.kind == "text":
        return TextTokenizer(spec, word_embeddings, hf_tokenizer, max_text_tokens)
    if spec.kind == "codes":
        return CodeSetTokenizer(spec, width, scale)
    if spec.kind in ("vector", "image"):
        return PatchTokenizer(spec, width, scale, stats)
    if spec.kind == "signal":
        return SignalTokenizer(spec, width, scale, stats)
    raise ValueError(f"modality {spec.name!r} has unknown kind {spec.kind!r}; use text, codes, vector, image or signal")
