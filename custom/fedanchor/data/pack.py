"""Anchor packs: one folder that defines a federation's shared, public side.

A consortium writes its modalities, its public anchor pairs and (optionally) its
public validation pairs into files; every site and the server load the same folder
and check that they hold the same one by its fingerprint. The bundled scenarios
are packs too (``bundled_pack``), so bundled and user data take one code path::

    my-pack/pack.json
    my-pack/anchors/ids.txt           # one stable id per row, the order of every anchor file
    my-pack/anchors/<modality>.jsonl  # text: {"id": ..., "text": ...}; codes: {"id": ..., "codes": [...]}
    my-pack/anchors/<modality>.npy    # vector (n, D), image (n, H, W), signal (n, C, T): row i is ids.txt line i
    my-pack/anchors/labels.txt        # optional: an integer class per row (semantic recall)
    my-pack/validation/...            # optional: the same layout, pairs used for evaluation and model choice

``pack.json``::

    {"format": "fedanchor-pack/1", "name": "ecg-letters", "licence": "CC-BY-4.0",
     "provenance": "where the pairs come from", "description": "...",
     "modalities": {"ecg": {"kind": "signal", "shape": [3, 100]},
                    "letter": {"kind": "text"},
                    "labs": {"kind": "codes", "vocab": ["anaemia", "hyperkalaemia"]}},
     "anchors": {"ids": "anchors/ids.txt", "labels": "anchors/labels.txt",
                 "files": {"ecg": "anchors/ecg.npy", "letter": "anchors/letter.jsonl", "labs": "anchors/labs.jsonl"}},
     "validation": {"ids": "validation/ids.txt", "files": {...}}}

The fingerprint is a sha256 over the manifest's modalities and the parsed content
of every section (ids, labels, items): reformatting a file does not change it,
changing one value does. ``check_pack`` lists every problem with the file, the
row or line, and the fix; ``load_pack`` raises :class:`PackError` with them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .folder import DataFolderError, load_folder_file
from .scenario import ARRAY_KINDS, MODALITY_KINDS, FederatedSplit, ModalityData, ModalitySpec
from .split import _canonical_bytes, anchor_fingerprint, feature_stats

PACK_FILE = "pack.json"
PACK_FORMAT = "fedanchor-pack/1"
SECTIONS = ("anchors", "validation")
MIN_ANCHORS = 12  # the readout's k-fold choice needs at least 2 folds of 3 anchors, and then some to fit on


class PackError(ValueError):
    """A pack folder is not usable; the message lists each problem with its file and the fix (``problems``)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


@dataclass
class AnchorPack:
    """A federation's public side: modalities, anchor pairs, validation pairs (maybe none), and its fingerprint."""

    name: str
    modalities: dict[str, ModalitySpec]
    anchors: dict[str, ModalityData]
    validation: dict[str, ModalityData]
    fingerprint: str
    licence: str = ""
    provenance: str = ""
    root: Path | None = None  # None: built from the package's bundled data
    # A bundled scenario's unpaired site shards (demo data); a folder pack has none: each site reads its own folder.
    demo_private: dict[str, ModalityData] = field(default_factory=dict)
    seed: int = 0

    def info(self) -> dict[str, Any]:
        n_val = len(next(iter(self.validation.values()))) if self.validation else 0
        return {"name": self.name, "fingerprint": self.fingerprint, "root": str(self.root) if self.root else "bundled",
                "anchors": len(next(iter(self.anchors.values()))), "validation_pairs": n_val,
                "modalities": {m: {"kind": s.kind, **({"shape": list(s.shape)} if s.shape else {}),
                                   **({"codes": len(s.vocab)} if s.vocab else {})} for m, s in self.modalities.items()},
                "licence": self.licence, "provenance": self.provenance}

    def federated_split(self, site_modality: Mapping[str, str]) -> FederatedSplit:
        """The split every component reads: the pack's anchors, its validation pairs as the evaluation set, and the
        bundled shards of the named sites (none for a folder pack)."""
        unknown = {s: m for s, m in site_modality.items() if m not in self.modalities}
        if unknown:
            raise ValueError(f"site(s) {unknown} name modalities that pack {self.name!r} does not define; "
                             f"its modalities: {list(self.modalities)}")
        private = {s: self.demo_private[s] for s in sorted(site_modality) if s in self.demo_private}
        return FederatedSplit(scenario=self.name, seed=self.seed, anchors=dict(self.anchors), test=dict(self.validation),
                              private=private, site_modality=dict(site_modality), anchor_fingerprint=self.fingerprint,
                              feature_stats=feature_stats(self.anchors))


