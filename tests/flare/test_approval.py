"""A site admits only the jobs its admin approved, exactly as approved (flare/approval.py), and says why not."""
from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from conftest import changed_job
from fedanchor.cli import main as fedanchor_main
from fedanchor.flare.approval import (APPROVALS_FILE, ApprovalError, ApprovedJobsDeployer, app_digest, approve,
                                      check_app_data, kit_site_name, read_approvals, revoke, site_app)

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "hospitals-motion"
SITE = "hospital-a"


@pytest.fixture
def kit(tmp_path) -> Path:
    """A site kit as provisioning writes it: startup/fed_client.json names the site; local/ holds the site's files."""
    kit = tmp_path / "kits" / SITE
    (kit / "startup").mkdir(parents=True)
    (kit / "local").mkdir()
    (kit / "startup" / "fed_client.json").write_text(json.dumps({"client": {"fqsn": SITE}}))
    return kit


def zipped_app(job: Path) -> tuple[bytes, dict]:
    app, meta = site_app(job, SITE)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in app.rglob("*"):
            archive.write(path, path.relative_to(app).as_posix())
    return buffer.getvalue(), meta


def test_the_approved_job_is_admitted_and_reformatting_it_changes_nothing(kit, tmp_path):
    approve(JOB, kit, approved_by="it@hospital-a")
    data, meta = zipped_app(JOB)
    assert check_app_data(data, meta, SITE, kit / "local" / APPROVALS_FILE) is None
    reformatted = tmp_path / "reformatted"
    shutil.copytree(JOB, reformatted)
    for path in reformatted.rglob("*.json"):
        path.write_text(json.dumps(json.loads(path.read_text()), indent=7))
    data, meta = zipped_app(reformatted)
    assert check_app_data(data, meta, SITE, kit / "local" / APPROVALS_FILE) is None


@pytest.mark.parametrize("key, value, said", [
    ("rounds", 9, 'rounds 2 -> 9'),
    ("train.lr", 0.05, 'train.lr 0.005 -> 0.05'),
    ("data.pack_fingerprint", "0123456789abcdef", 'data.pack_fingerprint "" -> "0123456789abcdef"'),
    ("privacy.dp", True, "privacy.dp false -> true"),
    ("privacy.noise_multiplier", 0.1, "privacy.noise_multiplier 1.0 -> 0.1"),
    ("meta.scope", "public", 'scope "fedanchor" -> "public"'),
    ("custom code", None, 'custom code files "(absent)" -> 1'),
])
def test_a_changed_job_is_refused_with_what_changed_and_the_fix(kit, tmp_path, key, value, said):
    approve(JOB, kit, approved_by="it@hospital-a")
    data, meta = zipped_app(changed_job(JOB, tmp_path / 'changed', {key: value}))
    reason = check_app_data(data, meta, SITE, kit / "local" / APPROVALS_FILE)
    assert reason is not None and reason.startswith(f"{SITE} has not approved this job")
    assert said in reason, reason
    assert "approved" in reason and "by it@hospital-a" in reason and "fedanchor job approve" in reason


def test_a_site_that_approved_nothing_refuses_everything(kit):
    data, meta = zipped_app(JOB)
    reason = check_app_data(data, meta, SITE, kit / "local" / APPROVALS_FILE)
    assert "approved no job yet" in reason and "fedanchor job approve" in reason


@pytest.mark.parametrize("content, said", [("{not json", "is not valid JSON"),
                                           (json.dumps({"approved": []}), "is not a fedanchor approvals file"),
                                           (json.dumps({"format": "fedanchor-approvals/1", "approved": [{"x": 1}]}),
                                            "unexpected fields")])
def test_a_broken_approvals_file_refuses_with_the_file_named_and_is_left_as_it_was(kit, content, said):
    path = kit / "local" / APPROVALS_FILE
    path.write_text(content)
    data, meta = zipped_app(JOB)
    reason = check_app_data(data, meta, SITE, path)
    assert said in reason and str(path) in reason
    with pytest.raises(ApprovalError, match=said):
        approve(JOB, kit, approved_by="it@hospital-a")
    assert path.read_text() == content  # nothing lost: the site's admin repairs it


def test_approving_twice_keeps_one_entry_and_revoke_withdraws_it(kit, tmp_path):
    first = approve(JOB, kit, approved_by="it@hospital-a")
    approve(JOB, kit, approved_by="it@hospital-a", note="again")
    other = approve(changed_job(JOB, tmp_path / "changed", {"rounds": 4}), kit, approved_by="it@hospital-a")
    path = kit / "local" / APPROVALS_FILE
    assert [a.digest for a in read_approvals(path)] == [first.digest, other.digest]
    assert read_approvals(path)[0].note == "again"
    assert read_approvals(path)[1].settings["rounds"] == 4
    assert [a.digest for a in revoke(kit, first.digest[:10])] == [first.digest]
    assert [a.digest for a in read_approvals(path)] == [other.digest]
    with pytest.raises(ApprovalError, match="too short"):
        revoke(kit, "abc")
    with pytest.raises(ApprovalError, match="no approval"):
        revoke(kit, first.digest[:10])


