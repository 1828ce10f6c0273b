"""Crash recovery on the provisioned loopback federation: a server killed mid-job, then a site killed mid-round.

One deployment (server + hospital-a, -b, -c on 127.0.0.1, mutual TLS) serves both tests. Every process is killed with
SIGKILL, parent and job process together, as a power cut would: nothing of FLARE's own shutdown runs.

- The server dies after round 2 of a 4-round run is checkpointed. It is restarted from its kit, the same job folder is
  resubmitted with `fedanchor_admin.py resume --from <crashed job>`, and the new job continues at round 2 and ends
  bit for bit where an uninterrupted run of the same job ends (every tensor of the final global state, every
  round's evaluation).
- A site dies in the middle of a round of a job that needs 2 of its 3 sites: the round goes on without it; restarted
  from its kit, it rejoins and contributes to a later round; the job completes.

Stage times are printed (pytest -s); both tests together take about three minutes on two cores.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedanchor.deploy import admin_api, processes
from fedanchor.deploy.loopback import LoopbackDeployment, connected_sites, port_open
from fedanchor.flare import jobs
from fedanchor.flare.persistor import LAST_FILE, RUNS_DIR, load_state

pytestmark = [pytest.mark.deployment,
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="finding a deployment's processes reads Linux /proc")]

ROOT = Path(__file__).resolve().parents[2]
SITES = ["hospital-a", "hospital-b", "hospital-c"]
ROUNDS = 4


class Stages:
    """Wall time per stage, printed as it goes."""

    def __init__(self, name: str):
        self.name, self.started, self.last = name, time.monotonic(), time.monotonic()

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        print(f"[{self.name} {now - self.started:5.0f}s] {what} (+{now - self.last:.0f}s)", flush=True)
        self.last = now


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    stage = Stages("deployment")
    d = LoopbackDeployment(tmp_path_factory.mktemp("crash"), echo=print)
    try:
        d.provision()
        d.start(timeout=180)
        stage("up")
        yield d
    finally:
        d.kill()
        assert not d.alive(), "processes of the deployment survived the clean-up"


def write_job(folder: Path, name: str, deployment: LoopbackDeployment, **options) -> Path:
    """A 4-round variant of the deployment job (jobs/hospitals-motion), approved by every site when sites approve."""
    spec = jobs.DEMO_JOBS["hospitals-motion"]
    job = jobs.write_job(folder, name, spec["config"], num_rounds=ROUNDS, **options)
    if hasattr(deployment, "approve"):
        deployment.approve(job)
    return job


def participant(deployment: LoopbackDeployment, name: str) -> processes.Participant:
    return [p for p in deployment.participants if p.name == name][-1]


def restart(deployment: LoopbackDeployment, name: str) -> processes.Participant:
    return deployment.start_kit(name, deployment.kits.kit(name))


def wait_for(ready, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}")
        time.sleep(poll)


def wait_registered(deployment: LoopbackDeployment, sites, timeout: float = 120.0) -> None:
    session = None
    deadline = time.monotonic() + timeout
    while session is None:
        try:
            session = deployment.session("project_admin", timeout=10)
        except Exception:  # the server still starts
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    try:
        wait_for(lambda: set(sites) <= set(connected_sites(session)), max(1.0, deadline - time.monotonic()),
                 f"{sites} to register again", poll=1.0)
    finally:
        session.close()


def admin_env(deployment: LoopbackDeployment) -> dict[str, str]:
    """The admin's own environment: not marked as one of the deployment's processes."""
    env = dict(deployment.env)
    env.pop(processes.MARKER)
    return env


def result_of(deployment: LoopbackDeployment, job_id: str, timeout: float = 300) -> admin_api.JobResult:
    session = deployment.session("lead")
    try:
        meta = admin_api.watch(session, job_id, echo=print, timeout=timeout)
        assert meta["status"] == admin_api.COMPLETED, meta
        return admin_api.read_result(admin_api.download(session, job_id))
    finally:
        session.close()


def test_a_killed_server_restarted_and_the_job_resumed_ends_identical_to_an_uninterrupted_run(deployment, tmp_path):
    stage = Stages("server crash")
    job = write_job(tmp_path / "hospitals-motion-4", "fedanchor-hospitals-motion-4", deployment)
    server_name = deployment.kits.server
    server_kit = deployment.kits.kit(server_name)
    checkpoints = server_kit / RUNS_DIR / "crashed" / "checkpoints"

    session = deployment.session("lead")
    try:
        crashed_id = admin_api.submit(session, job, run_key="crashed", resume=False)
    finally:
        session.close()
    wait_for(lambda: (checkpoints / "round-0002.safetensors").exists(), 240, "round 2's checkpoint")
    killed = processes.crash(participant(deployment, server_name), deployment.marker)
    stage(f"round 2 checkpointed, server killed (processes {killed})")
    assert not (checkpoints / "round-0004.safetensors").exists(), "the job ended before the crash: nothing was tested"
    assert len(killed) >= 2, "the server's job process was not among the killed"
    assert not port_open(deployment.port)

    restart(deployment, server_name)
    wait_for(lambda: port_open(deployment.port), 120, "the restarted server to listen", poll=0.5)
    wait_registered(deployment, SITES)
    stage("server restarted, sites registered again")

    # the crashed run resumed with the admin command; the same job run whole, at the same time, as the reference
    user, lead_kit = deployment.kits.admin("lead")
    resume = subprocess.Popen([sys.executable, str(ROOT / "admin/fedanchor_admin.py"), "--kit", str(lead_kit),
                               "--timeout", "400", "resume", str(job), "--from", crashed_id],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=admin_env(deployment))
    session = deployment.session("lead")
    try:
        reference_id = admin_api.submit(session, job, run_key="reference", resume=False)
    finally:
        session.close()
    out, err = resume.communicate(timeout=600)
    print(out[-3000:], err[-3000:])
    stage("resumed job done")
    assert resume.returncode == 0, err
    assert "resuming run key crashed" in out and "continuing from round 2: 2 of 4 rounds" in out, out
    resumed = admin_api.read_result(Path(out.split("result in ", 1)[1].splitlines()[0]))
    reference = result_of(deployment, reference_id)
    stage("reference job done")

    # the final global state: every tensor equal, bit for bit
    mine, theirs = load_state(resumed.checkpoints / LAST_FILE), load_state(reference.checkpoints / LAST_FILE)
    assert mine.round == theirs.round == ROUNDS and set(mine.tensors) == set(theirs.tensors)
    for key, value in theirs.tensors.items():
        assert torch.equal(mine.tensors[key], value), key
    # the summary carries the rounds of the crashed job on, and every figure equals the reference's
    rounds, expected = resumed.summary["rounds"], reference.summary["rounds"]
    assert [r["round"] for r in rounds] == [r["round"] for r in expected] == list(range(ROUNDS))
    for got, want in zip(rounds, expected):
        assert got["eval"] == want["eval"] and got["accepted"] == want["accepted"] == SITES, got["round"]
    assert resumed.summary["final_eval"] == reference.summary["final_eval"]
    assert resumed.summary["best_round"] == reference.summary["best_round"]
    assert [r["from_round"] for r in resumed.summary["resumed"]] == [2]
    assert (resumed.checkpoints / "round-0001.safetensors").is_file()  # the crashed job's rounds are in the result
    # the resumed job trained only the rounds still missing; each site picked its delta_site up from its disk
    resumed_id = out.split("as job ", 1)[1].split()[0]
    server_log = deployment.log_of(resumed.folder)  # the server's run folder goes once the job ends: its result has the log
    assert "run 'crashed': continuing from round 2 (2 of 4 rounds left)" in server_log
    assert "Round 0 started." not in server_log and "Round 2 started." in server_log
    for site in SITES:
        assert "delta_site resumed from round" in deployment.log_of(deployment.kits.kit(site) / resumed_id), site
    # (a fresh start on a used run key is refused: tests/test_resume.py, in process)


def test_a_killed_site_misses_rounds_then_rejoins_the_resumed_run_after_a_restart(deployment, tmp_path):
    """FLARE 2.9 starts a job's process on a site only when the job is deployed: a site restarted from its kit
    registers again but takes no further part in the running job. The run goes on without it; once it is back the
    admin aborts the job and resumes its run, and the resumed job has every site again."""
    stage = Stages("site crash")
    job = write_job(tmp_path / "hospitals-motion-2of3", "fedanchor-hospitals-motion-2of3", deployment, min_clients=2)
    server_file = job / "app/config/config_fed_server.json"
    server = json.loads(server_file.read_text())
    # 2 of 3 results make a round; the third is waited for this long after the second, so that a live site is not
    # left out for being slow (a dead site never answers: its rounds end this long after the others' results)
    server["workflows"][0]["args"]["wait_time_after_min_received"] = 8
    server_file.write_text(json.dumps(server, indent=2))
    if hasattr(deployment, "approve"):
        deployment.approve(job)
    victim = "hospital-c"
    server_kit = deployment.kits.kit(deployment.kits.server)
    checkpoints = server_kit / RUNS_DIR / "site-crash" / "checkpoints"

    session = deployment.session("lead")
    try:
        job_id = admin_api.submit(session, job, run_key="site-crash", resume=False)
        wait_for(lambda: (checkpoints / "round-0001.safetensors").exists(), 240, "round 0's checkpoint")
        killed = processes.crash(participant(deployment, victim), deployment.marker)
        stage(f"round 0 checkpointed, {victim} killed in round 1 (processes {killed})")
        assert len(killed) >= 2, f"the job process of {victim} was not among the killed"
        wait_for(lambda: (checkpoints / "round-0002.safetensors").exists(), 120, "round 1 without the killed site")
        stage(f"round 1 done without {victim}")
        restart(deployment, victim)
        wait_registered(deployment, SITES)
        stage(f"{victim} restarted and registered")
        session.abort_job(job_id)
        aborted = admin_api.watch(session, job_id, echo=print, timeout=120)
        assert aborted["status"].startswith(admin_api.TERMINAL_PREFIX) and aborted["status"] != admin_api.COMPLETED
        resumed_id = admin_api.submit(session, job, run_key="site-crash", resume=True)
    finally:
        session.close()
    result = result_of(deployment, resumed_id)
    stage("run resumed with every site, job done")

    rounds = result.summary["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    with_victim = [victim in r["accepted"] for r in rounds]
    print("rounds with", victim, with_victim)
    assert with_victim[0] and not with_victim[1], rounds  # in round 0; killed during round 1, which went on without it
    assert with_victim[-1], f"{victim} never rejoined: {with_victim}"
    assert all(len(r["accepted"]) >= 2 for r in rounds)
    log = deployment.log_of(deployment.kits.kit(victim) / resumed_id)
    assert "delta_site resumed from round 0" in log  # it goes on from the delta_site it kept before the crash
