"""The FLARE server's memory over a long job, for each ``memory_gc_rounds`` setting of ScatterAndGather.

    fedanchor bench --server-memory --rounds 60 --gc-rounds 0,1,10 --out runs/server-memory

One provisioned loopback federation (server + hospital-a/-b/-c, mutual TLS on 127.0.0.1) runs the
hospitals-motion job (tiny trunk) once per setting, one job after another. While a job runs, the resident
memory (VmRSS in /proc/<pid>/status) of the server's job process -- the ``runner_process`` FLARE starts for
that job -- is sampled once a second, together with the last round the server finished (its
``fedanchor round N:`` log line). Per setting: the RSS after round 5 and after the last round, the
least-squares slope over rounds 10..end (MiB per round), the peak, the mean round time, and the workflow's
pause between rounds with and without a cleanup (``gc.collect`` + ``malloc_trim``: its price, read from the job
log's timestamps, which other load on the machine disturbs far less than whole rounds). Written: results.json,
results.md and rss_vs_round.png. docs/results/cpu-server-memory has the figures and what they show.
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..plots import save_figure

Echo = Callable[[str], Any]

DEMO_JOB = "hospitals-motion"  # tiny trunk, motion recordings dealt to the provisioned hospital-a/-b/-c
SERVER_JOB_MODULE = "nvflare.private.fed.app.server.runner_process"  # what the server's per-job process runs
ROUND_LINE = re.compile(r"fedanchor round (\d+):")  # the aggregator's line once a round is merged (1-based)
# ScatterAndGather's own lines (0-based): between "Round k finished." and "Round k+1 started." it resets the
# aggregator and, every memory_gc_rounds rounds, runs gc.collect + malloc_trim: that gap is the cleanup's price.
WORKFLOW_LINE = re.compile(r"Round (\d+) (started|finished)\.")
# FLARE's log lines start with asctime: "2025-06-01 10:00:00,123 - ..."
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[,.](\d{1,6})")
EARLY_ROUND = 5  # "RSS after round 5": the job has settled (imports, model, first merges) by then
SLOPE_FROM = 10  # the slope is fitted over rounds SLOPE_FROM..end, past the start-up
FLAT_SLOPE_MIB = 0.5  # below this many MiB per round a job's server counts as flat
MIN_ROUNDS = SLOPE_FROM + 2  # three points at least for the slope


# -- the pure parts ---------------------------------------------------------------------------------------------
def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (y = a + b x: returns b)."""
    if len(xs) != len(ys):
        raise ValueError(f"slope needs as many xs as ys; got {len(xs)} and {len(ys)}")
    if len(set(xs)) < 2:
        raise ValueError(f"slope needs at least two distinct xs; got {list(xs)}: run more rounds")
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx


def log_time(line: str) -> float | None:
    """The POSIX time of a FLARE log line (its leading asctime, local time), or None if it has none."""
    stamp = LOG_TIME.match(line)
    if not stamp:
        return None
    return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + float(f"0.{stamp.group(2)}")


def round_lines(text: str) -> list[tuple[int, float | None]]:
    """(round, time of the line as a POSIX timestamp, or None without a FLARE timestamp) for each round line."""
    found = []
    for line in text.splitlines():
        match = ROUND_LINE.search(line)
        if match:
            found.append((int(match.group(1)), log_time(line)))
    return found


def workflow_lines(text: str) -> list[tuple[int, str, float]]:
    """(0-based round, "started" or "finished", time) for ScatterAndGather's timestamped round lines."""
    found = []
    for line in text.splitlines():
        match = WORKFLOW_LINE.search(line)
        when = log_time(line) if match else None
        if match and when is not None:
            found.append((int(match.group(1)), match.group(2), when))
    return found


def between_rounds(marks: Sequence[tuple[int, str, float]]) -> dict[int, float]:
    """Per 0-based round k, seconds from "Round k finished." to "Round k+1 started." (the workflow's own work)."""
    finished = {k: t for k, kind, t in marks if kind == "finished"}
    started = {k: t for k, kind, t in marks if kind == "started"}
    return {k: started[k + 1] - t for k, t in sorted(finished.items()) if k + 1 in started}


