"""Deterministic corruption of one site's data, for noisy-site experiments.

``corrupt(data, mode, severity, seed)`` returns a new ModalityData with the same
sample_ids and semantic_labels; the input is left untouched. Severity 0 leaves the data
as it is. Modes (``"small"``, any kind: keep only the first max(2, round((1 - s) x n))
items, a very small site; the only mode that changes the number of items):

- arrays (vector, image, signal), with std = per-position std over the site's items:
  "noise" adds N(0, (severity * std)^2); "gain" maps x -> (1 + severity) * x + severity * std;
  "shuffle" permutes each item's flattened positions with probability min(1, severity);
  "blur" (another acquisition) averages each value with its neighbours within radius round(severity) along every
  item axis (images: a box blur; signals: along time and channels; vectors: along the features);
  "garbage" replaces a min(1, severity) share of the items by N(mean, std^2) draws per position: the right
  shape, no content.
- text: "noise" replaces a fraction min(1, severity) of each report's words with words
  drawn from the whole site corpus; "gain" means nothing for text and acts as "noise";
  "shuffle" shuffles word order within each report with probability min(1, severity),
  then permutes the texts among a min(1, severity) share of the samples; "blur" truncates each report to its first
  max(1, (1 - min(0.9, severity)) x len) words; "garbage" replaces every word of a min(1, severity) share of the
  reports by words drawn from the corpus.
- codes: "noise" replaces each code with a random vocab code with probability
  min(1, severity); "gain" acts as "noise"; "shuffle" permutes the code sets among a
  min(1, severity) share of the samples; "blur" acts as "noise"; "garbage" draws a min(1, severity) share of the code sets at random (same sizes).
"""

from __future__ import annotations

import math

import numpy as np

from .scenario import ModalityData

CORRUPTIONS: tuple[str, ...] = ("noise", "gain", "shuffle", "blur", "garbage", "small")


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
    elif mode == "blur":
        out = _box_blur(x64, int(round(severity)))
    elif mode == "garbage":
        out = x64.copy()
        rows = rng.random(len(x64)) < min(1.0, severity)
        out[rows] = (x64.mean(axis=0, keepdims=True) + rng.normal(0.0, 1.0, size=x64.shape) * std)[rows]
    else:
        flat = x64.reshape(len(x64), -1).copy()
        for i in np.flatnonzero(rng.random(len(flat)) < min(1.0, severity)):
            flat[i] = flat[i, rng.permutation(flat.shape[1])]
        out = flat.reshape(x64.shape)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    return out.astype(dtype)


def _box_blur(x: np.ndarray, radius: int) -> np.ndarray:
    """Each value the mean of its neighbours within ``radius`` along every item axis (edges use what is there)."""
    out = x
    for axis in range(1, x.ndim):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(x.ndim)], mode="edge")
        out = sum(np.take(padded, np.arange(k, k + x.shape[axis]), axis=axis) for k in range(2 * radius + 1)) / (2 * radius + 1)
    return out


def _text(texts: list[str], mode: str, severity: float, rng: np.random.Generator) -> list[str]:
    p = min(1.0, severity)
    docs = [t.split() for t in texts]
    if mode == "blur":
        keep = 1.0 - min(0.9, severity)
        return [" ".join(words[:max(1, int(keep * len(words)))]) for words in docs]
    if mode == "garbage":  # every word of a min(1, severity) share of the reports replaced
        pool = [w for d in docs for w in d]
        return [" ".join(pool[int(rng.integers(len(pool)))] for _ in words) if rng.random() < p else " ".join(words)
                for words in docs]
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
    if mode == "garbage":
        return [tuple(sorted(int(c) for c in rng.choice(vocab_size, max(1, len(codes)), replace=False)))
                if rng.random() < p else tuple(codes) for codes in items]
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
    if mode == "small":
        return data.subset(np.arange(min(len(data), max(2, int(round((1.0 - min(1.0, severity)) * len(data)))))))
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