def test_the_digest_covers_every_app_file_but_not_flares_signing_files(tmp_path):
    app = tmp_path / "app"
    shutil.copytree(site_app(JOB, SITE)[0], app)
    before = app_digest(app, "fedanchor")
    (app / ".__nvfl_sig.json").write_text("{}")
    (app / "config" / ".__nvfl_submitter.crt").write_text("cert")
    assert app_digest(app, "fedanchor") == before
    (app / "config" / "notes.txt").write_text("x")
    assert app_digest(app, "fedanchor") != before
    for sneaked in ("custom/evil.pyc", "custom/__pycache__/mymod.cpython-311.pyc", "custom/.__nvfl_other"):
        before = app_digest(app, "fedanchor")
        (app / sneaked).parent.mkdir(parents=True, exist_ok=True)
        (app / sneaked).write_bytes(b"code")
        assert app_digest(app, "fedanchor") != before, sneaked  # compiled code runs: it counts
    assert app_digest(site_app(JOB, SITE)[0], "other") != before


def test_a_site_the_job_does_not_deploy_to_and_a_folder_without_meta_are_named(tmp_path, kit):
    job = tmp_path / "job"
    shutil.copytree(JOB, job)
    meta = json.loads((job / "meta.json").read_text())
    meta["deploy_map"] = {app: ["hospital-b"] for app in meta["deploy_map"]}
    (job / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ApprovalError, match="deploys no app to site 'hospital-a'"):
        approve(job, kit, approved_by="it@hospital-a")
    with pytest.raises(ApprovalError, match="meta.json does not exist"):
        approve(tmp_path, kit, approved_by="it@hospital-a")
    with pytest.raises(ApprovalError, match="not a startup kit"):
        approve(JOB, tmp_path, approved_by="it@hospital-a")


@pytest.mark.parametrize("data, said", [(b"not a zip", "File is not a zip file"), (b"", "File is not a zip file")])
def test_an_app_that_cannot_be_read_is_refused_with_a_reason_not_an_exception(kit, data, said):
    approve(JOB, kit, approved_by="it@hospital-a")
    reason = check_app_data(data, {"scope": "fedanchor"}, SITE, kit / "local" / APPROVALS_FILE)
    assert reason.startswith(f"{SITE} cannot read the job's app") and said in reason


def test_an_app_with_a_file_outside_its_folder_is_refused_before_unpacking(kit, tmp_path):
    approve(JOB, kit, approved_by="it@hospital-a")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../outside.txt", "x")
    reason = check_app_data(buffer.getvalue(), {"scope": "fedanchor"}, SITE, kit / "local" / APPROVALS_FILE)
    assert "outside its folder" in reason and not (tmp_path / "outside.txt").exists()


def test_a_nested_sites_kit_is_named_by_its_own_name(tmp_path):
    kit = tmp_path / "kit"
    (kit / "startup").mkdir(parents=True)
    (kit / "startup" / "fed_client.json").write_text(json.dumps({"client": {"fqsn": "region-1.hospital-a"}}))
    assert kit_site_name(kit) == "hospital-a"
    job = tmp_path / "job"
    shutil.copytree(JOB, job)
    (job / "meta.json").write_text(json.dumps({**json.loads((JOB / "meta.json").read_text()), "deploy_map": {"app": ["@all"]}}))
    assert site_app(job, "hospital-a")[0] == job / "app"  # FLARE reads @ALL in any case


def test_the_deployer_refuses_before_anything_is_written(kit, tmp_path):
    from nvflare.apis.workspace import Workspace

    workspace = Workspace(root_dir=str(kit), site_name=SITE)
    data, meta = zipped_app(JOB)
    reason = ApprovedJobsDeployer().deploy(workspace, "job-1", meta, "app", data, fl_ctx=None)
    assert "approved no job yet" in reason
    assert not (kit / "job-1").exists()
    with pytest.raises(ValueError, match="approvals_file must name a file"):
        ApprovedJobsDeployer(approvals_file="")


def test_the_commands_approve_list_and_revoke(kit, capsys):
    assert fedanchor_main(["job", "approvals", "--kit", str(kit)]) == 0
    assert "this site refuses every job" in capsys.readouterr().out
    assert fedanchor_main(["job", "approve", str(JOB), "--kit", str(kit), "--by", "it@hospital-a", "--note", "ticket 7"]) == 0
    said = capsys.readouterr().out
    assert "approved 'fedanchor-hospitals-motion'" in said and "rounds=2" in said and "train.lr=0.005" in said
    assert fedanchor_main(["job", "approvals", "--kit", str(kit)]) == 0
    listed = capsys.readouterr().out
    assert "fedanchor-hospitals-motion" in listed and "(ticket 7)" in listed
    digest = listed.split()[0]
    assert fedanchor_main(["job", "digest", str(JOB), "--site", SITE]) == 0  # the coordinator's copy: the same digest
    assert capsys.readouterr().out.split()[0].startswith(digest)
    assert fedanchor_main(["job", "revoke", digest, "--kit", str(kit)]) == 0
    assert "revoked" in capsys.readouterr().out
    assert fedanchor_main(["job", "approve", str(JOB), "--kit", str(kit / "nowhere"), "--by", "x"]) == 2
    assert "not a startup kit" in capsys.readouterr().err
