"""The admin side through the FLARE API: submit a job folder, watch it, download its result, read the metrics.

Every call takes an admin startup kit (what ``nvflare provision`` wrote for a user: startup/fed_admin.json,
the user's certificate and key, the root CA). The user name is read from the kit; the server checks the
certificate (mutual TLS) and applies its authorization rules to the user's role, so a lead may submit
and an org_admin may not.

A job submitted with a run key (``submit(..., run_key=...)``, written into the submitted copy's meta.json)
keeps its checkpoints and each site's state under that key in the server's and the sites' workspaces; if the server or a site dies, the same
job submitted again with ``resume=True`` and the same key continues from the last checkpoint and ends
where the uninterrupted run would have (docs/it/crash-recovery.md).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import secrets
import shutil
import tempfile
import time
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

TERMINAL_PREFIX = "FINISHED"  # FINISHED:COMPLETED, FINISHED:ABORTED, FINISHED:EXECUTION_EXCEPTION, ...
COMPLETED = "FINISHED:COMPLETED"
SUMMARY_FILE = "fedanchor_summary.json"
Echo = Callable[[str], Any]


def kit_user(kit: str | Path) -> str:
    """The user an admin kit was provisioned for (startup/fed_admin.json)."""
    path = Path(kit) / "startup" / "fed_admin.json"
    if not path.is_file():
        raise FileNotFoundError(f"{kit} is not an admin startup kit (no startup/fed_admin.json)")
    return json.loads(path.read_text())["admin"]["username"]


@contextlib.contextmanager
def quiet_flare():
    """FLARE's own chatter off for a moment: its "Connecting to FLARE ..." line on stdout and the messaging errors
    its cells log once the server they talk to is gone (expected during a shutdown). Errors still raise."""
    flare_log = logging.getLogger("nvflare")
    level = flare_log.level
    flare_log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        flare_log.setLevel(level)


def open_session(kit: str | Path, user: str | None = None, timeout: float = 30.0):
    """A secure FLARE API session as the kit's user (or ``user``, who must match the kit's certificate)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    kit = Path(kit).resolve()
    with quiet_flare():
        return new_secure_session(user or kit_user(kit), str(kit), timeout=timeout)


def submit(session, job_dir: str | Path, run_key: str | None = None, resume: bool | None = None) -> str:
    """Submit a job folder; returns the job id. A role without the right raises the API's AuthorizationError.

    FLARE signs the folder it submits in place (.__nvfl_sig.json and .__nvfl_submitter.crt in every folder), so a
    copy is submitted: the job folder in the checkout stays as it is. With ``run_key`` the copy carries the run's
    identity (see ``set_run``); ``resume`` True continues that run, False starts it (both refuse the wrong case).
    """
    job_dir = Path(job_dir).resolve()
    if not (job_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{job_dir} is not a FLARE job folder (no meta.json)")
    if resume is not None and not run_key:
        raise ValueError("resume needs the run key of the run to continue (--run-key, or --from the crashed job's id)")
    with tempfile.TemporaryDirectory(prefix="fedanchor-submit-") as staging:
        copy = Path(staging) / job_dir.name  # the folder's name is the job's folder name on the server
        shutil.copytree(job_dir, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".__nvfl_*"))
        if run_key:
            set_run(copy, run_key, resume)
        return session.submit_job(str(copy))


def new_run_key(job_dir: str | Path) -> str:
    """A run key for a new run of a job: the job folder's name, the time and 4 random hex digits (two submissions in
    one second must not share a run), e.g. hospitals-motion-20250601-142530-9f3c."""
    return f"{Path(job_dir).resolve().name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def set_run(job_dir: str | Path, run_key: str, resume: bool | None) -> None:
    """Write a run's identity into a job folder's meta.json (in place: give it a copy): the run key, and resume
    (True: continue the run, False: start it). The app is left as it is, so a site's approval of the job still
    holds; the server's FedAnchorPersistor reads both, and the sites get the run key with every global state."""
    from ..flare.persistor import RESUME_META, RUN_KEY_META, check_run_key  # the persistor checks them too; the admin hears it first

    check_run_key(run_key)
    job_dir = Path(job_dir)
    meta = _json(job_dir / "meta.json")
    meta[RUN_KEY_META] = run_key
    meta.pop(RESUME_META, None)
    if resume is not None:
        meta[RESUME_META] = bool(resume)
    (job_dir / "meta.json").write_text(json.dumps(meta, indent=2))


def run_key_of(session, job_id: str) -> str:
    """The run key a submitted job carries (its meta.json, as the server keeps it), for resuming its run."""
    from ..flare.persistor import RUN_KEY_META

    meta = session.get_job_meta(job_id)
    key = meta.get(RUN_KEY_META) if isinstance(meta, Mapping) else None
    if not key:
        raise ValueError(f"job {job_id} ({meta.get('name', '?') if isinstance(meta, Mapping) else '?'}) was submitted "
                         "without a run key, so its checkpoints went to its own run folder and cannot be continued by "
                         "another job; submit with fedanchor_admin.py run/submit (which give every job a run key)")
    return str(key)


