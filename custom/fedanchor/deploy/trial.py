"""`make trial`: the provisioned path end to end on 127.0.0.1, in a temporary folder.

    python -m fedanchor.deploy.trial [JOB] [--keep DIR] [--timeout SECONDS]

1. provisions provision/project-loopback.yml (mutual TLS) on a free port,
2. installs provision/server/*.json in the server's kit and provision/site/*.json in each hospital's,
3. runs ``nvflare preflight-check`` on the server's kit,
4. starts the server and hospital-a, -b, -c (each in its own process group, 127.0.0.1 only),
5. submits JOB (default jobs/xray) as the lead user through the FLARE API and watches it round by round,
6. downloads the result, prints the per-round table and the final recall, checks that the best model loads,
7. shuts everything down as the project admin and checks that no process is left,

and prints the wall time of the whole cycle. Everything is written under one temporary folder, removed at the
end unless ``--keep DIR`` names a folder to keep it in (kits, logs, the downloaded result).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from . import admin_api
from .kits import nvflare_command
from .loopback import LoopbackDeployment


def preflight(kit: Path, env: dict[str, str]) -> str:
    """``nvflare preflight-check -p KIT``: its verdict line (it checks ports, storage and a dry start)."""
    done = subprocess.run(nvflare_command() + ["preflight-check", "-p", str(kit)], capture_output=True, text=True,
                          env=env, timeout=120)
    verdict = next((line for line in done.stdout.splitlines() if line.startswith("overall:")), "overall: unknown")
    if done.returncode != 0 or "pass" not in verdict:
        raise RuntimeError(f"preflight-check failed for {kit}:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return verdict


def run_trial(job: Path, workdir: Path, timeout: float = 900.0, echo=print) -> float:
    """The cycle in ``workdir``; returns its wall time in seconds. Raises if any step fails."""
    if not (job / "meta.json").is_file():
        raise FileNotFoundError(f"{job} is not a FLARE job folder (no meta.json); try jobs/xray")
    started = time.monotonic()

    def step(text: str) -> None:
        echo(f"[{time.monotonic() - started:5.0f}s] {text}")

    with LoopbackDeployment(workdir, echo=lambda line: echo(f"        {line}")) as d:
        kits = d.provision()
        step(f"provisioned {kits.root} (server {kits.server}:{d.port}, sites {', '.join(kits.sites)}, "
             f"admins {', '.join(f'{u} ({r})' for u, r in kits.admins.items())}); site and server files installed")
        step(f"preflight-check {kits.server}: {preflight(kits.kit(kits.server), d.env)}")
        d.start()
        step("federation up")
        approvals = d.approve(job, note="make trial")
        step(f"each hospital's admin approved {job} (digest {approvals[0].digest[:12]}) in its kit's "
             f"local/approved_jobs.json")
        user, _ = kits.admin("lead")
        session = d.session("lead")
        try:
            job_id = admin_api.submit(session, job)
            step(f"submitted {job} as {user}: job {job_id}")
            meta = admin_api.watch(session, job_id, echo=lambda line: echo(f"        {line}"), timeout=timeout)
            if meta.get("status") != admin_api.COMPLETED:
                raise RuntimeError(f"job {job_id} ended {meta.get('status')}: {meta.get('job_deploy_detail', '')}; "
                                   f"logs under {workdir}")
            result = admin_api.read_result(admin_api.download(session, job_id, workdir / "result"))
            step(f"downloaded the result to {result.folder}")
        finally:
            session.close()
        echo("")
        admin_api.show_metrics(result)
        echo("")
        model = _load_model(result.checkpoints)
        step(f"best model loads: {model}")
        left = d.shutdown()
        if left:
            raise RuntimeError(f"processes {left} still run after `shutdown all`; they will be killed")
        step("shut down; no process left")
    return time.monotonic() - started


def _load_model(checkpoints: Path) -> str:
    """Load best.safetensors (digest-checked) and say what it holds."""
    from ..flare.persistor import BEST_FILE, load_state

    state = load_state(checkpoints / BEST_FILE)
    return f"{BEST_FILE}, round {state.round}, {len(state.tensors)} tensors"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedanchor.deploy.trial", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", nargs="?", default="jobs/xray", type=Path, help="a job folder (default jobs/xray)")
    parser.add_argument("--keep", type=Path, default=None, help="keep kits, logs and the result in this (new) folder")
    parser.add_argument("--timeout", type=float, default=900.0, help="longest the job may run, in seconds")
    args = parser.parse_args(argv)
    workdir = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="fedanchor-trial-"))
    try:
        wall = run_trial(args.job.resolve(), workdir, args.timeout)
    except (RuntimeError, FileNotFoundError, FileExistsError, TimeoutError) as err:
        print(f"trial: failed: {err}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"trial: the whole cycle (provision, start, submit, train, download, shutdown) took {wall:.0f} s"
          + (f"; kits, logs and result kept in {workdir}" if args.keep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
