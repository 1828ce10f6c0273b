"""Training-free features of a modality's items: what a consortium has without training anything.

- code sets: multi-hot vectors over the vocabulary;
- vectors, images, signals: the raw values, flattened;
- text: the frozen trunk's embedding, mean-pooled over the attention mask, of the
  whole text (up to ``text_tokens`` tokens, more than a training step reads).

They feed the readout's ``base`` block beside the global model's embedding, so the
scored space keeps what the inputs carry whatever the adapters learn, and they are
the features of the anchors-only rivals. None of them depends on trained weights:
a site, the server and the bench compute the same values from the same items.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..adapters.geolora import frozen_base
from .homogeneous import HomogeneousTransformer, take_items

TEXT_TOKENS = 128
TEXT_BATCH = 32


def multi_hot(items: Sequence[Sequence[int]], n_codes: int) -> np.ndarray:
    out = np.zeros((len(items), n_codes))
    for row, codes in enumerate(items):
        out[row, list(codes)] = 1.0
    return out


@torch.no_grad()
def _frozen_text(model: HomogeneousTransformer, modality: str, items: Sequence[str], text_tokens: int) -> np.ndarray:
    hf_tokenizer = getattr(model.tokenizer(modality), "hf_tokenizer", None)
    if hf_tokenizer is None:
        raise ValueError(f"modality {modality!r} is not a text modality of this model")
    device = model.head.weight.device
    chunks = []
    with frozen_base(model.trunk):
        for start in range(0, len(items), TEXT_BATCH):
            batch = hf_tokenizer(list(take_items(items, slice(start, start + TEXT_BATCH))), padding=True, truncation=True,
                                 max_length=text_tokens, return_tensors="pt").to(device)
            hidden = model.trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            chunks.append(((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)).double().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, model.trunk.config.hidden_size))


def base_features(model: HomogeneousTransformer, modality: str, items: Any, text_tokens: int = TEXT_TOKENS) -> np.ndarray:
    """items x features (float64) of ``modality``; see the module docstring for each kind."""
    spec = model.tokenizer(modality).spec
    if isinstance(items, str):
        raise TypeError("items must be a sequence of items, not one string")
    if spec.kind == "codes":
        return multi_hot(items, len(spec.vocab))
    if spec.kind == "text":
        was_training = model.training
        model.eval()
        try:
            return _frozen_text(model, modality, items, text_tokens)
        finally:
            model.train(was_training)
    x = np.asarray(items, dtype=np.float64)
    return x.reshape(len(x), -1)