# -- reading -----------------------------------------------------------------------
def check_pack(root: str | Path, min_anchors: int = MIN_ANCHORS) -> list[str]:
    """Every problem of the pack at ``root``, each naming the file, the row or line, and the fix ([] when it is usable)."""
    try:
        _read(Path(root), min_anchors)
    except PackError as err:
        return err.problems
    return []


def load_pack(root: str | Path, expected_fingerprint: str = "", min_anchors: int = MIN_ANCHORS) -> AnchorPack:
    """The pack at ``root``; PackError listing its problems, or naming both fingerprints when it is not the expected one."""
    pack = _read(Path(root), min_anchors)
    if expected_fingerprint and pack.fingerprint != expected_fingerprint:
        raise PackError(f"pack {root} has fingerprint {pack.fingerprint[:16]}, the job expects {expected_fingerprint[:16]}: "
                        "this machine holds another version of the anchor pack; install the pack the job was made from "
                        "(`fedanchor pack info` prints a pack's fingerprint)")
    return pack


def _read(root: Path, min_anchors: int) -> AnchorPack:
    manifest_path = root / PACK_FILE
    if not manifest_path.is_file():
        raise PackError(f"{manifest_path} is missing; a pack folder holds pack.json (see `fedanchor pack --help` and docs/PACKS.md)")
    problems: list[str] = []
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PackError(f"{manifest_path} is not valid JSON ({err}); fix the syntax") from err
    if not isinstance(manifest, dict):
        raise PackError(f"{manifest_path} must hold a JSON object with 'name', 'modalities' and 'anchors'")
    if manifest.get("format", PACK_FORMAT) != PACK_FORMAT:
        problems.append(f"{manifest_path}: format {manifest.get('format')!r} is not {PACK_FORMAT!r}; "
                        "this fedanchor reads packs of that format")
    name = manifest.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{manifest_path}: 'name' must be a non-empty string, e.g. \"ecg-letters\"")
    specs = _modalities(manifest_path, manifest.get("modalities"), problems)
    sections: dict[str, dict[str, ModalityData]] = {}
    for section in SECTIONS:
        entry = manifest.get(section)
        if entry is None:
            if section == "anchors":
                problems.append(f"{manifest_path}: 'anchors' is missing; name the anchor files, e.g. "
                                '"anchors": {"ids": "anchors/ids.txt", "files": {"<modality>": "anchors/<modality>.npy"}}')
            continue
        sections[section] = _section(root, manifest_path, section, entry, specs, problems)
    anchors, validation = sections.get("anchors", {}), sections.get("validation", {})
    if anchors and len(next(iter(anchors.values()))) < min_anchors:
        problems.append(f"{root / 'anchors'}: {len(next(iter(anchors.values())))} anchor pairs are too few for the readout's "
                        f"cross-validation; a pack needs at least {min_anchors}: add anchor pairs")
    if anchors and validation:
        shared = sorted(set(next(iter(anchors.values())).sample_ids) & set(next(iter(validation.values())).sample_ids))
        if shared:
            problems.append(f"{root / 'validation'}: id(s) {shared[:5]} ({len(shared)} in all) are also anchors; a validation "
                            "pair must be held out from the anchors: remove it from one of the two")
    if problems:
        raise PackError(f"pack {root} has {len(problems)} problem(s):\n- " + "\n- ".join(problems), problems)
    return AnchorPack(name=name.strip(), modalities=specs, anchors=anchors, validation=validation,
                      fingerprint=pack_fingerprint(specs, anchors, validation), licence=str(manifest.get("licence", "")),
                      provenance=str(manifest.get("provenance", "")), root=root.resolve())