def proc_status_kib(pid: int | str, field_name: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS: resident now; VmHWM: its peak), in KiB."""
    path = Path("/proc") / str(pid) / "status"
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field_name:
            number, unit = value.split()
            if unit != "kB":
                raise ValueError(f"{path}: {field_name} in {unit!r}, expected kB")
            return int(number)
    raise KeyError(f"{path} has no {field_name} line (a kernel thread or a zombie has no memory of its own)")


def rss_mib(pid: int | str = "self") -> float:
    return proc_status_kib(pid, "VmRSS") / 1024.0


@dataclass
class Sample:
    seconds: float  # since the job was submitted
    round: int  # the last round the server had finished (0: none yet)
    rss_mib: float


def rss_by_round(samples: Iterable[Sample]) -> dict[int, float]:
    """Per finished round r, the median RSS of the samples taken while r was the last finished round.

    The median, because an update that is being received and merged lifts one sample for a moment; rounds
    shorter than the sampling interval may have no sample and are left out.
    """
    grouped: dict[int, list[float]] = {}
    for s in samples:
        if s.round > 0:
            grouped.setdefault(s.round, []).append(s.rss_mib)
    return {r: statistics.median(v) for r, v in sorted(grouped.items())}


def mean_round_seconds(stamps: Mapping[int, float]) -> float:
    """Seconds per round in steady state: from the end of round 1 to the end of the last one, over the rounds between."""
    rounds = sorted(stamps)
    if len(rounds) < 2:
        return float("nan")
    return (stamps[rounds[-1]] - stamps[rounds[0]]) / (rounds[-1] - rounds[0])


def cleans_after(k: int, gc_rounds: int) -> bool:
    """Whether ScatterAndGather runs its memory cleanup between 0-based rounds k and k+1.

    It increments its round first and then cleans when (round + 1) % memory_gc_rounds == 0.
    """
    return gc_rounds > 0 and (k + 2) % gc_rounds == 0


def _median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def summarize(gc_rounds: int, samples: Sequence[Sample], round_end: Mapping[int, float], rounds: int,
              hwm_mib: float | None = None, gaps: Mapping[int, float] | None = None) -> dict[str, Any]:
    """The figures of one setting from its samples, the times its rounds ended and its between-round gaps."""
    by_round = rss_by_round(samples)
    gaps = dict(gaps or {})
    late = {r: v for r, v in by_round.items() if r >= SLOPE_FROM}
    early = [v for r, v in by_round.items() if r >= EARLY_ROUND]
    last_round = max(by_round) if by_round else 0
    return {
        "memory_gc_rounds": gc_rounds,
        "rounds": rounds,
        "rounds_finished": max(round_end) if round_end else 0,
        "rss_after_round_5_mib": early[0] if early else float("nan"),
        "rss_after_last_round_mib": by_round[last_round] if by_round else float("nan"),
        "last_sampled_round": last_round,
        "slope_mib_per_round": slope(list(late), list(late.values())) if len(late) >= 2 else float("nan"),
        "peak_sampled_mib": max((s.rss_mib for s in samples), default=float("nan")),
        "peak_hwm_mib": hwm_mib if hwm_mib is not None else float("nan"),
        "mean_round_s": mean_round_seconds(round_end),
        # the workflow's work between rounds, with and without a cleanup; medians, as other load on the machine
        # spikes single gaps
        "between_rounds_with_cleanup_s": _median(v for k, v in gaps.items() if cleans_after(k, gc_rounds)),
        "between_rounds_without_cleanup_s": _median(v for k, v in gaps.items() if not cleans_after(k, gc_rounds)),
        "cleanups": sum(cleans_after(k, gc_rounds) for k in gaps),
        "between_rounds_s": {str(k + 1): round(v, 4) for k, v in sorted(gaps.items())},  # keyed by the 1-based round
        # when each round's line was logged, in seconds after the first one
        "round_end_s": {str(r): round(t - min(round_end.values()), 3) for r, t in sorted(round_end.items())},
        "rss_by_round_mib": {str(r): v for r, v in by_round.items()},
        "samples": [asdict(s) for s in samples],
    }


def is_flat(figures: Mapping[str, Any], limit: float = FLAT_SLOPE_MIB) -> bool:
    """Flat: the slope over rounds 10..end stays under ``limit`` MiB per round."""
    value = figures.get("slope_mib_per_round")
    return isinstance(value, float) and value == value and value < limit


def recommend(results: Sequence[Mapping[str, Any]], limit: float = FLAT_SLOPE_MIB) -> dict[str, Any]:
    """0 if the server stays flat without cleanup; else the largest flat period (the fewest cleanups), if any."""
    flat = [r for r in results if is_flat(r, limit)]
    if any(r["memory_gc_rounds"] == 0 for r in flat):
        return {"memory_gc_rounds": 0, "why": f"flat without cleanup (slope under {limit} MiB/round)"}
    periods = sorted(r["memory_gc_rounds"] for r in flat)
    if periods:
        return {"memory_gc_rounds": periods[-1], "why": f"the longest period measured that keeps the slope under {limit} MiB/round"}
    return {"memory_gc_rounds": None, "why": f"no setting measured kept the slope under {limit} MiB/round"}


def markdown(results: Sequence[Mapping[str, Any]], command: str = "") -> str:
    lines = ([f"`{command}`", ""] if command else []) + [
        "| memory_gc_rounds | rounds | RSS after round 5 (MiB) | RSS after last round (MiB) | slope rounds 10..end "
        "(MiB/round) | peak sampled (MiB) | peak VmHWM (MiB) | mean round s | between rounds s, median: with cleanup "
        "/ without |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['memory_gc_rounds']} | {r['rounds_finished']} | {r['rss_after_round_5_mib']:.1f} | "
                     f"{r['rss_after_last_round_mib']:.1f} | {r['slope_mib_per_round']:+.3f} | {r['peak_sampled_mib']:.1f} | "
                     f"{r['peak_hwm_mib']:.1f} | {r['mean_round_s']:.2f} | {_gap(r, 'with')} / {_gap(r, 'without')} |")
    choice = recommend(results)
    lines += ["", f"Recommended memory_gc_rounds: {choice['memory_gc_rounds']} ({choice['why']})."]
    return "\n".join(lines) + "\n"


def _gap(figures: Mapping[str, Any], which: str) -> str:
    value = figures.get(f"between_rounds_{which}_cleanup_s")
    return "-" if value is None or value != value else f"{value:.3f}"


def plot(results: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """RSS of the server's job process against the last finished round, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        by_round = {int(k): v for k, v in r["rss_by_round_mib"].items()}
        ax.plot(list(by_round), list(by_round.values()), marker="o", ms=2.5,
                label=f"memory_gc_rounds={r['memory_gc_rounds']} ({r['slope_mib_per_round']:+.3f} MiB/round, "
                      f"{r['mean_round_s']:.2f} s/round)")
    ax.axvline(SLOPE_FROM, color="grey", lw=0.8, ls=":")
    ax.set(title=title, xlabel="last finished round", ylabel="server job process RSS (MiB)")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def parse_gc_rounds(text: str) -> list[int]:
    """``"0,1,10"`` -> [0, 1, 10]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--gc-rounds {text!r}: give whole numbers separated by commas, e.g. 0,1,10") from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"--gc-rounds {text!r}: give each non-negative period once, e.g. 0,1,10")
    return values


# -- the deployment ---------------------------------------------------------------------------------------------
def write_memory_job(folder: Path, rounds: int, gc_rounds: int) -> Path:
    """DEMO_JOBS["hospitals-motion"] with ``rounds`` rounds and ScatterAndGather's memory_gc_rounds set."""
    from ..flare import jobs

    spec = jobs.DEMO_JOBS[DEMO_JOB]
    job = jobs.write_job(folder / f"{DEMO_JOB}-gc{gc_rounds}", name=f"fedanchor-{DEMO_JOB}-memory-gc{gc_rounds}",
                         config=spec["config"], num_rounds=rounds,
                         tracking=spec.get("tracking", jobs.DEFAULT_TRACKING))
    server_file = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_file.read_text())
    workflow = next((w for w in server["workflows"] if w["path"] == jobs.SAG), None)
    if workflow is None:
        raise RuntimeError(f"{server_file} has no ScatterAndGather workflow; the server memory study needs one")
    workflow["args"]["memory_gc_rounds"] = gc_rounds
    server_file.write_text(json.dumps(server, indent=2) + "\n")
    return job


