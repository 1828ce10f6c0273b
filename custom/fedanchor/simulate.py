"""Run a fedanchor job in the FLARE simulator through its recipe and show its results.

This is what ``make demo`` calls. The job folder is loaded back into a ``FedAnchorRecipe`` (flare/recipe.py,
which checks that the folder is one the recipe writes and says what differs if not), and the recipe runs with
FLARE's ``SimEnv``, one client per site of the job. That run happens in a child process,
``python -m fedanchor.flare.recipe simulate JOB --workspace-root OUT``: SimEnv starts the simulator with the
output inherited, so only a child's piped stdout lets this process echo the server's one line per round as it
comes, and the recipe machinery (whose import edits sys.argv, FLARE's logging) stays out of the caller's process.
When the job ends this prints the per-round table and writes results.json and a PNG of recall, CKA and site
weights over rounds into the output folder. The simulator's workspace is ``OUT/<job name>/`` (SimEnv's
``<workspace_root>/<job name>``); its server run folder ``OUT/<job name>/server/simulate_job/``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Sequence

from .deploy.processes import MARKER
from .deploy.processes import stop as stop_processes
from .plots import plot_rounds
from .report import comparison_lines, print_recall_table, round_table

SUMMARY_FILE = "fedanchor_summary.json"
PROGRESS = re.compile(r"fedanchor (round \d+:.*)")


def find_summary(workspace: Path) -> Path:
    found = sorted(workspace.rglob(SUMMARY_FILE), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {SUMMARY_FILE} under {workspace}; the job did not finish a round (see {workspace}/server/log.txt)")
    return found[-1]


def simulate(job: Path, out: Path, threads: int | None = None, echo=print, site_data: Path | None = None,
             timeout: float | None = None) -> dict:
    """Run the job folder ``job`` through its recipe in SimEnv with one client per configured site; returns the
    summary dict. ``site_data``: a folder holding one data folder per site (``<site_data>/<site>/``), which the
    simulated sites train on. ``timeout``: seconds after which the simulation (every process of it) is stopped and
    an error raised; FLARE's simulator waits for ever for a simulated site whose process died."""
    job, out = Path(job).resolve(), Path(out).resolve()
    if not (job / "meta.json").is_file():
        raise FileNotFoundError(f"{job} is not a FLARE job folder (no meta.json)")
    from .flare.recipe import FedAnchorRecipe

    recipe = FedAnchorRecipe.from_job_dir(job)  # refuses, saying why, a folder the recipe would not run as it is
    sites = recipe.sites
    workspace = out / recipe.name  # where SimEnv runs it: <workspace_root>/<job name>
    if workspace.exists():
        shutil.rmtree(workspace)
    out.mkdir(parents=True, exist_ok=True)
    if site_data is not None:
        write_site_data_config(workspace, Path(site_data), sites)
    threads = threads or len(sites)
    command = [sys.executable, "-m", "fedanchor.flare.recipe", "simulate", str(job), "--workspace-root", str(out),
               "--threads", str(threads)]
    echo(f"$ {' '.join(command)}")
    started = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    # Every simulated site is a process with its own torch thread pool; more threads than cores thrash.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(sites))))
    log_path = out / "simulator.log"
    round_at: list[float] = []  # seconds since launch at which each round's line appeared: the benchmark's round times
    # The simulator starts its own process group (setsid): a group signal cannot reach it. Every process of this
    # simulation carries a marker in its environment instead, and stopping it signals exactly those.
    env[MARKER] = marker = uuid.uuid4().hex
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        stop_processes([], marker, grace=0.0)  # SIGTERM, then at once SIGKILL, to exactly this simulation's processes

    with open(log_path, "w") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                      env=env, cwd=str(out)) as proc:
        watchdog = threading.Timer(timeout, stop) if timeout else None
        try:
            if watchdog:
                watchdog.start()
            for line in proc.stdout or ():  # always a pipe here (stdout=PIPE); it closes once every writer is gone
                log.write(line)
                match = PROGRESS.search(line)
                if match:
                    round_at.append(time.perf_counter() - started)
                    echo(f"[{round_at[-1]:6.0f}s] {match.group(1)}")
            code = proc.wait()
        except BaseException:  # Ctrl-C included: leave no simulator behind
            stop_processes([], marker, grace=0.0)
            raise
        finally:
            if watchdog:
                watchdog.cancel()
    wall = time.perf_counter() - started
    if timed_out.is_set():
        raise TimeoutError(f"the simulation did not end within {timeout:.0f}s and was stopped; its output is in "
                           f"{log_path} (a simulated site whose process died leaves the server waiting)")
    if code != 0:
        raise RuntimeError(f"the simulation exited with code {code} after {wall:.0f}s; its output is in {log_path}")
    summary = json.loads(find_summary(workspace).read_text())
    if summary.get("failures"):
        raise RuntimeError(f"the job reported failures: {summary['failures']}; see {log_path}")
    summary["wall_seconds"] = wall
    summary["round_at_seconds"] = round_at
    summary["sites"] = sites
    summary["workspace"] = str(workspace)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    embedding_map = find_summary(workspace).with_name("embeddings.png")
    if embedding_map.is_file():
        shutil.copyfile(embedding_map, out / "embeddings.png")
    plot_rounds(summary["rounds"], out / "rounds.png", title=f"{job.name}: {len(sites)} sites in the FLARE simulator",
                initial_eval=summary.get("initial_eval"))
    return summary


