"""A hospital's own data folder: read when right, refused with the file, the line and the fix when not."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fedanchor.cli import main
from fedanchor.data.folder import DataFolderError, load_folder
from fedanchor.data.scenario import ModalitySpec

TEXT = ModalitySpec("report", "text")
CODES = ModalitySpec("findings", "codes", vocab=("Cardiomegaly", "Pleural Effusion", "normal"))
VECTOR = ModalitySpec("zernike", "vector", shape=(4,))


def write_jsonl(folder, name, rows):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_good_folders_load(tmp_path):
    write_jsonl(tmp_path, "report.jsonl", [{"id": "a", "text": "No effusion."}, {"id": "b", "text": "Enlarged heart."}])
    write_jsonl(tmp_path, "findings.jsonl", [{"id": "a", "codes": ["normal"]}, {"id": "b", "codes": ["Pleural Effusion", "Cardiomegaly"]}])
    np.save(tmp_path / "zernike.npy", np.ones((3, 4)))
    assert load_folder(tmp_path, TEXT).items == ["No effusion.", "Enlarged heart."]
    assert load_folder(tmp_path, CODES).items == [(2,), (0, 1)]
    assert load_folder(tmp_path, VECTOR).items.shape == (3, 4)


BAD = [
    ("no folder", TEXT, None, "does not exist"),
    ("no file", TEXT, lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), "report.jsonl is missing"),
    ("not json", TEXT, lambda d: write_jsonl(d, "report.jsonl", ['{"id": "a", "text": "x"}', "{oops"]), "line 2: not a JSON object"),
    ("missing key", TEXT, lambda d: write_jsonl(d, "report.jsonl", [{"id": "a", "body": "x"}]), "needs the keys 'id' and 'text'"),
    ("empty text", TEXT, lambda d: write_jsonl(d, "report.jsonl", [{"id": "a", "text": " "}, {"id": "b", "text": "y"}]), "non-empty"),
    ("duplicate id", TEXT, lambda d: write_jsonl(d, "report.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]), "already used on line 1"),
    ("unknown code", CODES, lambda d: write_jsonl(d, "findings.jsonl", [{"id": "a", "codes": ["Cardiomegally"]}]), "did you mean 'Cardiomegaly'"),
    ("codes not a list", CODES, lambda d: write_jsonl(d, "findings.jsonl", [{"id": "a", "codes": "normal"}]), "list of code names"),
    ("too few", TEXT, lambda d: write_jsonl(d, "report.jsonl", [{"id": "a", "text": "x"}]), "at least 2"),
    ("wrong shape", VECTOR, lambda d: (d.mkdir(), np.save(d / "zernike.npy", np.ones((3, 5)))), r"needs \(n, 4\)"),
    ("nan row", VECTOR, lambda d: (d.mkdir(), np.save(d / "zernike.npy", np.array([[1, 2, 3, 4], [np.nan, 0, 0, 0.0]]))), r"row\(s\) \[1\]"),
    ("strings", VECTOR, lambda d: (d.mkdir(), np.save(d / "zernike.npy", np.array([["a"] * 4] * 2))), "real numbers"),
    ("not npy", VECTOR, lambda d: (d.mkdir(), (d / "zernike.npy").write_text("1,2,3,4")), "not a readable .npy"),
]


@pytest.mark.parametrize("name,spec,make,match", BAD, ids=[b[0] for b in BAD])
def test_bad_folders_are_refused_with_the_file_and_the_fix(tmp_path, name, spec, make, match):
    folder = tmp_path / "site"
    if make is not None:
        make(folder)
    with pytest.raises(DataFolderError, match=match):
        load_folder(folder, spec)


def test_check_data_command(tmp_path, capsys):
    write_jsonl(tmp_path, "findings.jsonl", [{"id": "a", "codes": ["cardiomegaly"]}, {"id": "b", "codes": []}])
    assert main(["check-data", str(tmp_path), "--scenario", "xray", "--modality", "findings"]) == 0
    assert "ok: 2 codes items" in capsys.readouterr().out
    write_jsonl(tmp_path, "findings.jsonl", [{"id": "a", "codes": ["cardiomegaly"]}, {"id": "b", "codes": ["Heart Size"]}])
    assert main(["check-data", str(tmp_path), "--scenario", "xray", "--modality", "findings"]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["check-data", str(tmp_path), "--scenario", "xray", "--modality", "pixels"]) == 2
