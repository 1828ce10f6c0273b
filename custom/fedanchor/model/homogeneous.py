"""The homogeneous transformer: every modality through one frozen trunk and one head.

    raw input --modality tokenizer--> tokens (L x d) --trunk + GeoLoRA--> mean pool --head--> unit vector (p)

Every site builds the same model; only the tokenizer of its own modality and the
adapters see its data. That is what makes the sites' updates comparable and their
embeddings one space.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..adapters.geolora import GeoLoRALinear, geolora_layers, inject_geolora
from ..config import FedAnchorConfig
from ..data.scenario import ModalitySpec
from .tokenizers import Encoded, ModalityTokenizer, build_tokenizer
from .trunk import load_text_tokenizer, load_trunk


class HomogeneousTransformer(nn.Module):
    def __init__(self, trunk: nn.Module, tokenizers: Mapping[str, ModalityTokenizer], embed_dim: int, seed: int = 0):
        super().__init__()
        self.trunk = trunk
        self.tokenizers = nn.ModuleDict(dict(tokenizers))
        width = trunk.config.hidden_size
        head = nn.Linear(width, embed_dim, bias=False)
        # A fixed, seeded orthogonal projection: identical at every site, adapted through GeoLoRA like the trunk.
        generator = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(max(width, embed_dim), min(width, embed_dim), generator=generator, dtype=torch.float64))
        head.weight.data.copy_((q.T if embed_dim <= width else q).float())
        head.weight.requires_grad_(False)
        self.head = head

    @property
    def modalities(self) -> list[str]:
        return list(self.tokenizers.keys())

    def adapters(self) -> dict[str, GeoLoRALinear]:
        return geolora_layers(self)

    def tokenizer(self, modality: str) -> ModalityTokenizer:
        if modality not in self.tokenizers:
            raise KeyError(f"modality {modality!r} is not in this model; it has {self.modalities}")
        return self.tokenizers[modality]  # type: ignore[return-value]

    def encode(self, modality: str, items: Any) -> Encoded:
        return self.tokenizer(modality).encode(items)

    def forward(self, modality: str, encoded: Encoded) -> torch.Tensor:
        device = self.head.weight.device
        if device.type == "cuda":  # pinned host pages let the copy overlap with the GPU's work
            encoded = {k: v.pin_memory().to(device, non_blocking=True) for k, v in encoded.items()}
        embeds, mask = self.tokenizer(modality)(encoded)
        hidden = self.trunk(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return F.normalize(self.head(pooled).float(), dim=-1)

    def embed(self, modality: str, items: Any) -> torch.Tensor:
        return self(modality, self.encode(modality, items))

    @torch.no_grad()
    def embed_all(self, modality: str, items: Any, batch_size: int = 128) -> torch.Tensor:
        """Embeddings of many items in eval mode, batched, on the CPU."""
        was_training = self.training
        self.eval()
        try:
            n = len(items)
            chunks = [self.embed(modality, take_items(items, slice(i, i + batch_size))).cpu() for i in range(0, n, batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else torch.zeros(0, self.head.out_features)

    def trainable_parameters(self, modality: str) -> list[nn.Parameter]:
        """What a site of this modality trains: every S, m and delta, and its own tokenizer."""
        params: list[nn.Parameter] = []
        for layer in self.adapters().values():
            params += [layer.S, layer.m, layer.delta]
        params += [p for p in self.tokenizer(modality).parameters() if p.requires_grad]
        return params


def take_items(items: Any, index: slice | np.ndarray | list[int]) -> Any:
    if isinstance(items, (np.ndarray, torch.Tensor)):
        return items[index]
    if isinstance(index, slice):
        return list(items[index])
    return [items[i] for i in index]



def build_model(config: FedAnchorConfig, modalities: Mapping[str, ModalitySpec],
                feature_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> HomogeneousTransformer:
    """The same model at every site and at the server, from the config and the scenario's modalities."""
    trunk = load_trunk(config.trunk)
    needs_text = any(spec.kind == "text" for spec in modalities.values())
    hf_tokenizer = load_text_tokenizer(config.trunk) if needs_text else None
    feature_stats = feature_stats or {}
    # Projector initialisation must match across sites: seed it, without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.adapter.seed)
        tokenizers = {
            name: build_tokenizer(spec, trunk, hf_tokenizer, config.trunk.max_text_tokens, feature_stats.get(name))
            for name, spec in modalities.items()
        }
    model = HomogeneousTransformer(trunk, tokenizers, config.trunk.embed_dim, seed=config.adapter.seed)
    inject_geolora(model.trunk, config.adapter.targets, config.adapter.rank, config.adapter.basis_init, config.adapter.seed)
    inject_geolora(model, ("head",), min(config.adapter.rank, config.trunk.embed_dim), config.adapter.basis_init, config.adapter.seed + 1)
    return model
