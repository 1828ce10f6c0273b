"""Anchor packs (data/pack.py): reading, checking, fingerprints, the bundled scenarios as packs, and the commands."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedanchor.cli import main as fedanchor_main
from fedanchor.config import config_from_dict, with_overrides
from fedanchor.data.folder import load_folder
from fedanchor.data.pack import PackError, check_pack, load_pack, write_pack
from fedanchor.data.scenario import ModalityData, ModalitySpec
from fedanchor.federation.loop import job_pack, make_split, run_in_process
from fedanchor.flare.jobs import DEMO_JOBS, full_config, read_job_config

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ("cough", "fever", "rash", "wheeze")


def paired(n: int, prefix: str, seed: int) -> dict[str, ModalityData]:
    """Three modalities none of the bundled scenarios has: a note (text), diagnoses (codes), a wave (signal)."""
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}-{i:03d}" for i in range(n)]
    labels = rng.integers(0, 3, n)
    specs = {"note": ModalitySpec("note", "text"), "dx": ModalitySpec("dx", "codes", vocab=VOCAB),
             "wave": ModalitySpec("wave", "signal", (2, 8))}
    items = {"note": [f"patient {i} presents with {VOCAB[g]}" for i, g in enumerate(labels)],
             "dx": [tuple(sorted({int(g), 3})) for g in labels],
             "wave": (rng.normal(size=(n, 2, 8)) + labels[:, None, None]).astype(np.float32)}
    return {m: ModalityData(s, items[m], ids, labels) for m, s in specs.items()}


@pytest.fixture
def pack_dir(tmp_path) -> Path:
    root = tmp_path / "pack"
    write_pack(root, "note-dx-wave", paired(20, "a", 0), paired(10, "v", 1), licence="CC0-1.0", provenance="generated")
    return root


def test_a_written_pack_reads_back_identically_and_checks_clean(pack_dir):
    anchors = paired(20, "a", 0)
    pack = load_pack(pack_dir)
    assert check_pack(pack_dir) == []
    assert list(pack.modalities) == ["note", "dx", "wave"] and pack.licence == "CC0-1.0"
    for m, want in anchors.items():
        got = pack.anchors[m]
        assert got.sample_ids == want.sample_ids
        assert np.array_equal(got.semantic_labels, want.semantic_labels)
        if want.spec.is_array:
            assert np.array_equal(got.items, want.items)
        else:
            assert list(got.items) == list(want.items)
    assert len(pack.validation["wave"]) == 10


def _edit_json_lines(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def _manifest(root: Path, edit) -> None:
    path = root / "pack.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _swap_first_two(lines):
    return [lines[1], lines[0], *lines[2:]]


def _nan_row(root: Path) -> None:
    x = np.load(root / "anchors/wave.npy")
    x[3, 0, 0] = np.nan
    np.save(root / "anchors/wave.npy", x)


def _reused_id(root: Path) -> None:
    # The first validation pair carries the id of an anchor, in every file of the section.
    _edit_json_lines(root / "validation/ids.txt", lambda lines: ["a-000", *lines[1:]])
    for name in ("note", "dx"):
        _edit_json_lines(root / f"validation/{name}.jsonl",
                         lambda lines: [json.dumps({**json.loads(lines[0]), "id": "a-000"}), *lines[1:]])


# (case, how to break the pack, the file a problem must name, words it must hold)
BAD_PACKS = [
    ("no manifest", lambda r: (r / "pack.json").unlink(), "pack.json", "is missing"),
    ("manifest not JSON", lambda r: (r / "pack.json").write_text("{modalities"), "pack.json", "not valid JSON"),
    ("unknown kind", lambda r: _manifest(r, lambda m: m["modalities"]["wave"].update(kind="audio")), "pack.json",
     "kind 'audio'"),
    ("codes without a vocabulary", lambda r: _manifest(r, lambda m: m["modalities"]["dx"].pop("vocab")), "pack.json",
     "vocab"),
    ("misaligned rows", lambda r: _edit_json_lines(r / "anchors/note.jsonl", _swap_first_two), "note.jsonl", "misaligned"),
    ("duplicate ids", lambda r: _edit_json_lines(r / "anchors/ids.txt", lambda lines: [lines[0], *lines[:-1]]), "ids.txt",
     "already used"),
    ("wrong shape", lambda r: np.save(r / "anchors/wave.npy", np.zeros((20, 3, 8), np.float32)), "wave.npy", "shape"),
    ("NaN", _nan_row, "wave.npy", "NaN"),
    ("fewer rows than ids", lambda r: np.save(r / "anchors/wave.npy", np.zeros((19, 2, 8), np.float32)), "wave.npy",
     "19 rows but 20 ids"),
    ("code outside the vocabulary", lambda r: _edit_json_lines(
        r / "anchors/dx.jsonl", lambda lines: [json.dumps({"id": "a-000", "codes": ["feverr"]}), *lines[1:]]),
     "dx.jsonl", "did you mean 'fever'"),
    ("a modality without a file", lambda r: _manifest(r, lambda m: m["anchors"]["files"].pop("wave")), "pack.json",
     "no file for modality"),
    ("a validation pair that is an anchor", _reused_id, "validation", "also anchors"),
    ("labels not integers", lambda r: (r / "anchors/labels.txt").write_text("x\n" * 20), "labels.txt", "not an integer"),
]


@pytest.mark.parametrize("case, corrupt, file, words", BAD_PACKS, ids=[c[0] for c in BAD_PACKS])
def test_a_bad_pack_is_refused_naming_the_file_and_the_fix(pack_dir, case, corrupt, file, words):
    corrupt(pack_dir)
    problems = check_pack(pack_dir)
    assert any(file in p and words in p for p in problems), problems
    with pytest.raises(PackError, match="pack"):
        load_pack(pack_dir)


def test_too_few_anchors_for_the_readout_are_named(pack_dir):
    problems = check_pack(pack_dir, min_anchors=30)
    assert any("20 anchor pairs are too few" in p and "at least 30" in p for p in problems), problems


def test_every_problem_is_listed_not_only_the_first(pack_dir):
    _nan_row(pack_dir)
    _edit_json_lines(pack_dir / "anchors/note.jsonl", _swap_first_two)
    problems = check_pack(pack_dir)
    assert len(problems) == 2 and any("wave.npy" in p for p in problems) and any("note.jsonl" in p for p in problems)


def test_the_fingerprint_follows_the_content_not_the_formatting(pack_dir):
    before = load_pack(pack_dir).fingerprint
    _manifest(pack_dir, lambda m: None)  # rewritten without indentation
    assert load_pack(pack_dir).fingerprint == before
    x = np.load(pack_dir / "validation/wave.npy")
    x[0, 0, 0] += 1.0
    np.save(pack_dir / "validation/wave.npy", x)
    changed = load_pack(pack_dir).fingerprint
    assert changed != before
    with pytest.raises(PackError, match=f"{changed[:16]}.*{before[:16]}"):
        load_pack(pack_dir, expected_fingerprint=before)


def test_the_bundled_motion_pack_is_the_split_as_before():
    """make_split reads the bundled scenario through its pack: the same anchors, held-out pairs, shards and fingerprint
    as dealing the scenario directly."""
    from fedanchor.data import load_scenario, split_scenario

    config = config_from_dict(full_config(DEMO_JOBS["motion"]["config"], 2))
    direct = split_scenario(load_scenario("motion"), {"site-1": "accel", "site-2": "gyro"}, 16, 24, 0)
    via_pack = make_split(config)
    assert via_pack.anchor_fingerprint == direct.anchor_fingerprint
    for part in ("anchors", "test", "private"):
        a, b = getattr(direct, part), getattr(via_pack, part)
        assert list(a) == list(b)
        for key in a:
            assert a[key].sample_ids == b[key].sample_ids and np.array_equal(a[key].items, b[key].items)


def test_motion_exported_as_a_pack_trains_to_the_same_figures(tmp_path):
    """The bundled motion scenario, written out as a pack and site folders by `fedanchor pack export`, gives the same
    final recall as the bundled run: one code path for bundled and user data."""
    torch.set_num_threads(1)
    assert fedanchor_main(["pack", "export", "--scenario", "motion", "--out", str(tmp_path / "pack"), "--site-data",
                           str(tmp_path / "sites"), "--set", "data.n_anchors=16", "--set", "data.n_test=24"]) == 0
    config = config_from_dict(full_config(DEMO_JOBS["motion"]["config"], 2))
    bundled = run_in_process(config, progress=None, evaluate_each_round=False)
    pack_config = with_overrides(config, {"data.pack": str(tmp_path / "pack"),
                                          "data.sites": {"site-1": "accel", "site-2": "gyro"}})
    split = make_split(pack_config)
    assert split.private == {}  # a folder pack holds no private data
    split.private = {s: load_folder(tmp_path / "sites" / s, split.anchors[m].spec) for s, m in split.site_modality.items()}
    from_files = run_in_process(pack_config, progress=None, split=split, evaluate_each_round=False)
    assert from_files.final_eval == bundled.final_eval
    assert job_pack(pack_config).name == "motion-seed0"


def test_job_new_writes_a_package_only_job_that_names_the_pack(pack_dir, tmp_path, capsys):
    out = tmp_path / "job"
    assert fedanchor_main(["job", "new", "--pack", str(pack_dir), "--site", "h-1=note", "--site", "h-2=dx",
                           "--site", "h-3=wave", "--out", str(out), "--rounds", "4", "--trunk", "tiny"]) == 0
    assert not (out / "app" / "custom").exists()
    config = read_job_config(out)
    pack = load_pack(pack_dir)
    assert config["data"]["pack"] == str(pack.root) and config["data"]["pack_fingerprint"] == pack.fingerprint
    assert config["data"]["sites"] == {"h-1": "note", "h-2": "dx", "h-3": "wave"} and config["rounds"] == 4
    assert json.loads((out / "meta.json").read_text())["min_clients"] == 3
    assert "wrote" in capsys.readouterr().out


JOB_NEW_ERRORS = [
    (["--site", "h-1=note", "--site", "h-2=dx", "--site", "h-3=ecg"], "ecg"),
    (["--site", "h-1=note", "--site", "h-2=dx"], "no site holds modality(ies) ['wave']"),
    (["--site", "h-1"], "write NAME=MODALITY"),
    (["--site", "h-1=note", "--site", "h-2=dx", "--site", "h-3=wave", "--set", "train.local_stepz=3"], "local_stepz"),
]


@pytest.mark.parametrize("sites, message", JOB_NEW_ERRORS)
def test_job_new_refuses_a_bad_site_list_and_writes_nothing(pack_dir, tmp_path, capsys, sites, message):
    out = tmp_path / "job"
    assert fedanchor_main(["job", "new", "--pack", str(pack_dir), *sites, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


SITE_FOLDERS = [
    ("wave", lambda d: np.save(d / "wave.npy", np.zeros((5, 2, 9), np.float32)), "wave.npy has shape (5, 2, 9)"),
    ("wave", lambda d: None, "wave.npy is missing"),
    ("dx", lambda d: (d / "dx.jsonl").write_text('{"id": "p1", "codes": ["rash"]}\n{"id": "p2", "codes": ["gout"]}\n'),
     "code 'gout' is not in the job's vocabulary"),
]


@pytest.mark.parametrize("modality, fill, message", SITE_FOLDERS)
def test_check_data_holds_a_site_folder_to_the_packs_modality(pack_dir, tmp_path, capsys, modality, fill, message):
    folder = tmp_path / "site"
    folder.mkdir()
    fill(folder)
    assert fedanchor_main(["check-data", str(folder), "--pack", str(pack_dir), "--modality", modality]) == 2
    assert message in capsys.readouterr().err


def test_pack_check_command_prints_each_problem_and_fails(pack_dir, capsys):
    _nan_row(pack_dir)
    assert fedanchor_main(["pack", "check", str(pack_dir)]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s)" in out and "wave.npy" in out
    assert fedanchor_main(["pack", "info", str(pack_dir)]) == 2  # a broken pack has no info either


def test_the_worked_example_generator_writes_a_clean_pack(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "docs/examples/make_pack.py"), str(tmp_path)], check=True, capture_output=True)
    pack = load_pack(tmp_path / "pack")
    assert pack.info()["modalities"] == {"labs": {"kind": "vector", "shape": [12]}, "ecg": {"kind": "signal", "shape": [2, 32]}}
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == ["hospital-a", "hospital-b", "hospital-c"]