def cmdline(pid: int) -> list[str]:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")


def server_job_process(marker: str, job_id: str) -> int | None:
    """The deployment's process running the server's part of ``job_id`` (``runner_process -n JOB_ID``), if up."""
    from ..deploy.processes import marked_processes

    for pid in marked_processes(marker):
        try:
            args = cmdline(pid)
        except OSError:  # gone meanwhile
            continue
        if SERVER_JOB_MODULE in args and job_id in args:
            return pid
    return None


@dataclass
class _LogTail:
    """New text of a growing log file since the last read."""
    path: Path
    offset: int = 0
    rounds: dict[int, float] = field(default_factory=dict)  # round -> when its line was written (or first seen)
    marks: list[tuple[int, str, float]] = field(default_factory=list)  # ScatterAndGather's started/finished lines

    def poll(self, now: float) -> int:
        if self.path.is_file():
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            complete = chunk.rfind(b"\n") + 1  # a line still being written is read next time
            self.offset += complete
            text = chunk[:complete].decode(errors="replace")
            for r, when in round_lines(text):
                self.rounds.setdefault(r, when if when is not None else now)
            self.marks += workflow_lines(text)
        return max(self.rounds, default=0)


def measure_job(deployment, session, job_dir: Path, gc_rounds: int, rounds: int, echo: Echo, interval: float = 1.0,
                timeout: float = 3600.0) -> dict[str, Any]:
    """Submit ``job_dir`` and sample its server job process's RSS each ``interval`` seconds until the job ends."""
    from ..deploy import admin_api

    if hasattr(deployment, "approve"):  # sites that only run jobs they approved
        deployment.approve(job_dir)
    job_id = admin_api.submit(session, job_dir)
    submitted = time.monotonic()
    log = _LogTail(deployment.kits.kit(deployment.kits.server) / job_id / "log.txt")
    samples: list[Sample] = []
    pid, hwm, status, next_status, last_echo = None, None, "", 0.0, 0
    while True:
        now = time.monotonic()
        finished = log.poll(time.time())
        if pid is None:
            pid = server_job_process(deployment.marker, job_id)
        if pid is not None:
            try:
                rss = rss_mib(pid)
                hwm = proc_status_kib(pid, "VmHWM") / 1024.0
                samples.append(Sample(round(now - submitted, 2), finished, round(rss, 2)))
            except (OSError, KeyError):  # the job process has ended
                pid = -1
        if finished != last_echo and (finished - last_echo >= 10 or finished == rounds):
            echo(f"[{now - submitted:5.0f}s] memory_gc_rounds={gc_rounds}: round {finished}/{rounds}, "
                 f"server job RSS {samples[-1].rss_mib if samples else float('nan'):.1f} MiB")
            last_echo = finished
        if now >= next_status:
            status = str(session.get_job_meta(job_id).get("status", ""))
            next_status = now + 5.0
            if status.startswith(admin_api.TERMINAL_PREFIX):
                break
        if now - submitted > timeout:
            raise TimeoutError(f"job {job_id} (memory_gc_rounds={gc_rounds}) still {status} after {timeout:.0f}s; "
                               f"logs under {deployment.workdir}")
        time.sleep(max(0.0, interval - (time.monotonic() - now)))
    log.poll(time.time())
    if status != admin_api.COMPLETED:
        raise RuntimeError(f"job {job_id} (memory_gc_rounds={gc_rounds}) ended {status}; logs under {deployment.workdir}")
    if not samples:
        raise RuntimeError(f"never found the server's job process ({SERVER_JOB_MODULE} -n {job_id}) among the "
                           f"deployment's processes; logs under {deployment.workdir}")
    figures = summarize(gc_rounds, samples, log.rounds, rounds, hwm, between_rounds(log.marks))
    figures.update(job_id=job_id, wall_s=round(time.monotonic() - submitted, 1))
    return figures


