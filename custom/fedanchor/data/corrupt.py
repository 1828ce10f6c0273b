"""Deterministic corruption of one site's data, for noisy-site experiments.

``corrupt(data, mode, severity, seed)`` returns a new ModalityData with the same
sample_ids and semantic_labels; the input is left untouched. Modes:

- arrays (vector, image, signal), with std = per-position std over the site's items:
  "noise" adds N(0, (severity * std)^2); "gain" maps x -> (1 + severity) * x + severity * std;
  "shuffle" permutes each item's flattened positions with probability min(1, severity).
- text: "noise" replaces a fraction min(1, severity) of each report's words with words
  drawn from the whole site corpus; "gain" means nothing for text and acts as "noise";
  "shuffle" shuffles word order within each report with probability min(1, severity),
  then permutes the texts among a min(1, severity) share of the samples.
- codes: "noise" replaces each code with a random vocab code with probability
  min(1, severity); "gain" acts as "noise"; "shuffle" permutes the code sets among a
  min(1, severity) share of the samples.
"""

from __future__ import annotations

import math

import numpy as np

from .scenario import ModalityData

CORRUPTIONS: tuple[str, ...] = ("noise", "gain", "shuffle")


def _mix_rows(rows: list, p: float, rng: np.random.Generator) -> list:
    # Permute a random share p of the rows among themselves; the rest stay put.
    chosen = np.flatnonzero(rng.random(len(rows)) < p)
    out = list(rows)
    for dst, src in zip(chosen, rng.permutation(chosen)):
        out[dst] = rows[src]
    return out


def _arrays(x: np.ndarray, mode: str, severity: float, rng: np.random.Generator) -> np.ndarray:
    x64 = np.asarray(x, dtype=np.float64)
    std = x64.std(axis=0, keepdims=True)
    if mode == "noise":
        out = x64 + rng.normal(0.0, 1.0, size=x64.shape) * (severity * std)
    elif mode == "gain":
        out = (1.0 + severity) * x64 + severity * std
    else:
        flat = x64.reshape(len(x64), -1).copy()
        for i in np.flatnonzero(rng.random(len(flat)) < min(1.0, severity)):
            flat[i] = flat[i, rng.permutation(flat.shape[1])]
        out = flat.reshape(x64.shape)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    return out.astype(dtype)


def _text(texts: list[str], mode: str, severity: float, rng: np.random.Generator) -> list[str]:
    p = min(1.0, severity)
    docs = [t.split() for t in texts]
    if mode in ("noise", "gain"):
        pool = [w for d in docs for w in d]
        out = []
        for words in docs:
            k = int(round(p * len(words)))
            if k and pool:
                for pos in rng.choice(len(words), k, replace=False):
                    words[pos] = pool[int(rng.integers(len(pool)))]
            out.append(" ".join(words))
        return out
    shuffled = [
        " ".join(words[j] for j in rng.permutation(len(words))) if rng.random() < p else " ".join(words)
        for words in docs
    ]
    return _mix_rows(shuffled, p, rng)


def _codes(
    items: list[tuple[int, ...]], mode: str, severity: float, vocab_size: int, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    p = min(1.0, severity)
    if mode == "shuffle":
        return _mix_rows([tuple(c) for c in items], p, rng)
    out = []
    for codes in items:
        new = {int(rng.integers(vocab_size)) if rng.random() < p else int(c) for c in codes}
        out.append(tuple(sorted(new)))
    return out


def corrupt(data: ModalityData, mode: str, severity: float, seed: int) -> ModalityData:
    """A corrupted copy of ``data``; same seed, same corruption."""
    if mode not in CORRUPTIONS:
        raise ValueError(f"unknown corruption mode {mode!r}; choose one of {CORRUPTIONS}")
    severity = float(severity)
    if not math.isfinite(severity) or severity < 0:
        raise ValueError(f"severity={severity} must be a finite number >= 0 (0 leaves the data unchanged)")
    rng = np.random.default_rng(seed)
    kind = data.spec.kind
    if data.spec.is_array:
        items = _arrays(np.asarray(data.items), mode, severity, rng)
    elif kind == "text":
        items = _text(list(data.items), mode, severity, rng)
    else:
        items = _codes(list(data.items), mode, severity, len(data.spec.vocab), rng)
    return ModalityData(
        spec=data.spec,
        items=items,
        sample_ids=list(data.sample_ids),
        semantic_labels=np.array(data.semantic_labels, dtype=np.int64, copy=True),
    )
