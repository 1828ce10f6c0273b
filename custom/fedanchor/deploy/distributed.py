"""Distributed provisioning (FLARE 2.9): every participant makes its own private key; the project admin only signs.

Central provisioning (``nvflare provision``, kits.py) writes every participant's private key on the project
admin's machine. Here each participant works in a folder of its own, which stands for its own machine:

    ROOT/project-admin/   project.yml, project_profile.yaml, ca/ (the root CA and its key: keep offline),
                          inbox/ (request zips received), outbox/ (signed zips sent back), the project admin's
                          own admin kit (request/, workspace/)
    ROOT/<participant>/   participant.yaml, request/ (its private key, CSR, request zip), the signed zip it got
                          back, workspace/<project>/prod_00/<participant>/ (its startup kit)

and the cycle is, by who runs it:

    project admin  nvflare cert init --profile project_profile.yaml -o ca               (once)
    participant    nvflare cert request -p participant.yaml --out request              -> request zip, sent out
    project admin  nvflare cert approve REQUEST_ZIP -c ca --profile project_profile.yaml -> signed zip, sent back
    participant    nvflare package SIGNED_ZIP --request-dir request -w workspace --fingerprint FP

Only the two zips travel (``transfer`` copies them between folders); the root CA fingerprint FP reaches each
participant out of band. FLARE's ``cert approve`` issues user certificates for org_admin, lead and member only:
the project admin's own project_admin certificate is issued by the project admin, who holds the CA, for the key
their own request made (``project_admin_grant_role``).

    python -m fedanchor.deploy.distributed participant hospital-a [--project provision/project.yml] [--out FILE]

writes a hospital's participant definition from the project file, for ``nvflare cert request -p FILE``;
``grant-project-admin KIT --ca CA_DIR`` is the project admin's last step for their own kit.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import yaml

from .kits import Kits, install_local_files, provision_dir, read_project, server_of, with_port

if TYPE_CHECKING:
    from .loopback import LoopbackDeployment

Echo = Callable[[str], Any]
PROJECT_ADMIN_FOLDER = "project-admin"
PROJECT_ADMIN_ROLE = "project_admin"
# `nvflare cert request` accepts the user roles org_admin, lead and member only: the project admin asks for org_admin,
# then upgrades their own certificate with the CA they hold (project_admin_grant_role).
REQUESTED_ROLE = {PROJECT_ADMIN_ROLE: "org_admin"}
DEFAULT_SCHEME = "http"  # FLARE's StaticFileBuilder default
QUIETENED_BY_FLARE_CLI = ("nvflare.fuel.f3.sfm.conn_manager", "nvflare.fuel.f3.cellnet")


# -- what the files say ------------------------------------------------------------------------------------
def project_profile(project: dict[str, Any]) -> dict[str, Any]:
    """The project admin's project_profile.yaml: project name, transport, connection security, the server endpoint.

    ``nvflare cert approve`` signs these into every signed zip, so a hospital's kit dials what the project admin
    approved, not what a request asked for.
    """
    server = server_of(project)
    static_files = [b for b in project.get("builders") or [] if str(b.get("path", "")).endswith("StaticFileBuilder")]
    scheme = ((static_files[0].get("args") or {}).get("scheme") if static_files else None) or DEFAULT_SCHEME
    endpoint = {"host": server["name"], "fed_learn_port": int(server.get("fed_learn_port", 8002))}
    if server.get("admin_port"):
        endpoint["admin_port"] = int(server["admin_port"])
    return {"name": project["name"], "scheme": scheme,
            "connection_security": server.get("connection_security", "mtls"), "server": endpoint}


def participant_definition(project: dict[str, Any], name: str) -> dict[str, Any]:
    """The one-participant file ``nvflare cert request -p`` takes, cut from the project file."""
    matches = [p for p in project["participants"] if p.get("name") == name]
    if not matches:
        known = ", ".join(p.get("name", "?") for p in project["participants"])
        raise KeyError(f"{name!r} is not a participant of project {project['name']!r}; participants: {known}")
    participant = dict(matches[0])
    if participant.get("type") == "admin":
        participant["role"] = REQUESTED_ROLE.get(participant.get("role"), participant.get("role"))
    return {"name": project["name"], "description": f"{name}, participant of {project['name']}",
            "participants": [participant]}


# -- running FLARE's commands on one "machine" -------------------------------------------------------------
@contextlib.contextmanager
def on_machine(folder: Path) -> Iterator[None]:
    """Run as the machine ``folder`` stands for: its own HOME (FLARE keeps its cert audit records under ~/.nvflare)
    and working directory, everything restored afterwards."""
    home = folder / "home"
    home.mkdir(parents=True, exist_ok=True)
    saved_home, saved_cwd, saved_argv, saved_path = os.environ.get("HOME"), os.getcwd(), sys.argv, list(sys.path)
    os.environ["HOME"] = str(home)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.argv, sys.path[:] = saved_argv, saved_path
        if saved_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved_home


def nvflare(args: Sequence[str], folder: Path) -> dict[str, Any]:
    """``nvflare --format json ARGS`` run in ``folder`` as that machine; returns the command's data.

    FLARE's own command line (the same parser and handlers as the nvflare script) runs in this process: a fresh
    interpreter per command costs about 0.6 s of imports, 20 commands a federation, several times that on a
    loaded 2-core machine.
    """
    from nvflare.cli import run
    from nvflare.tool.cli_output import set_output_format

    command = ["--format", "json", *map(str, args)]
    out, err, code = io.StringIO(), io.StringIO(), 0
    # the CLI quietens FLARE's connection loggers for its own process; this process keeps its settings
    loggers = {name: logging.getLogger(name).level for name in QUIETENED_BY_FLARE_CLI}
    with on_machine(folder), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = ["nvflare", *command]
        try:
            run("nvflare")
        except SystemExit as stop:  # FLARE ends every command with sys.exit
            code = stop.code if isinstance(stop.code, int) else 1
        finally:
            set_output_format("txt")  # process-wide in FLARE; leave it as a plain nvflare run would find it
            for name, level in loggers.items():
                logging.getLogger(name).setLevel(level)
    replies = [line for line in out.getvalue().splitlines() if line.startswith("{")]
    try:
        reply = json.loads(replies[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"nvflare {' '.join(command[2:])} gave no JSON reply (exit {code}):\n"
                           f"{out.getvalue()}\n{err.getvalue()}") from None
    if reply.get("status") != "ok" or code:
        raise RuntimeError(f"nvflare {' '.join(command[2:])} failed: {reply.get('error_code')}: "
                           f"{reply.get('message')} ({reply.get('hint')})")
    return reply["data"]


def transfer(file: Path, to_folder: Path) -> Path:
    """Hand a file to another machine (in real life: e-mail, a file share, a USB stick). Only zips travel."""
    to_folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(file, to_folder / file.name))


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- the project admin's steps -----------------------------------------------------------------------------
def project_admin_init(admin_dir: Path, project_file: Path) -> str:
    """Write project_profile.yaml and create the root CA in ``admin_dir``/ca; returns its SHA256 fingerprint,
    the one value every participant must get out of band (phone, signed letter), never with the signed zip."""
    project = read_project(project_file)
    profile = write_yaml(admin_dir / "project_profile.yaml", project_profile(project))
    # no --org: FLARE 2.9's `cert approve` names the issuer by its CN alone, so a root CA with an O in its subject
    # would not be found as the issuer of the certificates it signs (every kit fails its chain check at start)
    created = nvflare(["cert", "init", "--profile", profile, "-o", admin_dir / "ca"], admin_dir)
    return created["rootca_fingerprint_sha256"]


def project_admin_approve(admin_dir: Path, request_zip: Path) -> Path:
    """Sign a request zip that arrived in ``admin_dir``/inbox; returns the signed zip in ``admin_dir``/outbox."""
    name = request_zip.name.removesuffix(".request.zip")
    approved = nvflare(["cert", "approve", request_zip, "-c", admin_dir / "ca", "--profile",
                        admin_dir / "project_profile.yaml", "--out", admin_dir / "outbox" / f"{name}.signed.zip"],
                       admin_dir)
    return Path(approved["signed_zip"])


def project_admin_grant_role(ca_dir: Path, kit: Path, role: str = PROJECT_ADMIN_ROLE) -> None:
    """Re-issue the admin certificate in ``kit`` with ``role``, for the same key, signed by the root CA in ``ca_dir``.

    Only the CA's holder can do this: the project admin, for their own kit. The server takes a user's role from
    the certificate, which chains to the same root CA as before.
    """
    from cryptography.x509.oid import ExtensionOID, NameOID
    from nvflare.lighter.utils import (Identity, generate_cert, load_crt, load_private_key_file, serialize_cert,
                                       verify_cert_chain)

    cert_path, ca_dir = kit / "startup" / "client.crt", Path(ca_dir)
    if not (ca_dir / "rootCA.key").is_file():
        raise FileNotFoundError(f"{ca_dir} holds no rootCA.key; pass the folder `nvflare cert init -o` wrote")
    if not cert_path.is_file() or not (kit / "startup" / "fed_admin.json").is_file():
        raise FileNotFoundError(f"{kit} is not an admin startup kit (no startup/client.crt and fed_admin.json)")
    approved, ca_cert = load_crt(str(cert_path)), load_crt(str(ca_dir / "rootCA.pem"))

    def subject(cert, oid):
        values = cert.subject.get_attributes_for_oid(oid)
        return values[0].value if values else None

    # keep what `cert approve` put in (key usage, client authentication); generate_cert adds the key identifiers
    reserved = {ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
                ExtensionOID.SUBJECT_ALTERNATIVE_NAME}
    granted = generate_cert(
        subject=Identity(subject(approved, NameOID.COMMON_NAME), subject(approved, NameOID.ORGANIZATION_NAME), role),
        issuer=Identity(subject(ca_cert, NameOID.COMMON_NAME), subject(ca_cert, NameOID.ORGANIZATION_NAME)),
        signing_pri_key=load_private_key_file(str(ca_dir / "rootCA.key")),
        subject_pub_key=approved.public_key(),
        not_valid_before=datetime.datetime.now(datetime.timezone.utc),
        not_valid_after=approved.not_valid_after_utc,
        extra_extensions=[(e.value, e.critical) for e in approved.extensions if e.oid not in reserved])
    verify_cert_chain(granted, [], ca_cert)  # what the server checks at login; fail here, not there
    cert_path.write_bytes(serialize_cert(granted))


# -- a participant's steps (a hospital, the server's operator, a user) --------------------------------------
def participant_request(folder: Path, definition: dict[str, Any]) -> Path:
    """Make the participant's key and CSR in ``folder``/request; returns the request zip (CSR and identity only)."""
    path = write_yaml(folder / "participant.yaml", definition)
    return Path(nvflare(["cert", "request", "-p", path, "--out", folder / "request"], folder)["request_zip"])


