"""Site approval of jobs: a hospital runs only the jobs its own admin approved, exactly as approved.

A site admin approves a job folder once, on the site's machine::

    fedanchor job approve jobs/xray --kit /opt/flare/hospital-a --by "it@hospital-a"

which adds the job's digest (a sha256 over the app the site would receive: every config file, parsed, and any
custom code, plus the job's privacy scope) and its readable settings to the kit's ``local/approved_jobs.json``.
With ``ApprovedJobsDeployer`` as the site's ``app_deployer`` (provision/site/resources.json), FLARE asks it to
deploy every job; it deploys only an app whose digest is approved, and otherwise refuses with a reason FLARE puts
in the job's ``job_deploy_detail`` for the submitter: which settings differ from the closest approval (rounds,
learning rate, anchor pack, privacy settings, ...) and the command that approves it. The file is read at every
deployment: approving or revoking needs no restart.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

APPROVALS_FILE = "approved_jobs.json"
FORMAT = "fedanchor-approvals/1"
EXECUTOR_SUFFIX = "FedAnchorExecutor"
# FLARE signs a submitted app (a signature and the submitter's certificate in each folder): not part of what was
# approved. Every other file counts, compiled Python included: a .pyc runs as surely as its source.
FLARE_SIGNING_FILES = {".__nvfl_sig.json", ".__nvfl_submitter.crt"}
APPROVE_HINT = "a site admin approves a job with: fedanchor job approve JOB_FOLDER --kit SITE_KIT"
MAX_DIFFERENCES = 8
log = logging.getLogger(__name__)


class ApprovalError(ValueError):
    """The approvals file or a job folder cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class Approval:
    job: str
    digest: str
    approved_at: str
    approved_by: str
    settings: dict[str, Any] = field(default_factory=dict)
    note: str = ""


# -- what an app is ---------------------------------------------------------------------------------------------
def _app_files(app_dir: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(app_dir.rglob("*")):
        rel = path.relative_to(app_dir)
        if path.is_file() and path.name not in FLARE_SIGNING_FILES:
            yield rel.as_posix(), path


def _file_digest(path: Path) -> str:
    if path.suffix == ".json":
        try:  # a reformatted config is the same config
            text = json.dumps(json.loads(path.read_text()), sort_keys=True, separators=(",", ":"))
            return hashlib.sha256(text.encode()).hexdigest()
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return hashlib.sha256(path.read_bytes()).hexdigest()


def app_digest(app_dir: str | Path, scope: str) -> str:
    """sha256 over the app's files (JSON parsed, so formatting does not count) and the job's privacy scope."""
    app_dir = Path(app_dir)
    files = {rel: _file_digest(path) for rel, path in _app_files(app_dir)}
    if not files:
        raise ApprovalError(f"{app_dir} holds no files; give the app folder of a FLARE job (e.g. JOB/app)")
    blob = json.dumps({"files": files, "scope": scope}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def app_settings(app_dir: str | Path, scope: str) -> dict[str, Any]:
    """The settings a person reads an approval by: the fedanchor config (dotted keys), the scope, the code files."""
    app_dir = Path(app_dir)
    settings: dict[str, Any] = {"scope": scope}
    client_file = app_dir / "config" / "config_fed_client.json"
    if client_file.is_file():
        try:
            client = json.loads(client_file.read_text())
        except json.JSONDecodeError as err:
            raise ApprovalError(f"{client_file} is not valid JSON ({err}); the job folder is broken") from err
        for entry in client.get("executors", []):
            executor = entry.get("executor", {})
            if str(executor.get("path", "")).endswith(EXECUTOR_SUFFIX):
                settings.update(_flatten(executor.get("args", {}).get("config", {})))
    custom = sorted(rel for rel, _ in _app_files(app_dir) if rel.startswith("custom/"))
    if custom:
        settings["custom code files"] = len(custom)
    return settings


# -- the job folder a site admin approves ------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ApprovalError(f"{path} does not exist; {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ApprovalError(f"{path} is not valid JSON ({err}); {what}") from err


def site_app(job_dir: str | Path, site: str) -> tuple[Path, dict[str, Any]]:
    """The app folder of ``job_dir`` that FLARE deploys to ``site`` (meta.json's deploy_map), and the job's meta."""
    job_dir = Path(job_dir)
    meta = _read_json(job_dir / "meta.json", "give a FLARE job folder (it holds meta.json and the app folders)")
    deploy_map = meta.get("deploy_map") or {}
    for app, targets in deploy_map.items():
        names = [t if isinstance(t, str) else t.get("sites", []) for t in targets]
        flat = [n for group in names for n in ([group] if isinstance(group, str) else group)]
        if site in flat or "@all" in (n.casefold() for n in flat):
            if not (job_dir / app).is_dir():
                raise ApprovalError(f"{job_dir}/meta.json deploys app {app!r} to {site}, but {job_dir / app} does not exist")
            return job_dir / app, meta
    raise ApprovalError(f"{job_dir}/meta.json deploys no app to site {site!r} (deploy_map {deploy_map}); "
                        f"check the site name (--site) or the job")


# -- the approvals file ------------------------------------------------------------------------------------------
def read_approvals(path: str | Path) -> list[Approval]:
    """The approvals in ``path`` (none when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    data = _read_json(path, f"fix it or move it aside and approve the jobs again ({APPROVE_HINT})")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("approved"), list):
        raise ApprovalError(f"{path} is not a fedanchor approvals file (expected format {FORMAT!r} with an "
                            f"'approved' list); move it aside and approve the jobs again ({APPROVE_HINT})")
    try:
        return [Approval(**entry) for entry in data["approved"]]
    except TypeError as err:
        raise ApprovalError(f"{path}: an approval entry has unexpected fields ({err}); approve the job again") from err


def write_approvals(path: str | Path, approvals: list[Approval]) -> None:
    """Replace ``path`` atomically, so a deployment never reads half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "approved": [asdict(a) for a in approvals]}, indent=1) + "\n"
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def approvals_file(kit: str | Path) -> Path:
    kit = Path(kit)
    if not (kit / "startup").is_dir():
        raise ApprovalError(f"{kit} is not a startup kit (no startup/ folder); give the site's kit folder")
    return kit / "local" / APPROVALS_FILE


