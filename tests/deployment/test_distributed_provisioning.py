"""Distributed provisioning on 127.0.0.1, end to end: every participant makes its own key, the project admin only signs.

The project admin creates the root CA; the server's operator, hospital-a/-b/-c and the admin users each make a key
and a request zip in their own folder (their "machine"); the project admin approves each request; each participant
packages its kit from the signed zip and its own key (fedanchor/deploy/distributed.py). Then the federation runs
jobs/hospitals-motion as the lead, to FINISHED:COMPLETED, and shuts down. The point of the exercise is checked by
reading every file the cycle wrote, zips included: each private key is only in its owner's folder.
About 85 s on a busy 2-core machine (provisioning itself about 6 s).
"""
from __future__ import annotations

import hashlib
import re
import time
import zipfile
from pathlib import Path

import pytest

from fedanchor.deploy import admin_api
from fedanchor.deploy.distributed import participant_package, provision_distributed
from fedanchor.deploy.loopback import LoopbackDeployment

pytestmark = [pytest.mark.deployment,
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="finding a deployment's processes reads Linux /proc")]

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "hospitals-motion"  # tiny trunk, motion recordings dealt to hospital-a/-b/-c, 2 rounds
SITES = ["hospital-a", "hospital-b", "hospital-c"]
PEM_KEY = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----", re.S)
LARGEST_SCANNED = 8 << 20  # model checkpoints of the tiny job are smaller; a key file is 2 KB


def public_key_id(key) -> str:
    from cryptography.hazmat.primitives import serialization

    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def private_keys(folder: Path) -> tuple[dict[str, set[str]], int]:
    """Every private key written under ``folder``, files and zip members alike: {public key id: {where}}, and how
    many zips were opened."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    found: dict[str, set[str]] = {}
    zips = 0

    def scan(data: bytes, where: str) -> None:
        for match in PEM_KEY.finditer(data):
            found.setdefault(public_key_id(load_pem_private_key(match.group(0), password=None)), set()).add(where)

    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        if path.stat().st_size > LARGEST_SCANNED:
            continue
        if zipfile.is_zipfile(path):
            zips += 1
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    scan(archive.read(member), f"{path}!{member}")
        else:
            scan(path.read_bytes(), str(path))
    return found, zips


def key_of(kit: Path) -> str:
    from nvflare.lighter.utils import load_private_key_file

    key = next(p for p in (kit / "startup/server.key", kit / "startup/client.key") if p.is_file())
    return public_key_id(load_private_key_file(str(key)))


def assert_keys_stay_home(kits, workdir: Path) -> None:
    """Each participant's private key is only in its own folder; no zip holds a key; the project admin's folder holds
    the root CA's key and the project admin's own, nobody else's."""
    from nvflare.lighter.utils import load_private_key_file

    admin_dir = kits.project_admin_dir
    owners = {key_of(kits.kit(name)): name for name in kits.machines}
    assert len(owners) == len(kits.machines) == 7, "every participant has a key of its own"
    ca_key = public_key_id(load_private_key_file(str(admin_dir / "ca/rootCA.key")))

    found, zips = private_keys(workdir)
    assert zips >= 4 * len(kits.machines), f"expected request and signed zips on both sides, opened {zips}"
    assert set(found) == set(owners) | {ca_key}, "a private key nobody owns was written"
    for key, places in found.items():
        assert not [p for p in places if "!" in p], f"a zip carries a private key: {places}"
        home = admin_dir if key == ca_key else kits.machines[owners[key]]
        strays = [p for p in places if not Path(p).is_relative_to(home)]
        assert not strays, f"the key of {owners.get(key, 'the root CA')} left {home}: {strays}"
    in_admin_dir = {owners.get(k, "root CA") for k, places in found.items()
                    if any(Path(p).is_relative_to(admin_dir) for p in places)}
    project_admin, _ = kits.admin("project_admin")
    assert in_admin_dir == {"root CA", project_admin}, in_admin_dir