def participant_package(folder: Path, signed_zip: Path, fingerprint: str) -> Path:
    """Build the startup kit from the signed zip and the key that never left ``folder``/request; returns the kit.

    ``fingerprint`` is the root CA fingerprint the project admin gave out of band: packaging fails if the root CA
    in the signed zip is another one.
    """
    packaged = nvflare(["package", signed_zip, "--request-dir", folder / "request", "-w", folder / "workspace",
                        "--fingerprint", fingerprint], folder)
    return Path(packaged["output_dir"])


# -- the whole cycle ---------------------------------------------------------------------------------------
@dataclass
class DistributedKits(Kits):
    """Kits each packaged on its participant's own machine: ``kit(name)`` looks the kit up instead of root/name."""

    kit_dirs: dict[str, Path] = field(default_factory=dict)
    machines: dict[str, Path] = field(default_factory=dict)  # participant -> the folder standing for its machine
    project_admin_dir: Path | None = None
    fingerprint: str = ""  # the root CA's SHA256 fingerprint
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def kit(self, name: str) -> Path:
        path = self.kit_dirs.get(name)
        if path is None or not (path / "startup").is_dir():
            raise FileNotFoundError(f"no startup kit for {name!r}; packaged: {sorted(self.kit_dirs)}")
        return path