def _modalities(where: Path, entry: Any, problems: list[str]) -> dict[str, ModalitySpec]:
    if not isinstance(entry, dict) or len(entry) < 2:
        problems.append(f"{where}: 'modalities' must map at least two modality names to their kind, e.g. "
                        '{"ecg": {"kind": "signal", "shape": [3, 100]}, "letter": {"kind": "text"}}')
        return {}
    specs: dict[str, ModalitySpec] = {}
    for name, spec in entry.items():
        if not isinstance(spec, dict) or spec.get("kind") not in MODALITY_KINDS:
            kind = spec.get("kind") if isinstance(spec, dict) else spec
            problems.append(f"{where}: modality {name!r} has kind {kind!r}; use one of {list(MODALITY_KINDS)}")
            continue
        try:
            specs[name] = ModalitySpec(name, spec["kind"], tuple(int(v) for v in spec.get("shape", ())),
                                       tuple(str(c) for c in spec.get("vocab", ())))
        except (ValueError, TypeError) as err:
            problems.append(f"{where}: modality {name!r}: {err}")
            continue
        if spec["kind"] == "codes" and not specs[name].vocab:
            problems.append(f"{where}: modality {name!r} of kind 'codes' needs its vocabulary: \"vocab\": [\"code-a\", ...]")
        if spec["kind"] in ARRAY_KINDS and any(v < 1 for v in specs[name].shape):
            problems.append(f"{where}: modality {name!r} has shape {list(specs[name].shape)}; every dimension must be >= 1")
    return specs


def _section(root: Path, where: Path, section: str, entry: Any, specs: Mapping[str, ModalitySpec],
             problems: list[str]) -> dict[str, ModalityData]:
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict) or "ids" not in entry:
        problems.append(f"{where}: {section!r} must hold 'ids' (a file of one id per row) and 'files' (modality -> file)")
        return {}
    ids = _ids(root / entry["ids"], problems)
    labels = _labels(root / entry["labels"], len(ids), problems) if entry.get("labels") and ids is not None else None
    files = entry["files"]
    missing = [m for m in specs if m not in files]
    extra = [m for m in files if m not in specs]
    if missing:
        problems.append(f"{where}: {section!r} has no file for modality(ies) {missing}; every modality needs one")
    if extra:
        problems.append(f"{where}: {section!r} names file(s) for {extra}, which 'modalities' does not define; "
                        "define them or remove the files")
    out: dict[str, ModalityData] = {}
    for m, spec in specs.items():
        if m not in files or ids is None:
            continue
        path = root / files[m]
        try:
            data = load_folder_file(path, spec)
        except DataFolderError as err:
            problems.append(str(err))
            continue
        if _aligned(path, spec, data, ids, problems):
            rows = np.asarray(labels if labels is not None else np.arange(len(ids)), dtype=np.int64)
            out[m] = ModalityData(spec, data.items, list(ids), rows)
    return out if len(out) == len(specs) else {}


def _ids(path: Path, problems: list[str]) -> list[str] | None:
    if not path.is_file():
        problems.append(f"{path} is missing: write one stable id per line, in the row order of the section's files")
        return None
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    seen: dict[str, int] = {}
    for number, i in enumerate(ids, start=1):
        if i in seen:
            problems.append(f"{path}, line {number}: id {i!r} was already used on line {seen[i]}; ids must be unique")
            return None
        seen[i] = number
    return ids


def _labels(path: Path, n: int, problems: list[str]) -> list[int] | None:
    if not path.is_file():
        problems.append(f"{path} is missing; write an integer class per row, or drop 'labels' from pack.json")
        return None
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [k for k, v in enumerate(lines, start=1) if not v.lstrip("-").isdigit()]
    if bad or len(lines) != n:
        problems.append(f"{path}: {'line ' + str(bad[0]) + ' is not an integer' if bad else f'{len(lines)} labels for {n} ids'}; "
                        "write one integer class per row of ids.txt")
        return None
    return [int(v) for v in lines]


