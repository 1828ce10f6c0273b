"""Random views of raw items for a two-view contrastive objective on a site's private data.

``augment(spec, items, rng, strength)`` takes a batch as stored in
ModalityData.items (list[str], list of code tuples, or an (n, *shape) array) or a
single item (a str, a tuple of code ids, or an array of ``spec.shape``), and returns
the same type and shape. ``strength`` scales every perturbation; 0 returns an
unchanged copy. The input is never modified.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .scenario import ModalitySpec

MIN_WORDS = 3


def _check(spec: ModalitySpec, rng: np.random.Generator, strength: float) -> float:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    strength = float(strength)
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"strength={strength} must be a finite number >= 0 (1.0 is the default view)")
    return strength


def _text(text: str, rng: np.random.Generator, s: float) -> str:
    words = text.split()
    n = len(words)
    if n <= MIN_WORDS or s == 0:
        return " ".join(words)
    keep = rng.random(n) >= min(0.15 * s, 1.0)
    if keep.sum() < MIN_WORDS:
        keep[:] = False
        keep[rng.choice(n, MIN_WORDS, replace=False)] = True
    words = [w for w, k in zip(words, keep) if k]
    n = len(words)
    min_len = max(min(MIN_WORDS, n), math.ceil(max(0.7, 1.0 - 0.3 * s) * n))
    length = int(rng.integers(min_len, n + 1))
    start = int(rng.integers(0, n - length + 1))
    return " ".join(words[start : start + length])


def _codes(codes: tuple[int, ...], rng: np.random.Generator, s: float, vocab_size: int) -> tuple[int, ...]:
    codes = tuple(int(c) for c in codes)
    if not codes:
        return codes
    kept = [c for c in codes if rng.random() >= 0.2 * s]
    if not kept:
        kept = [codes[int(rng.integers(len(codes)))]]
    if rng.random() < 0.1 * s and len(set(kept)) < vocab_size:
        others = np.setdiff1d(np.arange(vocab_size), kept)
        kept.append(int(rng.choice(others)))
    return tuple(sorted(set(kept)))


def _vector(x: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    out = x * rng.normal(1.0, 0.05 * s, size=x.shape)
    n_mask = int(round(min(0.1 * s, 0.9) * x.shape[1]))
    if n_mask:
        # An exact count per item keeps the view difficulty the same for every sample.
        cols = np.argsort(rng.random(x.shape), axis=1)[:, :n_mask]
        np.put_along_axis(out, cols, 0.0, axis=1)
    return out


def _image(x: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    n, h, w = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    max_shift = 1 if s > 0 else 0
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
    for i, (dy, dx) in enumerate(shifts):
        src = x[i, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        out[i, max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out + rng.normal(0.0, 0.3 * s, size=x.shape)


def _signal(x: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    n, c, t = x.shape
    scale = rng.normal(1.0, 0.1 * s, size=(n, c, 1))
    sd = x.std(axis=2, keepdims=True)
    out = x * scale + rng.normal(0.0, 1.0, size=x.shape) * (0.05 * s * sd)
    max_shift = int(round(0.1 * t * min(s, 1.0)))
    shifts = rng.integers(-max_shift, max_shift + 1, size=n)
    for i, k in enumerate(shifts):
        out[i] = np.roll(out[i], int(k), axis=-1)
    return out


def augment(spec: ModalitySpec, items: Any, rng: np.random.Generator, strength: float = 1.0) -> Any:
    """One random view of ``items`` (a batch or a single item) of modality ``spec``."""
    s = _check(spec, rng, strength)
    if spec.kind == "text":
        if isinstance(items, str):
            return _text(items, rng, s)
        return [_text(t, rng, s) for t in items]
    if spec.kind == "codes":
        if not spec.vocab:
            raise ValueError(f"modality {spec.name!r} has an empty vocab; codes augmentation draws new codes from it")
        if isinstance(items, tuple):
            return _codes(items, rng, s, len(spec.vocab))
        return [_codes(c, rng, s, len(spec.vocab)) for c in items]

    x = np.asarray(items)
    single = x.shape == spec.shape
    if single:
        x = x[None]
    if x.shape[1:] != spec.shape:
        raise ValueError(
            f"modality {spec.name!r} expects items of shape (n, {', '.join(map(str, spec.shape))}) "
            f"or {spec.shape}, got {x.shape}"
        )
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    x64 = x.astype(np.float64)  # a fresh copy: the caller's array is never touched
    fn = {"vector": _vector, "image": _image, "signal": _signal}[spec.kind]
    out = fn(x64, rng, s).astype(dtype)
    return out[0] if single else out