def kit_site_name(kit: str | Path) -> str:
    """The participant a client kit was provisioned for (startup/fed_client.json), else the folder's name."""
    config = Path(kit) / "startup" / "fed_client.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("client", {}).get("fqsn")
        if name:  # a nested site's fqsn is parent.child; FLARE's deploy_map names the child
            return str(name).split(".")[-1]
    return Path(kit).resolve().name


def job_digest(job_dir: str | Path, site: str) -> tuple[str, str, dict[str, Any]]:
    """The job's name, the digest of the app it deploys to ``site`` and that app's settings: what an approval holds."""
    app_dir, meta = site_app(job_dir, site)
    scope = str(meta.get("scope", ""))
    return str(meta.get("name", Path(job_dir).name)), app_digest(app_dir, scope), app_settings(app_dir, scope)


def approve(job_dir: str | Path, kit: str | Path, approved_by: str, note: str = "", site: str | None = None) -> Approval:
    """Add ``job_dir`` (its app for this kit's site) to the kit's approvals; an already approved digest is kept once."""
    path = approvals_file(kit)
    name, digest, settings = job_digest(job_dir, site or kit_site_name(kit))
    approval = Approval(job=name, digest=digest, settings=settings, approved_by=approved_by, note=note,
                        approved_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    kept = [a for a in read_approvals(path) if a.digest != approval.digest]
    write_approvals(path, kept + [approval])
    return approval


def revoke(kit: str | Path, digest_prefix: str) -> list[Approval]:
    """Remove the approvals whose digest starts with ``digest_prefix`` (at least 8 characters)."""
    if len(digest_prefix) < 8:
        raise ApprovalError(f"digest prefix {digest_prefix!r} is too short; give at least 8 characters")
    path = approvals_file(kit)
    approvals = read_approvals(path)
    gone = [a for a in approvals if a.digest.startswith(digest_prefix)]
    if not gone:
        raise ApprovalError(f"no approval in {path} has a digest starting with {digest_prefix!r}; "
                            f"list them with: fedanchor job approvals --kit {kit}")
    write_approvals(path, [a for a in approvals if a not in gone])
    return gone


# -- the decision ------------------------------------------------------------------------------------------------
def differences(approved: Mapping[str, Any], offered: Mapping[str, Any]) -> list[str]:
    """``key old -> new`` for every setting that differs (added and removed keys included)."""
    out = []
    for key in sorted(set(approved) | set(offered)):
        old, new = approved.get(key, "(absent)"), offered.get(key, "(absent)")
        if old != new:
            out.append(f"{key} {json.dumps(old)} -> {json.dumps(new)}")
    return out


def refusal(site: str, digest: str, settings: Mapping[str, Any], job_name: str,
            approvals: list[Approval]) -> str | None:
    """None when ``digest`` is approved; else why not, in words the submitter can act on."""
    if any(a.digest == digest for a in approvals):
        return None
    head = f"{site} has not approved this job (digest {digest[:12]})"
    if not approvals:
        return f"{head}: it has approved no job yet; {APPROVE_HINT}"
    # The closest approval: the same job name first, then the fewest differing settings.
    closest = min(approvals, key=lambda a: (a.job != job_name, len(differences(a.settings, settings))))
    changed = differences(closest.settings, settings)
    shown = "; ".join(changed[:MAX_DIFFERENCES]) + (f"; and {len(changed) - MAX_DIFFERENCES} more"
                                                    if len(changed) > MAX_DIFFERENCES else "")
    what = f"differs in {shown}" if changed else "has the same settings but other files (code or configuration)"
    return (f"{head}: the closest approved job {closest.job!r} (approved {closest.approved_at} by "
            f"{closest.approved_by}) {what}; {APPROVE_HINT}")


def check_app_data(app_data: bytes, job_meta: Mapping[str, Any], site: str, approvals_path: str | Path) -> str | None:
    """The refusal (or None) for the zipped app FLARE is about to deploy."""
    try:
        approvals = read_approvals(approvals_path)
    except ApprovalError as err:
        return f"{site} cannot read its job approvals: {err}"
    scope = str(job_meta.get("scope", ""))
    try:
        with tempfile.TemporaryDirectory() as staging:
            with zipfile.ZipFile(io.BytesIO(app_data)) as archive:
                _check_entries(archive)
                archive.extractall(staging)
            digest = app_digest(staging, scope)
            settings = app_settings(staging, scope)
    except (zipfile.BadZipFile, ApprovalError, OSError, ValueError) as err:
        return f"{site} cannot read the job's app to check it against its approvals ({err}); the job folder is broken"
    return refusal(site, digest, settings, str(job_meta.get("name", "")), approvals)


MAX_APP_BYTES = 2 << 30  # a fedanchor app is configuration, kilobytes; anything near this is not a job to unpack


def _check_entries(archive: zipfile.ZipFile) -> None:
    """Refuse, before unpacking, entries that would land outside the staging folder and absurd sizes."""
    total = 0
    for entry in archive.infolist():
        parts = Path(entry.filename).parts
        if entry.filename.startswith("/") or ".." in parts:
            raise ApprovalError(f"the app holds a file outside its folder: {entry.filename!r}")
        total += entry.file_size
    if total > MAX_APP_BYTES:
        raise ApprovalError(f"the app unpacks to {total / 2**30:.1f} GiB, more than {MAX_APP_BYTES / 2**30:.0f} GiB")


def _deployer_base():
    from nvflare.private.fed.utils.app_deployer import AppDeployer

    return AppDeployer


class ApprovedJobsDeployer(_deployer_base()):
    """FLARE's app deployer behind a check: only apps this site approved are deployed (see the module docstring)."""

    def __init__(self, approvals_file: str = APPROVALS_FILE):
        """
        Args:
            approvals_file: the approvals file, relative to the site's local/ folder (or absolute).
        """
        super().__init__()
        if not approvals_file:
            raise ValueError(f"approvals_file must name a file, e.g. {APPROVALS_FILE!r}")
        self.approvals_file = approvals_file

    def approvals_path(self, workspace) -> Path:
        path = Path(self.approvals_file)
        return path if path.is_absolute() else Path(workspace.get_site_config_dir()) / path

    def deploy(self, workspace, job_id: str, job_meta: dict, app_name: str, app_data: bytes, fl_ctx) -> str:
        path = self.approvals_path(workspace)
        reason = check_app_data(app_data, job_meta, workspace.site_name, path)
        if reason:
            log.warning("refused job %s (%s): %s", job_id, job_meta.get("name", ""), reason)
            return reason
        log.info("job %s (%s) is approved in %s: deploying it", job_id, job_meta.get("name", ""), path)
        return super().deploy(workspace, job_id, job_meta, app_name, app_data, fl_ctx)
