"""A hospital's own data: one folder per site, one file per modality, checked before any training.

The folder named by ``data.path`` in the site's ``local/fedanchor_site.json``
holds one file for the site's modality, named after the modality:

- text (``report``): ``report.jsonl``, one JSON object per line:
  ``{"id": "r-000123", "text": "Heart size is normal. No effusion."}``
- code sets (``findings``): ``findings.jsonl``, one object per line:
  ``{"id": "r-000123", "codes": ["Cardiomegaly", "Pleural Effusion"]}``; every
  code must be in the job's vocabulary (``[]`` is an item with no finding).
- vectors, images, signals (``zernike``, ``pixels``, ``accel``): ``<modality>.npy``,
  a float array of shape (n, *shape of the modality), finite; ids are the row numbers.

Ids must be unique. Nothing here leaves the site; the items become the site's
private set. Every problem raises :class:`DataFolderError` naming the file, the
line or row, and what to change; ``fedanchor check-data`` prints the same.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np

from .scenario import ModalityData, ModalitySpec

MIN_ITEMS = 2  # the two-view objective needs two items in a batch


class DataFolderError(ValueError):
    """The site's data folder or file is not usable; the message names the file and the fix."""


def data_file(folder: str | Path, spec: ModalitySpec) -> Path:
    suffix = ".npy" if spec.is_array else ".jsonl"
    return Path(folder) / f"{spec.name}{suffix}"


def load_folder(folder: str | Path, spec: ModalitySpec) -> ModalityData:
    """The site's private items of ``spec`` from ``folder``, or a DataFolderError that says what is wrong."""
    root = Path(folder)
    if not root.is_dir():
        raise DataFolderError(f"data folder {root} does not exist (data.path in the site's fedanchor_site.json); "
                              "create it or point data.path at the folder that holds the site's files")
    path = data_file(root, spec)
    if not path.is_file():
        present = sorted(p.name for p in root.iterdir())[:8]
        raise DataFolderError(f"{path} is missing: a site of modality {spec.name!r} ({spec.kind}) needs {path.name} in "
                              f"{root}; the folder holds {present or 'nothing'}")
    data = load_folder_file(path, spec)
    if len(data) < MIN_ITEMS:
        raise DataFolderError(f"{path} holds {len(data)} item(s); a site needs at least {MIN_ITEMS}")
    return data


def load_folder_file(path: Path, spec: ModalitySpec) -> ModalityData:
    """One file of ``spec``'s items (``.npy`` for arrays, JSON lines otherwise), or a DataFolderError naming the problem."""
    if not path.is_file():
        raise DataFolderError(f"{path} is missing: modality {spec.name!r} ({spec.kind}) needs it")
    return _arrays(path, spec) if spec.is_array else _records(path, spec)


def _arrays(path: Path, spec: ModalitySpec) -> ModalityData:
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataFolderError(f"{path} is not a readable .npy array ({err}); save it with numpy.save(path, array)") from err
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataFolderError(f"{path} has dtype {x.dtype}; store real numbers (float32 or float64)")
    want = (len(x), *spec.shape) if x.ndim else None
    if x.ndim != 1 + len(spec.shape) or tuple(x.shape[1:]) != spec.shape:
        raise DataFolderError(f"{path} has shape {x.shape}; modality {spec.name!r} needs (n, {', '.join(map(str, spec.shape))})"
                              + (f", e.g. {want}" if want else ""))
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(1))
    if bad.size:
        raise DataFolderError(f"{path}: row(s) {bad[:5].tolist()} hold NaN or Inf ({bad.size} in all); remove or repair them")
    ids = [f"{spec.name}-{i}" for i in range(len(x))]
    return ModalityData(spec, x.astype(np.float32), ids, np.zeros(len(x), dtype=np.int64))


def _records(path: Path, spec: ModalitySpec) -> ModalityData:
    field = "text" if spec.kind == "text" else "codes"
    code_id = {c: i for i, c in enumerate(spec.vocab)}
    items: list = []
    ids: list[str] = []
    seen: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataFolderError(f"{path} is not UTF-8 text ({err}); re-save it as UTF-8 JSON lines") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFolderError(f"{where}: not a JSON object ({err.msg}); each line must be like "
                                  f"{_example(spec)}") from err
        if not isinstance(record, dict) or "id" not in record or field not in record:
            raise DataFolderError(f"{where}: needs the keys 'id' and {field!r}, e.g. {_example(spec)}")
        sample_id = str(record["id"])
        if sample_id in seen:
            raise DataFolderError(f"{where}: id {sample_id!r} was already used on line {seen[sample_id]}; ids must be unique")
        seen[sample_id] = number
        value = record[field]
        if spec.kind == "text":
            if not isinstance(value, str) or not value.strip():
                raise DataFolderError(f"{where}: 'text' must be a non-empty string")
            items.append(value)
        else:
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise DataFolderError(f"{where}: 'codes' must be a list of code names, e.g. {_example(spec)}")
            unknown = [c for c in value if c not in code_id]
            if unknown:
                near = difflib.get_close_matches(unknown[0], spec.vocab, n=3)
                raise DataFolderError(f"{where}: code {unknown[0]!r} is not in the job's vocabulary of {len(spec.vocab)} "
                                      f"codes{'; did you mean ' + ', '.join(repr(n) for n in near) if near else ''}")
            items.append(tuple(sorted({code_id[c] for c in value})))
        ids.append(sample_id)
    return ModalityData(spec, items, ids, np.zeros(len(items), dtype=np.int64))


def _example(spec: ModalitySpec) -> str:
    if spec.kind == "text":
        return '{"id": "r-1", "text": "No acute cardiopulmonary abnormality."}'
    return '{"id": "r-1", "codes": ' + json.dumps(list(spec.vocab[:2])) + "}"