def provision(project_file: str | Path, root: str | Path, echo: Echo = lambda line: None) -> DistributedKits:
    """Run the whole cycle for every participant of ``project_file`` under ``root`` (an empty or absent folder)."""
    root = Path(root).resolve()
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; distributed provisioning needs a folder of its own")
    project = read_project(project_file)
    people = project["participants"]
    names = [p["name"] for p in people]
    if PROJECT_ADMIN_FOLDER in names:
        raise ValueError(f"a participant is named {PROJECT_ADMIN_FOLDER!r}, the project admin's folder; rename it")
    admins = [p["name"] for p in people if p.get("role") == PROJECT_ADMIN_ROLE]
    if len(admins) > 1:
        raise ValueError(f"the project names {len(admins)} project admins ({', '.join(admins)}); FLARE allows one")
    admin_dir = root / PROJECT_ADMIN_FOLDER
    admin_dir.mkdir(parents=True)
    # the project admin's own admin kit is made on the project admin's machine; everyone else has their own
    machines = {name: admin_dir if name in admins else root / name for name in names}
    seconds: dict[str, float] = {}

    def stage(label: str, started: float) -> None:
        seconds[label] = time.monotonic() - started
        echo(f"{label}: {seconds[label]:.1f}s")

    started = time.monotonic()
    shutil.copy2(project_file, admin_dir / "project.yml")
    fingerprint = project_admin_init(admin_dir, admin_dir / "project.yml")
    stage("project admin: root CA", started)

    started = time.monotonic()
    requests = {name: participant_request(machines[name], participant_definition(project, name)) for name in names}
    stage(f"participants: {len(names)} requests", started)

    started = time.monotonic()
    signed = {name: project_admin_approve(admin_dir, transfer(request, admin_dir / "inbox"))
              for name, request in requests.items()}
    stage(f"project admin: {len(names)} approvals", started)

    started = time.monotonic()
    kit_dirs = {name: participant_package(machines[name], transfer(zip_file, machines[name]), fingerprint)
                for name, zip_file in signed.items()}
    for name in admins:
        project_admin_grant_role(admin_dir / "ca", kit_dirs[name])
    stage(f"participants: {len(names)} kits packaged", started)

    return DistributedKits(
        root=root, server=server_of(project)["name"],
        sites=[p["name"] for p in people if p.get("type") == "client"],
        admins={p["name"]: p.get("role", "") for p in people if p.get("type") == "admin"},
        kit_dirs=kit_dirs, machines=machines, project_admin_dir=admin_dir, fingerprint=fingerprint,
        stage_seconds=seconds)