def resumed_from(session, job_id: str, timeout: float = 180.0, poll: float = 2.0) -> tuple[int, int] | None:
    """(rounds done, rounds in all) of a resumed job, read from its workflow once it runs; None when the job ended
    first (it was refused: its status and the server's log say why) or did not answer within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(session.get_job_meta(job_id).get("status", ""))
        if status.startswith(TERMINAL_PREFIX):
            return None
        if status == "RUNNING":
            try:
                progress = _round_progress(session.show_stats(job_id, "server"))
            except Exception:  # the job process still starts: ask again
                progress = None
            if progress is not None:
                return progress
        time.sleep(poll)
    return None


def _round_progress(stats: Any) -> tuple[int, int] | None:
    """(current round, number of rounds) from ``show_stats``: ScatterAndGather reports both, 0-based."""
    for node in _walk(stats):
        if isinstance(node, Mapping) and "current_round" in node and "num_rounds" in node:
            if node["current_round"] is not None and node["num_rounds"]:
                return int(node["current_round"]), int(node["num_rounds"])
    return None


def _progress_text(current: int, rounds: int) -> str:
    # ScatterAndGather counts one past the last round once the last one is aggregated.
    return f": round {current + 1} of {rounds}" if current < rounds else f": all {rounds} rounds aggregated"


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, Mapping):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _walk(value)


# show_stats is answered by the server's job process; asked while that process still starts, it fails and the
# failure lands in the job's error log. So round progress is asked for only this long after the job is RUNNING,
# and again this long after a failed ask.
STATS_DELAY = 15.0


def watch(session, job_id: str, echo: Echo = print, timeout: float = 0.0, poll: float = 2.0) -> dict[str, Any]:
    """Poll until the job ends, echoing a line whenever its status or round changes; returns the final job meta."""
    started, last, stats_after = time.monotonic(), None, None
    progress: tuple[int, int] | None = None
    while True:
        meta = session.get_job_meta(job_id)
        status = str(meta.get("status", ""))
        if status == "RUNNING":
            now = time.monotonic()
            stats_after = stats_after or now + STATS_DELAY
            if now >= stats_after:
                try:
                    progress = _round_progress(session.show_stats(job_id, "server")) or progress
                except Exception:  # not answered (yet): keep the last progress and ask later
                    stats_after = now + STATS_DELAY
        else:
            progress = None
        line = status + (_progress_text(*progress) if progress else "")
        if line != last:
            echo(f"[{time.monotonic() - started:5.0f}s] {meta.get('name', job_id)} {line}")
            last = line
        if status.startswith(TERMINAL_PREFIX):
            return meta
        if timeout and time.monotonic() - started > timeout:
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f}s; abort it with abort_job {job_id}")
        time.sleep(poll)


def download(session, job_id: str, dest: str | Path | None = None) -> Path:
    """Download the job's result folder (default: the admin kit's transfer/<job id>/)."""
    location = session.download_job_result(job_id, str(dest) if dest else None)
    if not location or not Path(location).exists():
        raise FileNotFoundError(f"the server returned no result for job {job_id} (got {location!r})")
    return Path(location)


@dataclass
class JobResult:
    folder: Path
    summary: dict[str, Any]
    checkpoints: Path  # round-NNNN.safetensors, last.safetensors, best.safetensors


def read_result(folder: str | Path) -> JobResult:
    """The server's fedanchor_summary.json and checkpoint folder inside a downloaded job result."""
    folder = Path(folder)
    found = sorted(folder.rglob(SUMMARY_FILE))
    if not found:
        raise FileNotFoundError(f"no {SUMMARY_FILE} under {folder}: the job finished no round (see the server's log.txt)")
    summary_path = found[0]
    return JobResult(folder, json.loads(summary_path.read_text()), summary_path.parent / "checkpoints")


def show_metrics(result: JobResult, echo: Echo = print) -> None:
    """The per-round table and the final recall, as ``fedanchor simulate`` prints them."""
    from ..report import print_recall_table, round_table  # imports torch: only when there is something to show

    rounds = result.summary.get("rounds", [])
    if not rounds:
        echo("the job recorded no completed round")
        return
    echo(round_table(rounds, result.summary.get("initial_eval")))
    echo("")
    print_recall_table({"final global model": rounds[-1].get("eval", {})})
    echo("")
    best = result.summary.get("best_round")
    echo(f"best round {best if best is None else int(best) + 1} | checkpoints in {result.checkpoints}")