def test_distributed_provisioning_then_the_whole_cycle_as_lead(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    from nvflare.lighter.utils import load_crt, verify_cert_chain

    wall: dict[str, float] = {}
    started = time.monotonic()
    with LoopbackDeployment(tmp_path / "loopback", echo=print) as deployment:
        try:
            kits = provision_distributed(deployment)
            wall.update(kits.stage_seconds)

            # the kits: one root CA, the fingerprint the project admin gives out of band, roles as in the project file
            roots = {(kits.kit(name) / "startup/rootCA.pem").read_bytes() for name in kits.machines}
            assert len(roots) == 1
            root_ca = x509.load_pem_x509_certificate(roots.pop())
            for name in kits.machines:  # what FLARE checks at start: the kit's certificate chains to the root CA
                startup = kits.kit(name) / "startup"
                verify_cert_chain(load_crt(str(next(startup.glob("*.crt")))), [], root_ca)
            fingerprint = kits.fingerprint.removeprefix("SHA256:").replace(":", "").lower()
            assert fingerprint == root_ca.fingerprint(hashes.SHA256()).hex()
            assert not (kits.kit(kits.server) / "startup/signature.json").exists()  # trust is the certificates alone
            assert kits.admins == {"admin@coordinator.example.org": "project_admin",
                                   "lead@hospital-a.example.org": "lead", "it@hospital-b.example.org": "org_admin"}
            for user, role in kits.admins.items():  # the role the server reads from the user's certificate
                cert = load_crt(str(kits.kit(user) / "startup/client.crt"))
                assert cert.subject.get_attributes_for_oid(NameOID.UNSTRUCTURED_NAME)[0].value == role
            for site in SITES:
                assert (kits.kit(site) / "local/privacy.json").is_file()
            assert str(kits.kit(kits.server)) in (kits.kit(kits.server) / "local/resources.json").read_text()

            # the point of the exercise
            assert_keys_stay_home(kits, deployment.workdir)

            # a hospital handed a signed zip with another root CA (or a fingerprint it did not get from the project
            # admin) refuses to package it
            hospital = kits.machines["hospital-a"]
            with pytest.raises(RuntimeError, match="ROOTCA_FINGERPRINT_MISMATCH"):
                participant_package(hospital, hospital / "hospital-a.signed.zip", "SHA256:" + ":".join(["AB"] * 32))

            step = time.monotonic()
            deployment.start(timeout=180)
            wall["start server + 3 hospitals"] = time.monotonic() - step
            deployment.approve(JOB)  # sites admit only the jobs their admin approved

            step = time.monotonic()
            session = deployment.session("lead")
            try:
                job_id = admin_api.submit(session, JOB)
                meta = admin_api.watch(session, job_id, echo=print, timeout=300)
                folder = admin_api.download(session, job_id)
            finally:
                session.close()
            wall["job as lead (submit to download)"] = time.monotonic() - step
            assert meta["status"] == "FINISHED:COMPLETED", meta
            assert meta["submitter_name"] == "lead@hospital-a.example.org"
            summary = admin_api.read_result(folder).summary
            assert [r["round"] for r in summary["rounds"]] == [0, 1]
            for record in summary["rounds"]:
                assert record["accepted"] == SITES and record["rejected"] == {}, record
            assert folder.is_relative_to(kits.machines["lead@hospital-a.example.org"])  # landed on the lead's machine

            step = time.monotonic()
            assert deployment.shutdown(timeout=90) == []  # `shutdown all` as the project admin, role self-issued
            wall["shutdown all"] = time.monotonic() - step
            assert not deployment.alive()

            # running the federation copied no key anywhere either (logs, job store, the lead's download)
            assert_keys_stay_home(kits, deployment.workdir)
        finally:
            wall["total"] = time.monotonic() - started
            print("\nwall time per stage")
            for stage, seconds in wall.items():
                print(f"  {stage:38s} {seconds:6.1f} s")
    assert not deployment.alive(), "processes of the deployment survived the clean-up"
