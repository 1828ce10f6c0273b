"""Write a small anchor pack and three hospitals' data folders for a modality pair fedanchor does not bundle.

A consortium's two modalities, simulated: a lab panel (a vector of 12 values) and a
two-lead ECG strip (a signal of 2 channels x 32 samples), both nonlinear views of the
same hidden patient state. The pack holds 60 public anchor pairs and 60 public
validation pairs; hospital-a and hospital-c hold ECGs only, hospital-b lab panels
only, none of them paired. Only numpy and the standard library: a consortium writes
the same files from its own data.

    python docs/examples/make_pack.py OUT        # writes OUT/pack and OUT/sites/<hospital>/
"""
import json
import sys
from pathlib import Path

import numpy as np


def views(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labs n x 12, ecg n x 2 x 32, class n): two views of a hidden 4-d state drawn from 4 patient groups."""
    group = rng.integers(0, 4, n)
    state = rng.normal(size=(4, 4))[group] + 0.6 * rng.normal(size=(n, 4))
    mixing = np.random.default_rng(7).normal(size=(4, 12))  # fixed: the same physiology at every hospital
    labs = np.tanh(state @ mixing) + 0.1 * rng.normal(size=(n, 12))
    t = np.linspace(0.0, 1.0, 32)
    rate = 3.0 + np.abs(state[:, :1])  # beats per strip
    lead_1 = np.sin(2 * np.pi * rate * t) * (1.0 + 0.3 * state[:, 1:2])
    lead_2 = np.cos(2 * np.pi * rate * t + state[:, 2:3]) * (1.0 + 0.3 * np.tanh(state[:, 3:4]))
    ecg = np.stack([lead_1, lead_2], axis=1) + 0.05 * rng.normal(size=(n, 2, 32))
    return labs.astype(np.float32), ecg.astype(np.float32), group


def write_section(folder: Path, ids: list[str], labs: np.ndarray, ecg: np.ndarray, group: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    (folder / "labels.txt").write_text("".join(f"{g}\n" for g in group))
    np.save(folder / "labs.npy", labs)
    np.save(folder / "ecg.npy", ecg)


def main(out: Path) -> None:
    rng = np.random.default_rng(0)
    labs, ecg, group = views(720, rng)
    pack = out / "pack"
    write_section(pack / "anchors", [f"anchor-{i:03d}" for i in range(60)], labs[:60], ecg[:60], group[:60])
    write_section(pack / "validation", [f"val-{i:03d}" for i in range(60)], labs[60:120], ecg[60:120], group[60:120])
    manifest = {
        "format": "fedanchor-pack/1",
        "name": "labs-ecg-example",
        "description": "simulated lab panels and two-lead ECG strips of the same patients",
        "licence": "CC0-1.0",
        "provenance": "docs/examples/make_pack.py, seed 0",
        "modalities": {"labs": {"kind": "vector", "shape": [12]}, "ecg": {"kind": "signal", "shape": [2, 32]}},
        "anchors": {"ids": "anchors/ids.txt", "labels": "anchors/labels.txt",
                    "files": {"labs": "anchors/labs.npy", "ecg": "anchors/ecg.npy"}},
        "validation": {"ids": "validation/ids.txt", "labels": "validation/labels.txt",
                       "files": {"labs": "validation/labs.npy", "ecg": "validation/ecg.npy"}},
    }
    (pack / "pack.json").write_text(json.dumps(manifest, indent=1) + "\n")
    # Private, unpaired: each hospital keeps only its own modality of its own patients.
    for hospital, file, rows in (("hospital-a", "ecg.npy", ecg[120:320]), ("hospital-b", "labs.npy", labs[320:520]),
                                 ("hospital-c", "ecg.npy", ecg[520:720])):
        folder = out / "sites" / hospital
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / file, rows)
    print(f"wrote {pack} and {out / 'sites'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python docs/examples/make_pack.py OUT")
    main(Path(sys.argv[1]))
