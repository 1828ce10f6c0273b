"""Run a fedanchor job folder in the real FLARE simulator and show its results.

This is what ``make demo`` calls. It starts ``nvflare simulator`` (a separate
process, exactly what a user would type), echoes the server's one line per
round, and when the job ends prints the per-round table and writes results.json
and a PNG of recall, CKA and site weights over rounds into the output folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from .plots import plot_rounds
from .report import comparison_lines, print_recall_table, round_table

SUMMARY_FILE = "fedanchor_summary.json"
PROGRESS = re.compile(r"fedanchor (round \d+:.*)")


def nvflare_command() -> list[str]:
    candidate = Path(sys.executable).with_name("nvflare")
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("nvflare")
    if found:
        return [found]
    raise FileNotFoundError("the nvflare command is not installed in this environment: pip install 'nvflare==2.9.*'")


def find_summary(workspace: Path) -> Path:
    found = sorted(workspace.rglob(SUMMARY_FILE), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {SUMMARY_FILE} under {workspace}; the job did not finish a round (see {workspace}/server/log.txt)")
    return found[-1]


def simulate(job: Path, out: Path, threads: int | None = None, echo=print, site_data: Path | None = None) -> dict:
    """Run ``job`` in the simulator with one client per configured site; returns the summary dict. ``site_data``:
    a folder holding one data folder per site (``<site_data>/<site>/``), which the simulated sites train on."""
    job = job.resolve()
    if not (job / "meta.json").is_file():
        raise FileNotFoundError(f"{job} is not a FLARE job folder (no meta.json)")
    from .flare.jobs import job_sites, prepare_simulator_workspace, read_job_config

    sites = list(job_sites(read_job_config(job)))
    workspace = out / "workspace"
    if workspace.exists():
        shutil.rmtree(workspace)
    out.mkdir(parents=True, exist_ok=True)
    prepare_simulator_workspace(workspace)  # FLARE 2.9 builds only allow-listed classes, in the simulator too
    if site_data is not None:
        write_site_data_config(workspace, Path(site_data), sites)
    command = nvflare_command() + ["simulator", "-w", str(workspace), "-n", str(len(sites)), "-c", ",".join(sites),
                                   "-t", str(threads or len(sites)), str(job)]
    echo(f"$ {' '.join(command)}")
    started = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    # Every simulated site is a process with its own torch thread pool; more threads than cores thrash.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(sites))))
    log_path = out / "simulator.log"
    round_at: list[float] = []  # seconds since launch at which each round's line appeared: the benchmark's round times
    with open(log_path, "w") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                      env=env, cwd=str(out)) as proc:
        for line in proc.stdout or ():  # always a pipe here (stdout=PIPE)
            log.write(line)
            match = PROGRESS.search(line)
            if match:
                round_at.append(time.perf_counter() - started)
                echo(f"[{round_at[-1]:6.0f}s] {match.group(1)}")
        code = proc.wait()
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"the simulator exited with code {code} after {wall:.0f}s; its output is in {log_path}")
    summary = json.loads(find_summary(workspace).read_text())
    if summary.get("failures"):
        raise RuntimeError(f"the job reported failures: {summary['failures']}; see {log_path}")
    summary["wall_seconds"] = wall
    summary["round_at_seconds"] = round_at
    summary["sites"] = sites
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    embedding_map = find_summary(workspace).with_name("embeddings.png")
    if embedding_map.is_file():
        shutil.copyfile(embedding_map, out / "embeddings.png")
    plot_rounds(summary["rounds"], out / "rounds.png", title=f"{job.name}: {len(sites)} sites in the FLARE simulator",
                initial_eval=summary.get("initial_eval"))
    return summary


def write_site_data_config(workspace: Path, site_data: Path, sites: Sequence[str]) -> Path:
    """WS/local/fedanchor_site.json pointing each simulated site at ``<site_data>/<site>/`` (the simulator copies
    WS/local into every site's local folder; flare/site_config.py fills in ``{site}``)."""
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
    args = parser.parse_args(argv)
    out = (args.out or Path("runs") / args.job.name).resolve()
    summary = simulate(args.job, out, args.threads, site_data=args.site_data)
    show(summary, out)
    return 0
