"""provision/: the project files provision, and the files a hospital (or the server) drops into its kit's local/."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from fedanchor.deploy import kits
from fedanchor.flare import jobs

ROOT = Path(__file__).resolve().parents[2]
PROVISION = ROOT / "provision"
JOB_DIRS = sorted(p for p in (ROOT / "jobs").iterdir() if (p / "meta.json").is_file())


def component_paths(node) -> set[str]:
    """Every "path" (a class) named anywhere in a FLARE config."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("path"), str):
            found.add(node["path"])
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            found |= component_paths(child)
    return found


def flare_classes(config_name: str) -> set[str]:
    return {p for job in JOB_DIRS for p in component_paths(json.loads((job / "app/config" / config_name).read_text()))
            if p.startswith("nvflare.")}


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    """provision/project-loopback.yml through the real `nvflare provision` (about a second)."""
    out = tmp_path_factory.mktemp("provisioned")
    return kits.provision(kits.with_port(PROVISION / "project-loopback.yml", out / "project.yml", 18002), out)


@pytest.mark.parametrize("name", ["project.yml", "project-loopback.yml"])
def test_projects_have_the_three_hospitals_the_three_roles_and_mutual_tls(name, tmp_path):
    project = kits.read_project(PROVISION / name)
    server = kits.server_of(project)
    assert server.get("connection_security") == "mtls"
    sites = [p["name"] for p in project["participants"] if p["type"] == "client"]
    assert sites == list(jobs.job_sites(jobs.read_job_config(ROOT / "jobs/xray")))  # the hospitals the jobs name
    assert sorted(p["role"] for p in project["participants"] if p["type"] == "admin") == ["lead", "org_admin", "project_admin"]
    provisioned = kits.provision(PROVISION / name, tmp_path)
    assert sorted(p.name for p in provisioned.root.iterdir()) == sorted(
        [server["name"], *sites, *provisioned.admins])
    fed_client = json.loads((provisioned.kit("hospital-a") / "startup/fed_client.json").read_text())
    assert fed_client["client"]["connection_security"] == "mtls"
    assert fed_client["servers"][0]["service"]["target"] == f"{server['name']}:{server['fed_learn_port']}"


def test_the_loopback_server_is_localhost_on_the_port_asked_for(provisioned):
    assert provisioned.server == "localhost"
    admin = json.loads((provisioned.admin("lead")[1] / "startup/fed_admin.json").read_text())["admin"]
    assert (admin["host"], admin["port"], admin["connection_security"]) == ("localhost", 18002, "mtls")
    with pytest.raises(ValueError, match="outside"):
        kits.with_port(PROVISION / "project-loopback.yml", Path("unused.yml"), 80)


def test_sites_refuse_custom_code_for_every_role():
    permissions = json.loads((PROVISION / "site/authorization.json").read_text())["permissions"]
    assert {"project_admin", "org_admin", "lead", "member"} <= set(permissions)
    for role, rights in permissions.items():
        assert isinstance(rights, dict) and rights.get("byoc") == "none", role
    assert permissions["lead"]["submit_job"] == "any" and permissions["org_admin"]["submit_job"] == "none"


def test_site_resources_admit_fedanchor_and_exactly_the_flare_classes_the_jobs_use(provisioned):
    ours = json.loads((PROVISION / "site/resources.json").read_text())
    assert ours["class_allow_list"] == ["fedanchor.", *sorted(flare_classes("config_fed_client.json"))]
    assert ours["class_list_enforcement_mode"] == "enforce"
    # Logs stay at the hospital: with streaming on, FLARE would also inject JobLogStreamer into every job.
    assert ours["allow_log_streaming"] is False
    default = json.loads((provisioned.kit("hospital-a") / "local/resources.json.default").read_text())
    changed = {k for k in set(ours) | set(default) if ours.get(k) != default.get(k)}
    assert changed == {"class_allow_list", "allow_log_streaming", "components"}
    # The one added component: the site deploys only the jobs its admin approved (flare/approval.py).
    assert ours["components"][0] == {"id": "app_deployer", "path": "fedanchor.flare.approval.ApprovedJobsDeployer",
                                     "args": {"approvals_file": "approved_jobs.json"}}
    assert ours["components"][1:] == default["components"], "otherwise FLARE's client defaults, unchanged"


def test_server_resources_keep_the_job_store_in_the_workspace(provisioned):
    ours = json.loads((PROVISION / "server/resources.json").read_text())
    assert ours["class_allow_list"] == ["fedanchor.", *sorted(flare_classes("config_fed_server.json"))]
    server_kit = provisioned.kit(provisioned.server)
    kits.install_local_files(server_kit, PROVISION / "server")
    installed = json.loads((server_kit / "local/resources.json").read_text())
    job_store = next(c for c in installed["components"] if c["id"] == "job_manager")["args"]["uri_root"]
    assert Path(job_store) == server_kit / "jobs-storage"
    # FLARE 2.9 restores no running job from a snapshot: crash recovery is the persistor's run key
    # (docs/it/crash-recovery.md), so the server keeps no snapshot storage
    assert "snapshot_persistor" not in installed
    assert "/tmp/nvflare" not in json.dumps(installed)


def test_privacy_scope_puts_the_output_filter_on_every_task_result():
    privacy = json.loads((PROVISION / "site/privacy.json").read_text())
    scopes = {s["name"]: s for s in privacy["scopes"]}
    assert privacy["default_scope"] == jobs.PRIVACY_SCOPE  # a job that names no scope gets it too
    filters = scopes[jobs.PRIVACY_SCOPE]["task_result_filters"]
    assert [f["path"] for f in filters] == ["fedanchor.flare.filters.SiteReleaseFilter"]
    assert "direction" not in filters[0]  # a site's result filters default to outgoing results
    module, _, name = filters[0]["path"].rpartition(".")
    getattr(importlib.import_module(module), name)(**filters[0].get("args", {}))  # it builds with these arguments
    for job in JOB_DIRS:
        assert json.loads((job / "meta.json").read_text())["scope"] == jobs.PRIVACY_SCOPE, job.name


def test_install_writes_the_site_files_and_refuses_what_is_not_a_kit(provisioned, tmp_path):
    site_kit = provisioned.kit("hospital-b")
    assert kits.main(["install", str(site_kit)]) == 0  # a client kit gets provision/site
    for name in ("authorization.json", "resources.json", "privacy.json"):
        assert (site_kit / "local" / name).read_text() == (PROVISION / "site" / name).read_text()
    assert kits.main(["install", str(tmp_path)]) == 2
    broken = tmp_path / "files"
    broken.mkdir()
    (broken / "resources.json").write_text("{not json")
    with pytest.raises(ValueError):
        kits.install_local_files(site_kit, broken)