def server_memory_study(rounds: int = 60, gc_rounds: Sequence[int] = (0, 1, 10), echo: Echo = print,
                        workdir: Path | None = None, timeout_per_job: float = 3600.0) -> dict[str, Any]:
    """Start the loopback federation once, run the job for each setting in turn, shut down; the figures per setting."""
    from ..deploy.loopback import LoopbackDeployment

    if rounds < MIN_ROUNDS:
        raise ValueError(f"--rounds {rounds}: the slope is fitted over rounds {SLOPE_FROM}..end; give at least {MIN_ROUNDS}")
    if not Path("/proc/self/status").is_file():
        raise RuntimeError("the server memory study reads /proc/<pid>/status: it needs Linux")
    started = time.monotonic()
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="fedanchor-server-memory-")) if own else Path(workdir)
    results = []
    with LoopbackDeployment(root / "deployment", echo=echo) as deployment:
        deployment.provision()
        deployment.start(timeout=180)
        for gc in gc_rounds:
            job = write_memory_job(root / "jobs", rounds, gc)
            session = deployment.session("lead")
            try:
                results.append(measure_job(deployment, session, job, gc, rounds, echo, timeout=timeout_per_job))
            finally:
                session.close()
            r = results[-1]
            echo(f"memory_gc_rounds={gc}: {r['rss_after_round_5_mib']:.1f} MiB after round 5, "
                 f"{r['rss_after_last_round_mib']:.1f} after round {r['last_sampled_round']}, "
                 f"{r['slope_mib_per_round']:+.3f} MiB/round, {r['mean_round_s']:.2f} s/round ({r['wall_s']:.0f} s)")
        left = deployment.shutdown()
    if own:
        shutil.rmtree(root, ignore_errors=True)  # kept on failure (the exception skips this) for its logs
    return {"job": DEMO_JOB, "rounds": rounds, "sampling_interval_s": 1.0, "slope_from_round": SLOPE_FROM,
            "flat_limit_mib_per_round": FLAT_SLOPE_MIB, "wall_s": round(time.monotonic() - started, 1),
            "left_running_after_shutdown": left, "recommended": recommend(results), "settings": results}


def write_study(study: Mapping[str, Any], out: Path, command: str = "") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "rss_vs_round.png"}
    paths["json"].write_text(json.dumps(_finite(study), indent=1) + "\n")
    paths["md"].write_text(markdown(study["settings"], command))
    plot(study["settings"], paths["png"],
         f"FLARE server job process over {study['rounds']} rounds of {study['job']} (3 sites, loopback)")
    return paths


def _finite(value: Any) -> Any:
    """NaN as null: strict JSON readers refuse it."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
