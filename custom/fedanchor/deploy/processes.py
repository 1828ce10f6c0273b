"""Start provisioned FLARE participants as processes, and stop exactly those.

Each participant starts with ``startup/sub_start.sh --once`` (one process: the script ``exec``s
python3, with no restart loop) in its own session, so its process group is its own. FLARE then
launches each job in a further process with ``setsid``: those leave the group, so every process of a
deployment also carries a marker in its environment (FLARE copies the environment into job processes),
and stopping looks the marker up in /proc. Nothing else on the machine is ever signalled.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MARKER = "FEDANCHOR_DEPLOYMENT_ID"


def flare_env(home: Path, marker: str, threads: int | None = 1, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a deployment's processes.

    The start scripts call plain ``python3``: this interpreter's folder goes first on PATH. HOME is the
    deployment's own (FLARE tools write ~/.nvflare). One torch thread per process by default: several
    sites share one machine in a trial, and their thread pools would otherwise thrash its cores.
    """
    env = dict(base if base is not None else os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(home)
    env[MARKER] = marker
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    home.mkdir(parents=True, exist_ok=True)
    return env


@dataclass
class Participant:
    name: str
    kit: Path
    process: subprocess.Popen
    console: Path  # the start script's stdout and stderr; FLARE's own log is KIT/log.txt

    @property
    def running(self) -> bool:
        return self.process.poll() is None


def start(name: str, kit: Path, env: dict[str, str], console: Path | None = None) -> Participant:
    script = kit / "startup" / "sub_start.sh"
    if not script.is_file():
        raise FileNotFoundError(f"{kit} has no startup/sub_start.sh; is it a provisioned client or server kit?")
    console = console or kit / "console.txt"
    out: IO = open(console, "w")
    try:
        process = subprocess.Popen(["bash", str(script), "--once"], cwd=str(kit), env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()  # the child holds its own copy
    return Participant(name, kit, process, console)


def marked_processes(marker: str) -> list[int]:
    """Ids of live processes whose environment carries ``MARKER=marker`` (Linux /proc; others are not visible)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and not _is_zombie(entry):
                found.append(int(entry.name))
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            continue
    return sorted(found)


def _is_zombie(entry: Path) -> bool:
    stat = (entry / "stat").read_text()
    return stat[stat.rfind(")") + 2:].startswith("Z")


def wait_gone(marker: str, timeout: float) -> list[int]:
    """Wait until no marked process is left; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = marked_processes(marker)
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = marked_processes(marker)
    return alive


def stop_group(participant: Participant, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, to the one process group ``start`` created for ``participant``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not participant.running:
            return
        try:
            os.killpg(participant.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            participant.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue


def stop(participants: list[Participant], marker: str, grace: float = 10.0) -> list[int]:
    """Terminate the participants' process groups and every marked process; returns the ids that needed a signal."""
    signalled: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in participants:
            if p.running:
                try:
                    os.killpg(p.process.pid, sig)  # the group start() created: the script and what it exec'd
                    signalled.add(p.process.pid)
                except ProcessLookupError:
                    pass
        for pid in marked_processes(marker):
            try:
                os.kill(pid, sig)
                signalled.add(pid)
            except ProcessLookupError:
                pass
        if not wait_gone(marker, grace if sig == signal.SIGTERM else 5.0) and not any(p.running for p in participants):
            break
    for p in participants:
        try:
            p.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return sorted(signalled)


def participant_processes(participant: Participant, marker: str) -> list[int]:
    """Ids of the live processes of one participant: its own and the job processes it launched (marked, and naming
    or running in its kit folder; FLARE starts them with the workspace on their command line)."""
    kit = str(Path(participant.kit).resolve())
    found = []
    for pid in marked_processes(marker):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:  # gone meanwhile
            continue
        inside = [path for path in (*args, cwd) if path == kit or path.startswith(kit + os.sep)]
        if pid == participant.process.pid or inside:
            found.append(pid)
    return sorted(found)


def crash(participant: Participant, marker: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL one participant and its job processes at once, as a power cut or an OOM kill would: no clean-up runs.
    Returns the ids killed."""
    killed = participant_processes(participant, marker)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        participant.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout
    while set(killed) & set(marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return killed
