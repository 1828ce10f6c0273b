"""The provisioned path on 127.0.0.1: mutual TLS, roles, sites that refuse custom code, the whole cycle as the lead.

One deployment (server + hospital-a, -b, -c, provisioned from provision/project-loopback.yml on a free port,
with provision/site and provision/server installed) serves every test of this module; the last test runs the
whole cycle and shuts it down. Each FLARE process runs in its own session under pytest's tmp_path with its own
HOME; the fixture stops exactly the processes the deployment started (they carry its marker), whatever happens.
"""
from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import changed_job
from fedanchor.deploy import admin_api
from fedanchor.deploy.loopback import LoopbackDeployment, connected_sites
from fedanchor.deploy.processes import MARKER
from fedanchor.flare import jobs

pytestmark = [pytest.mark.deployment,
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="finding a deployment's processes reads Linux /proc")]

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "hospitals-motion"  # tiny trunk, motion recordings dealt to hospital-a/-b/-c, 2 rounds
SITES = ["hospital-a", "hospital-b", "hospital-c"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    started = time.monotonic()
    d = LoopbackDeployment(tmp_path_factory.mktemp("loopback"), echo=print)
    try:
        d.provision()
        d.start(timeout=180)
        d.approve(JOB)  # each hospital's admin admits the job the tests submit (flare/approval.py)
        print(f"deployment up in {time.monotonic() - started:.0f}s")
        yield d
    finally:
        d.kill()
        assert not d.alive(), "processes of the deployment survived the clean-up"


def test_an_org_admin_cannot_submit(deployment):
    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    session = deployment.session("org_admin")
    try:
        with pytest.raises(AuthorizationError, match="not authorized for 'submit_job'"):
            admin_api.submit(session, JOB)
        user, _ = deployment.kits.admin("org_admin")
        listed = session.list_jobs(detailed=True)
        assert all("submitter_name" in j for j in listed)
        assert not [j for j in listed if j["submitter_name"] == user]  # nothing was queued
    finally:
        session.close()


def test_a_site_refuses_a_job_that_carries_custom_code(deployment, tmp_path):
    byoc = jobs.export_byoc(JOB, tmp_path / "hospitals-motion-byoc")
    deployment.approve(byoc)  # approval admits a job; it does not lift the sites' ban on custom code
    session = deployment.session("lead")  # the server lets a lead submit custom code; the hospitals do not
    try:
        meta = admin_api.watch(session, admin_api.submit(session, byoc), echo=print, timeout=120)
    finally:
        session.close()
    assert meta["status"] == "FINISHED:FAILED_TO_RUN"
    detail = meta["job_deploy_detail"]
    for site in SITES:
        assert f"{site}: NVFLARE_ERROR: BYOC not permitted" in detail, detail


def test_sites_refuse_a_job_they_did_not_approve_and_say_what_changed(deployment, tmp_path):
    """The hospitals approved JOB as it is; the same job with more rounds and another learning rate is refused by
    every site before anything runs, and the submitter reads why in the job's deploy detail."""
    changed = changed_job(JOB, tmp_path / "changed", {"rounds": 5, "train.lr": 0.05})
    session = deployment.session("lead")
    try:
        meta = admin_api.watch(session, admin_api.submit(session, changed), echo=print, timeout=120)
    finally:
        session.close()
    assert meta["status"] == "FINISHED:FAILED_TO_RUN", meta
    detail = str(meta["job_deploy_detail"])
    for site in SITES:
        assert f"{site}: NVFLARE_ERROR: {site} has not approved this job" in detail, detail
    assert "rounds 2 -> 5" in detail and "train.lr 0.005 -> 0.05" in detail and "fedanchor job approve" in detail
    for site in SITES:
        assert "refused job" in deployment.log_of(deployment.kits.kit(site)), site


def tls_probe(port: int, ca: Path, kit: Path) -> bytes | None:
    """What the server answers an HTTP request over TLS with ``kit``'s certificate (None: the connection was refused)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(kit / "startup/client.crt"), str(kit / "startup/client.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                return conn.recv(64) or None  # TLS 1.3: a refused client certificate shows as a closed connection
        except (ssl.SSLError, ConnectionError):
            return None


def test_a_kit_from_another_root_ca_cannot_join(deployment):
    ours = deployment.kits
    foreign = deployment.provision(extra_sites=["hospital-d"], folder="foreign")  # same project, another root CA
    our_ca = ours.kit("hospital-a") / "startup/rootCA.pem"
    assert (foreign.kit("hospital-d") / "startup/rootCA.pem").read_bytes() != our_ca.read_bytes()

    # the server: our site's certificate gets an answer; the other CA's is refused even by a client that trusts our CA
    assert (tls_probe(deployment.port, our_ca, ours.kit("hospital-a")) or b"").startswith(b"HTTP/1.1")
    assert tls_probe(deployment.port, our_ca, foreign.kit("hospital-d")) is None

    # the site itself, started as it would be: it refuses the server's certificate and never registers
    intruder = deployment.start_kit("foreign hospital-d", foreign.kit("hospital-d"))
    try:
        deadline = time.monotonic() + 90
        while "CERTIFICATE_VERIFY_FAILED" not in deployment.log_of(foreign.kit("hospital-d")):
            assert intruder.running and time.monotonic() < deadline, "the foreign site neither failed TLS nor ran"
            time.sleep(1)
        session = deployment.session("project_admin")
        try:
            assert sorted(connected_sites(session)) == SITES
        finally:
            session.close()
    finally:
        deployment.stop_kit(intruder)
    assert not intruder.running


def admin_env(deployment: LoopbackDeployment) -> dict[str, str]:
    """The admin's own environment: not marked as one of the deployment's processes."""
    env = dict(deployment.env)
    env.pop(MARKER)
    return env


def test_a_job_on_the_consortiums_own_pack_runs_on_the_hospitals_folders(deployment, tmp_path):
    """The worked example of docs/PACKS.md in the deployment: a pack of modalities fedanchor does not bundle, a job
    made by `fedanchor job new`, each hospital's data folder named in its local/fedanchor_site.json."""
    from fedanchor.cli import main as fedanchor_main

    subprocess.run([sys.executable, str(ROOT / "docs/examples/make_pack.py"), str(tmp_path)], check=True, capture_output=True)
    sites = {"hospital-a": "ecg", "hospital-b": "labs", "hospital-c": "ecg"}
    assert fedanchor_main(["job", "new", "--pack", str(tmp_path / "pack"), *[f"--site={s}={m}" for s, m in sites.items()],
                           "--out", str(tmp_path / "job"), "--rounds", "1", "--trunk", "tiny", "--set", "train.local_steps=8",
                           "--set", "train.batch_size=8", "--set", "alignment.readout_repeats=1"]) == 0
    deployment.approve(tmp_path / "job")
    site_files = [deployment.kits.kit(site) / "local" / "fedanchor_site.json" for site in SITES]
    for path in site_files:
        path.write_text(json.dumps({"data": {"source": "folder", "path": str(tmp_path / "sites" / "{site}")}}))
    session = deployment.session("lead")
    try:
        job_id = admin_api.submit(session, tmp_path / "job")
        meta = admin_api.watch(session, job_id, echo=print, timeout=300)
        folder = admin_api.download(session, job_id)
    finally:
        session.close()
        for path in site_files:  # the other tests' jobs train on the bundled shards
            path.unlink()
    assert meta["status"] == "FINISHED:COMPLETED", meta
    summary = admin_api.read_result(folder).summary
    assert summary["rounds"][0]["accepted"] == SITES
    assert summary["evaluated_on"] == "the pack's 60 public validation pairs"
    assert {"ecg->labs/recall@10", "labs->ecg/recall@10"} <= set(summary["final_eval"])


def test_the_whole_cycle_as_lead_with_the_admin_command(deployment, tmp_path, capfd):
    """Submit as the lead with admin/fedanchor_admin.py, COMPLETED, download, load the model, metrics, shutdown."""
    user, lead_kit = deployment.kits.admin("lead")
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "admin/fedanchor_admin.py"), "--kit", str(lead_kit),
                           "--timeout", "400", "run", str(JOB)],
                          capture_output=True, text=True, timeout=600, env=admin_env(deployment))
    print(done.stdout[-4000:], done.stderr[-4000:])
    assert done.returncode == 0
    assert "FINISHED:COMPLETED" in done.stdout and "final global model" in done.stdout
    assert not list(JOB.rglob(".__nvfl_*")), "submitting must not sign the job folder in the checkout"
    job_id = done.stdout.split("as job ", 1)[1].split()[0]
    folder = Path(done.stdout.split("result in ", 1)[1].splitlines()[0])
    print(f"job {job_id} submitted, run and downloaded in {time.monotonic() - started:.0f}s")

    result = admin_api.read_result(folder)
    assert result.folder.is_relative_to(lead_kit / "transfer")  # where a download lands by default
    summary = result.summary
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for record in summary["rounds"]:
        assert record["accepted"] == SITES and record["rejected"] == {}, record
    assert {"accel->gyro/recall@1", "gyro->accel/recall@1"} <= set(summary["final_eval"])

    # the model loads and scores what the server recorded
    from fedanchor.config import config_from_dict
    from fedanchor.federation.loop import make_split
    from fedanchor.federation.server import FederatedServer
    from fedanchor.flare.persistor import LAST_FILE, load_state

    last = load_state(result.checkpoints / LAST_FILE)
    assert last.round == 2 and (result.checkpoints / "best.safetensors").is_file()
    config = config_from_dict(summary["config"])
    split = make_split(config)
    server = FederatedServer(config, {m: d.spec for m, d in split.anchors.items()}, split.anchors, split.anchor_fingerprint,
                             split.feature_stats, split.test, device="cpu")
    server.resume(last)
    assert server.evaluate(last)["accel->gyro/recall@1"] == pytest.approx(summary["final_eval"]["accel->gyro/recall@1"])

    # each hospital's release filter saw (and passed) its train result every round; the job store is in the workspace
    for site in SITES:
        log = deployment.log_of(deployment.kits.kit(site) / job_id)
        assert log.count("fedanchor release filter passed the train result") == 2, site
    assert (deployment.kits.kit(deployment.kits.server) / "jobs-storage" / job_id).is_dir()

    # shutdown as the project admin leaves no process behind, and says nothing of the server being gone
    capfd.readouterr()
    assert deployment.shutdown(timeout=90) == []
    assert not deployment.alive()
    said = capfd.readouterr()
    for noise in ("Connecting to FLARE", "no connection to server", "target_unreachable"):
        assert noise not in said.out + said.err, said
