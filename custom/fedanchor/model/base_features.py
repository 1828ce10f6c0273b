"""Training-free features of a modality's items: what a consortium has without training anything.

- code sets: multi-hot vectors over the vocabulary;
- vectors, images, signals: the raw values, flattened;
- text: the frozen trunk's embedding, mean-pooled over the attention mask, of the
  whole text (up to ``text_tokens`` tokens, more than a training step reads).

They feed the readout's ``base`` block beside the global model's embedding, so the
scored space keeps what the inputs carry whatever the adapters learn, and they are
the features of the anchors-only rivals. None of them depends on trained weights:
a site, the server and the bench compute the same values from the same items.
``base_features_and_coherence`` also gives each text's coherence, from the same frozen pass,
for the typicality check's word order.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

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


@contextmanager
def _evaluating(model: HomogeneousTransformer) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def _frozen_text(model: HomogeneousTransformer, modality: str, items: Sequence[str],
                 text_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean-pooled embedding, coherence) of each text, from one pass through the frozen trunk in eval mode."""
    hf_tokenizer = getattr(model.tokenizer(modality), "hf_tokenizer", None)
    if hf_tokenizer is None:
        raise ValueError(f"modality {modality!r} is not a text modality of this model")
    device = model.head.weight.device
    pooled, coherence = [], []
    with _evaluating(model), frozen_base(model.trunk):
        for start in range(0, len(items), TEXT_BATCH):
            batch = hf_tokenizer(list(take_items(items, slice(start, start + TEXT_BATCH))), padding=True, truncation=True,
                                 max_length=text_tokens, return_tensors="pt").to(device)
            hidden = model.trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].to(hidden.dtype)
            weights = mask.unsqueeze(-1)
            pooled.append(((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)).double().cpu().numpy())
            # A trunk reads each word in its context, so words in their order make neighbouring states alike.
            unit = torch.nn.functional.normalize(hidden.double(), dim=-1)
            pairs = (mask[:, 1:] * mask[:, :-1]).double()
            cosine = (unit[:, 1:] * unit[:, :-1]).sum(-1)
            coherence.append(((cosine * pairs).sum(1) / pairs.sum(1).clamp_min(1.0)).cpu().numpy())
    if not pooled:
        return np.zeros((0, model.trunk.config.hidden_size)), np.zeros(0)
    return np.concatenate(pooled), np.concatenate(coherence)


def base_features_and_coherence(model: HomogeneousTransformer, modality: str, items: Any,
                                text_tokens: int = TEXT_TOKENS) -> tuple[np.ndarray, np.ndarray | None]:
    """``base_features`` and, for text, each text's coherence from the same frozen pass (the typicality check's
    word-order statistic: the mean cosine of neighbouring tokens' contextual states, which shuffled words lower while
    the mean-pooled embedding hardly moves); None for the other kinds."""
    spec = model.tokenizer(modality).spec
    if isinstance(items, str):
        raise TypeError("items must be a sequence of items, not one string")
    if spec.kind == "codes":
        return multi_hot(items, len(spec.vocab)), None
    if spec.kind == "text":
        return _frozen_text(model, modality, items, text_tokens)
    x = np.asarray(items, dtype=np.float64)
    return x.reshape(len(x), -1), None


def base_features(model: HomogeneousTransformer, modality: str, items: Any, text_tokens: int = TEXT_TOKENS) -> np.ndarray:
    """items x features (float64) of ``modality``; see the module docstring for each kind."""
    return base_features_and_coherence(model, modality, items, text_tokens)[0]