def _aligned(path: Path, spec: ModalitySpec, data: ModalityData, ids: list[str], problems: list[str]) -> bool:
    if len(data) != len(ids):
        problems.append(f"{path}: {len(data)} rows but {len(ids)} ids in the section's ids file; "
                        "every file of a section holds one row per id, in the same order")
        return False
    if not spec.is_array:  # JSON lines carry their own ids: they must follow ids.txt row for row
        for row, (got, want) in enumerate(zip(data.sample_ids, ids), start=1):
            if got != want:
                problems.append(f"{path}, row {row}: id {got!r} where the ids file has {want!r}; rows are misaligned: "
                                "order every file of the section like its ids file")
                return False
    return True


def pack_fingerprint(specs: Mapping[str, ModalitySpec], anchors: Mapping[str, ModalityData],
                     validation: Mapping[str, ModalityData]) -> str:
    """sha256 over the modalities and the parsed content of both sections."""
    digest = hashlib.sha256(b"fedanchor-pack-v1")
    digest.update(anchor_fingerprint(anchors).encode())
    for name, data in validation.items():
        digest.update(name.encode("utf-8") + b"\0" + _canonical_bytes(data))
    return digest.hexdigest()


# -- writing -----------------------------------------------------------------------
def write_pack(root: str | Path, name: str, anchors: Mapping[str, ModalityData],
               validation: Mapping[str, ModalityData] | None = None, licence: str = "", provenance: str = "",
               description: str = "") -> Path:
    """Write a pack folder from paired ModalityData (row i of every modality the same item); returns its pack.json."""
    root = Path(root)
    manifest: dict[str, Any] = {"format": PACK_FORMAT, "name": name, "description": description, "licence": licence,
                                "provenance": provenance, "modalities": {}}
    for section, data in (("anchors", anchors), ("validation", validation or {})):
        if not data:
            continue
        folder = root / section
        folder.mkdir(parents=True, exist_ok=True)
        first = next(iter(data.values()))
        (folder / "ids.txt").write_text("".join(f"{i}\n" for i in first.sample_ids), encoding="utf-8")
        (folder / "labels.txt").write_text("".join(f"{int(v)}\n" for v in first.semantic_labels), encoding="utf-8")
        files = {}
        for m, d in data.items():
            spec = d.spec
            manifest["modalities"][m] = {"kind": spec.kind, **({"shape": list(spec.shape)} if spec.shape else {}),
                                         **({"vocab": list(spec.vocab)} if spec.vocab else {})}
            files[m] = write_items(folder, d)
        manifest[section] = {"ids": f"{section}/ids.txt", "labels": f"{section}/labels.txt", "files": files}
    path = root / PACK_FILE
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_items(folder: Path, data: ModalityData) -> str:
    """One modality's items in the format a pack section and a site's data folder read; returns the file's name."""
    spec = data.spec
    if spec.is_array:
        np.save(folder / f"{spec.name}.npy", np.asarray(data.items, dtype=np.float32))
        return f"{folder.name}/{spec.name}.npy"
    with open(folder / f"{spec.name}.jsonl", "w", encoding="utf-8") as out:
        for sample_id, item in zip(data.sample_ids, data.items):
            value = {"text": item} if spec.kind == "text" else {"codes": [spec.vocab[c] for c in item]}
            out.write(json.dumps({"id": sample_id, **value}, ensure_ascii=False) + "\n")
    return f"{folder.name}/{spec.name}.jsonl"


# -- the bundled scenarios as packs ------------------------------------------------
def bundled_pack(scenario: str, site_modality: Mapping[str, str], n_anchors: int, n_test: int, seed: int,
                 max_private_per_site: int | None = None) -> AnchorPack:
    """A bundled scenario dealt by ``seed`` (split.py) as a pack: its anchors, its held-out pairs as the validation
    set, and the sites' unpaired shards as demo data. The fingerprint is the anchors' own, as before packs existed."""
    from .scenario import load_scenario
    from .split import split_scenario

    source = load_scenario(scenario)
    split = split_scenario(source, site_modality, n_anchors, n_test, seed, max_private_per_site)
    return AnchorPack(name=scenario, modalities=dict(source.modalities), anchors=split.anchors, validation=split.test,
                      fingerprint=split.anchor_fingerprint, licence=source.licence,
                      provenance=f"bundled scenario {scenario!r}, split seed {seed}", demo_private=split.private, seed=seed)
