"""Scale: the server's peak memory as sites are added, and FLARE's own cost against the in-process loop.

Server memory: one real site update of the job's model is trained first and
written to a file. Then each count of sites runs in a fresh Python process (peak
RSS cannot be reset inside one) that does nothing but the server's part: build
the server and its initial state, read the update, record the peak, fold in that
many copies of it (perturbed per site) and merge, record the peak again. No site
training ever runs in a measuring process, so the growth is the accept-and-merge's
own. With the information or the typicality check on (the defaults) the server
holds a round's updates to its end, so the growth per added site (the least-squares
slope over the counts) is about one update's bytes; with both off the server folds
updates into running sums per modality as they arrive and the slope is near zero.

FLARE cost: the same job, rounds and sites in the FLARE simulator and in the
in-process loop (``run_in_process``), wall time of each and their ratio.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import FedAnchorConfig, config_from_dict, config_to_dict


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def write_site_update(config: FedAnchorConfig, path: Path) -> Path:
    """Train one site's round of the job's model from the initial state and write its update (arrays + meta) to
    ``path`` (.npz beside a .json): what the measuring processes fold in."""
    from ..federation.loop import make_split
    from ..federation.server import FederatedServer
    from ..federation.site import SiteTrainer

    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    state = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats).initial_state()
    site, private = next(iter(split.private.items()))
    update = SiteTrainer(config, site, private, split.anchors[private.spec.name], split.anchor_fingerprint, modalities,
                         split.feature_stats).train_round(state)
    arrays, meta = update.to_arrays()
    np.savez(path.with_suffix(".npz"), **arrays)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def server_peak(config: FedAnchorConfig, n_sites: int, update_path: Path) -> dict[str, float]:
    """In this process: build the server, read the update at ``update_path``, accept ``n_sites`` perturbed copies,
    merge; peak RSS before the first update and after the merge."""
    from ..federation.loop import make_split
    from ..federation.messages import SiteUpdate
    from ..federation.server import FederatedServer

    if n_sites < 1:
        raise ValueError(f"n_sites={n_sites}: a merge needs at least one site")
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats)
    server.initial_state()
    with np.load(Path(update_path).with_suffix(".npz")) as arrays:
        update = SiteUpdate.from_arrays(dict(arrays), json.loads(Path(update_path).with_suffix(".json").read_text()))
    before = _peak_rss_mib()
    started = time.perf_counter()
    server.start_round()
    g = torch.Generator().manual_seed(0)
    for k in range(n_sites):
        params = {key: v + 1e-4 * torch.randn(v.shape, generator=g) for key, v in update.params.items()}
        server.accept(dataclasses.replace(update, site=f"site-{k}", params=params))
    server.finish_round(min_sites=1)
    return {"sites": n_sites, "peak_before_mib": before, "peak_after_mib": _peak_rss_mib(),
            "seconds": time.perf_counter() - started}


def server_memory(config: FedAnchorConfig, counts: Sequence[int] = (2, 4, 8, 16, 64)) -> list[dict[str, float]]:
    """``server_peak`` for each count of sites, each in a fresh interpreter, on one update trained here first."""
    with tempfile.TemporaryDirectory() as folder:
        update_path = write_site_update(config, Path(folder) / "update")
        rows = []
        for n in counts:
            code = ("import json, sys; from fedanchor.bench.scale import server_peak; from fedanchor.config import "
                    "config_from_dict; print(json.dumps(server_peak(config_from_dict(json.loads(sys.argv[1])), "
                    f"{int(n)}, sys.argv[2])))")
            done = subprocess.run([sys.executable, "-c", code, json.dumps(config_to_dict(config)), str(update_path)],
                                  capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"server memory run with {n} sites failed: {done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def growth_per_site(memory: Sequence[dict[str, float]]) -> float:
    """MiB per added site: the least-squares slope of the accept-and-merge growth over the site counts."""
    sites = np.array([r["sites"] for r in memory], dtype=float)
    growth = np.array([r["peak_after_mib"] - r["peak_before_mib"] for r in memory])
    if len(set(sites)) < 2:
        raise ValueError("the growth per site needs at least two different site counts")
    return float(np.polyfit(sites, growth, 1)[0])


def bytes_vs_anchors(config: FedAnchorConfig, counts: Sequence[int] = (50, 100, 200, 400, 800)) -> list[dict[str, Any]]:
    """Bytes up of one site's update (serialized arrays) per number of anchors: the Gram grows as N(N+1)/2."""
    from ..federation.loop import make_split
    from ..federation.messages import SiteUpdate
    from ..federation.state import core_params, projector_params
    from ..model.homogeneous import build_model

    split = make_split(config)
    model = build_model(config, {m: d.spec for m, d in split.anchors.items()}, split.feature_stats)
    rows = []
    for private in {d.spec.name: d for d in split.private.values()}.values():
        modality = private.spec.name
        params = {k: v.detach().clone() for k, v in core_params(model).items()}
        params.update({k: v.detach().clone() for k, v in projector_params(model, modality).items()})
        precision = {k: torch.ones_like(v, dtype=torch.float64) for k, v in core_params(model).items()}
        for n in counts:
            update = SiteUpdate("site", modality, 0, "0" * 64, params, precision, torch.zeros(n * (n + 1) // 2), 10, 1.0)
            gram = n * (n + 1) // 2 * 2  # float16
            rows.append({"modality": modality, "anchors": n, "bytes_up": update.nbytes(), "gram_bytes": gram,
                         "gram_share": gram / update.nbytes()})
    return rows


def in_process_child(job: str) -> None:
    """Run ``job``'s config in process (``run_in_process``) and print when each round ended (time.time()), as JSON."""
    from ..federation.loop import run_in_process
    from ..flare.jobs import read_job_config

    stamps: list[float] = []
    config = config_from_dict(read_job_config(Path(job)))
    run_in_process(config, progress=lambda line: stamps.append(time.time()) if line.startswith("round ") else None)
    print(json.dumps({"round_end": stamps, "end": time.time()}))


def _phases(wall: float, round_at: Sequence[float]) -> dict[str, float]:
    """Start-up (launch to the first round's work), seconds per round in steady state, and the tail after the last."""
    per_round = (round_at[-1] - round_at[0]) / (len(round_at) - 1) if len(round_at) > 1 else float("nan")
    first = round_at[0] if round_at else float("nan")
    return {"wall_s": wall, "startup_s": first - per_round if per_round == per_round else first,
            "per_round_s": per_round, "tail_s": wall - round_at[-1] if round_at else float("nan")}


def flare_cost(job: Path, out: Path) -> dict[str, Any]:
    """The job from a cold start in the FLARE simulator and in process (a fresh interpreter each): wall seconds, the
    ratio, and each split into start-up, seconds per round and the tail (cross-site evaluation, shutdown)."""
    from ..flare.jobs import read_job_config
    from ..simulate import simulate

    config = config_from_dict(read_job_config(job))
    launched = time.time()
    done = subprocess.run([sys.executable, "-c", "import sys; from fedanchor.bench.scale import in_process_child; "
                           "in_process_child(sys.argv[1])", str(job)], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the in-process run of {job} failed: {done.stderr[-2000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    in_process = _phases(time.time() - launched, [t - launched for t in child["round_end"]])
    summary = simulate(job, out / "simulator", echo=lambda _line: None)
    simulator = _phases(summary["wall_seconds"], summary["round_at_seconds"])
    return {"job": str(job), "rounds": config.rounds, "in_process": in_process, "simulator": simulator,
            "in_process_s": in_process["wall_s"], "simulator_s": simulator["wall_s"],
            "ratio": simulator["wall_s"] / in_process["wall_s"],
            "per_round_ratio": simulator["per_round_s"] / in_process["per_round_s"]}


def scale_markdown(memory: list[dict[str, float]], cost: dict[str, Any] | None,
                   anchors: list[dict[str, Any]] | None = None) -> str:
    lines = ["| sites | server process peak RSS (MiB) | growth while accepting and merging (MiB) | accept + merge s |",
             "|---|---|---|---|"]
    lines += [f"| {r['sites']} | {r['peak_after_mib']:.0f} | {r['peak_after_mib'] - r['peak_before_mib']:.1f} | "
              f"{r['seconds']:.2f} |" for r in memory]
    if len({r["sites"] for r in memory}) >= 2:
        lines += ["", f"Growth per added site: {growth_per_site(memory):.3f} MiB (least-squares slope over the counts; "
                      "each count in a fresh process that only builds the server, accepts and merges)."]
    if anchors:
        lines += ["", "| modality | anchors | bytes up per site per round | of which the Gram (float16) |", "|---|---|---|---|"]
        lines += [f"| {r['modality']} | {r['anchors']} | {r['bytes_up'] / 1024:.1f} KiB | {r['gram_share']:.0%} |" for r in anchors]
    if cost:
        lines += ["", f"FLARE cost ({cost['job']}, {cost['rounds']} rounds, each from a cold start):", "",
                  "| run | wall s | start-up s | s per round | tail s (cross-site eval, shutdown) |", "|---|---|---|---|---|"]
        for name in ("in_process", "simulator"):
            p = cost[name]
            lines.append(f"| {name.replace('_', ' ')} | {p['wall_s']:.1f} | {p['startup_s']:.1f} | {p['per_round_s']:.2f} | "
                         f"{p['tail_s']:.1f} |")
        lines += ["", f"Ratio simulator / in process: {cost['ratio']:.2f} overall, {cost['per_round_ratio']:.2f} per round."]
    return "\n".join(lines) + "\n"