def provision_distributed(deployment: "LoopbackDeployment", folder: str = "provision") -> DistributedKits:
    """What ``LoopbackDeployment.provision`` does, by distributed provisioning: project-loopback.yml on the
    deployment's port, every kit packaged in its own folder, the server's and the sites' local files installed.
    Sets ``deployment.kits``; start(), session() and shutdown() then work unchanged."""
    project_file = with_port(deployment.provision_folder / "project-loopback.yml",
                             deployment.workdir / f"{folder}-project.yml", deployment.port)
    kits = provision(project_file, deployment.workdir / folder, echo=deployment.echo)
    install_local_files(kits.kit(kits.server), deployment.provision_folder / "server")
    for site in kits.sites:
        install_local_files(kits.kit(site), deployment.provision_folder / "site")
    deployment.kits = kits
    return kits


# -- a hospital's helper -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedanchor.deploy.distributed",
                                     description="Distributed provisioning helpers for a fedanchor participant.")
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("participant", help="write NAME's participant definition for `nvflare cert request -p`")
    write.add_argument("name", help="the participant's name in the project file, e.g. hospital-a")
    write.add_argument("--project", default=None,
                       help="the project file (default: the checkout's provision/project.yml)")
    write.add_argument("--out", default=None, help="where to write it (default: NAME.yaml)")
    grant = sub.add_parser("grant-project-admin",
                           help="(project admin) re-issue your own packaged admin kit's certificate as project_admin")
    grant.add_argument("kit", help="your admin kit, packaged from your org_admin request")
    grant.add_argument("--ca", required=True, help="the root CA folder `nvflare cert init -o` wrote")
    args = parser.parse_args(argv)
    try:
        if args.command == "grant-project-admin":
            project_admin_grant_role(Path(args.ca), Path(args.kit))
            print(f"{args.kit}/startup/client.crt now carries the role {PROJECT_ADMIN_ROLE}")
            return 0
        project_file = Path(args.project) if args.project else provision_dir() / "project.yml"
        if not project_file.is_file():
            raise FileNotFoundError(f"no project file at {project_file}; pass --project")
        definition = participant_definition(read_project(project_file), args.name)
        out = write_yaml(Path(args.out or f"{args.name}.yaml"), definition)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"distributed: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    print(f"wrote {out}; next: nvflare cert request -p {out} --out {args.name}-request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
