"""The whole provisioned federation on 127.0.0.1, in one folder: what `make trial` and tests/deployment run.

    with LoopbackDeployment(workdir) as d:
        d.provision()          # project-loopback.yml on a free port -> kits; site and server files installed
        d.start()              # server, then hospital-a/-b/-c; returns when all three are registered
        session = d.session("lead")
        ...
        d.shutdown()           # `shutdown all` as the project admin; waits until every process is gone
    # leaving the block stops whatever is still running (only this deployment's processes)

Everything lives under ``workdir``: the kits, each participant's workspace and log, the processes' HOME.
"""
from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from . import processes
from .admin_api import open_session, quiet_flare
from .kits import Kits, install_local_files, provision, provision_dir, with_port

Echo = Callable[[str], Any]


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it; FLARE binds it a few seconds later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


class LoopbackDeployment:
    def __init__(self, workdir: str | Path, provision_folder: str | Path | None = None, port: int | None = None,
                 threads: int | None = 1, echo: Echo = lambda line: None):
        """
        Args:
            workdir: an empty or absent folder for everything the deployment writes.
            provision_folder: holds project-loopback.yml, site/ and server/ (default: the checkout's provision/).
            port: the server's one port (default: a free one).
            threads: torch threads per process (OMP_NUM_THREADS); None leaves the environment's.
            echo: where progress lines go.
        """
        self.workdir = Path(workdir).resolve()
        if self.workdir.exists() and any(self.workdir.iterdir()):
            raise FileExistsError(f"{self.workdir} is not empty; a loopback deployment needs a folder of its own")
        self.provision_folder = provision_dir(provision_folder)
        self.port = port or free_port()
        self.marker = uuid.uuid4().hex
        self.env = processes.flare_env(self.workdir / "home", self.marker, threads)
        self.echo = echo
        self.kits: Kits | None = None
        self.participants: list[processes.Participant] = []

    # -- set-up ----------------------------------------------------------------------
    def provision(self, extra_sites: Sequence[str] = (), folder: str = "provision") -> Kits:
        """Provision project-loopback.yml on this deployment's port; install the server's and the sites' local files."""
        project = with_port(self.provision_folder / "project-loopback.yml", self.workdir / folder / "project.yml",
                            self.port, extra_sites)
        kits = provision(project, self.workdir / folder, env=self.env)
        install_local_files(kits.kit(kits.server), self.provision_folder / "server")
        for site in kits.sites:
            install_local_files(kits.kit(site), self.provision_folder / "site")
        if folder == "provision":
            self.kits = kits
        return kits

    def _kits(self) -> Kits:
        if self.kits is None:
            raise RuntimeError("call provision() first")
        return self.kits

    def start_kit(self, name: str, kit: Path) -> processes.Participant:
        participant = processes.start(name, kit, self.env)
        self.participants.append(participant)
        return participant

    def stop_kit(self, participant: processes.Participant, timeout: float = 15.0) -> None:
        """Stop one participant's process group (a process that never joined, so `shutdown all` cannot reach it)."""
        processes.stop_group(participant, timeout)

    def start(self, sites: Sequence[str] | None = None, timeout: float = 120.0) -> None:
        """Start the server, then the sites; return once every site is registered with the server."""
        kits = self._kits()
        started = time.monotonic()
        if port_open(self.port):
            raise RuntimeError(f"port {self.port} is already taken; choose another (port=...)")
        server = self.start_kit(kits.server, kits.kit(kits.server))
        self._wait(lambda: port_open(self.port), timeout, f"the server to listen on 127.0.0.1:{self.port}", server)
        self.echo(f"[{time.monotonic() - started:5.0f}s] server listening on 127.0.0.1:{self.port}")
        wanted = list(sites if sites is not None else kits.sites)
        for site in wanted:
            self.start_kit(site, kits.kit(site))
        session = self.session("project_admin")
        try:
            self._wait(lambda: set(wanted) <= set(connected_sites(session)), timeout,
                       f"sites {wanted} to register", server)
        finally:
            session.close()
        self.echo(f"[{time.monotonic() - started:5.0f}s] {len(wanted)} sites registered: {', '.join(wanted)}")

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str, server: processes.Participant) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not server.running:
                raise RuntimeError(f"the server exited while waiting for {what}; see {server.console} and "
                                   f"{server.kit / 'log.txt'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for {what}; logs under {self.workdir}")
            time.sleep(1.0)

    # -- use ---------------------------------------------------------------------------
    def approve(self, job_dir: str | Path, sites: Sequence[str] | None = None, note: str = "") -> list:
        """Each site's admin approves ``job_dir`` in its own kit (flare/approval.py); sites admit only approved jobs."""
        from ..flare.approval import approve

        kits = self._kits()
        return [approve(job_dir, kits.kit(site), approved_by=f"it@{site}", note=note, site=site)
                for site in (sites if sites is not None else kits.sites)]

    def session(self, role: str, timeout: float = 30.0):
        """A FLARE API session as the project's admin user with ``role`` (project_admin, lead, org_admin)."""
        user, kit = self._kits().admin(role)
        return open_session(kit, user, timeout=timeout)

    @staticmethod
    def log_of(folder: Path) -> str:
        """Everything FLARE logged under ``folder`` so far (a kit: its own log and its jobs' logs; or one job's run folder)."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(Path(folder).rglob("log*.txt")))

    # -- tear-down ---------------------------------------------------------------------
    def shutdown(self, timeout: float = 90.0) -> list[int]:
        """``shutdown all`` as the project admin; returns the ids of processes still alive after ``timeout``."""
        session = self.session("project_admin")
        with quiet_flare():  # the session's cell reports the server it talks to is gone: that is the point
            try:
                session.shutdown("all", wait=True, timeout=min(timeout, 60.0))
            finally:
                try:
                    session.close()
                except Exception:  # the server is gone: closing the session has nobody to tell
                    pass
            return processes.wait_gone(self.marker, timeout)

    def alive(self) -> list[int]:
        return processes.marked_processes(self.marker)

    def kill(self) -> list[int]:
        """Stop every process this deployment started (and only those); returns the ids that needed a signal."""
        return processes.stop(self.participants, self.marker)

    def __enter__(self) -> "LoopbackDeployment":
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def connected_sites(session) -> list[str]:
    try:
        return [c.name for c in session.get_connected_client_list()]
    except Exception:  # the server is still coming up
        return []