def write_site_data_config(workspace: Path, site_data: Path, sites: Sequence[str]) -> Path:
    """WS/local/fedanchor_site.json pointing each simulated site at ``<site_data>/<site>/`` (the simulator copies
    WS/local into every site's local folder; flare/site_config.py fills in ``{site}``). SimEnv keeps WS/local."""
    site_data = site_data.resolve()
    missing = [s for s in sites if not (site_data / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"--site-data {site_data} has no folder for site(s) {missing}; it must hold one data "
                                f"folder per site of the job ({list(sites)}), e.g. {site_data / missing[0]}/<modality>.npy")
    path = workspace / "local" / "fedanchor_site.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": {"source": "folder", "path": str(site_data / "{site}")}}, indent=1))
    return path


def show(summary: dict, out: Path, echo=print) -> None:
    echo("")
    echo(round_table(summary["rounds"], summary.get("initial_eval")))
    echo("")
    final = summary["rounds"][-1]["eval"]
    if summary.get("evaluated_on"):
        echo(f"recall measured on {summary['evaluated_on']}")
    if not final:
        echo(f"no recall table: the pack has no validation pairs | {out / 'results.json'}")
        return
    anchors_only = summary.get("anchors_only_eval") or {}
    runs = {"anchors-only CCA": anchors_only, "fedanchor (final global)": final} if anchors_only else {"fedanchor (final global)": final}
    print_recall_table(runs)
    echo("")
    for line in comparison_lines(final, anchors_only):
        echo(line)
    bytes_up = summary["rounds"][-1].get("bytes_up", {})
    echo("")
    echo("bytes sent per site per round (serialized): " + ", ".join(f"{s} {b / 1e6:.2f} MB" for s, b in bytes_up.items()))
    echo(f"wall time {summary['wall_seconds']:.0f}s | {out / 'results.json'} | {out / 'rounds.png'} | {out / 'embeddings.png'}")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fedanchor simulate", description=__doc__)
    parser.add_argument("job", type=Path, help="a job folder, e.g. jobs/xray")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/<job name>)")
    parser.add_argument("--threads", type=int, default=None, help="clients run in parallel (default: one per site)")
    parser.add_argument("--site-data", type=Path, default=None,
                        help="a folder with one data folder per site (<this>/<site>/): the sites train on those "
                             "(needed by a job on an anchor pack)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop the simulation after this many seconds (default: wait until it ends)")
    args = parser.parse_args(argv)
    out = (args.out or Path("runs") / args.job.name).resolve()
    summary = simulate(args.job, out, args.threads, site_data=args.site_data, timeout=args.timeout)
    show(summary, out)
    return 0
