"""Scale: the server's peak memory as sites are added, and FLARE's own cost against the in-process loop (issue 8).

Server memory: each count of sites runs in its own Python process (peak RSS
cannot be reset inside one), builds the server, folds in that many site updates
(one real update of the job's model, perturbed per site) and merges; the figure
is the peak RSS above the same process with no update. The server keeps running
sums per modality, not the updates, so the figure should stay flat.

FLARE cost: the same job, rounds and sites in the FLARE simulator and in the
in-process loop (``run_in_process``), wall time of each and their ratio.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import FedAnchorConfig, config_from_dict, config_to_dict


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def server_peak(config: FedAnchorConfig, n_sites: int) -> dict[str, float]:
    """In this process: build the server, accept ``n_sites`` updates, merge; peak RSS before and after the updates."""
    from ..federation.loop import make_split
    from ..federation.server import FederatedServer
    from ..federation.site import SiteTrainer

    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats)
    state = server.initial_state()
    site, private = next(iter(split.private.items()))
    update = SiteTrainer(config, site, private, split.anchors[private.spec.name], split.anchor_fingerprint, modalities,
                         split.feature_stats).train_round(state)
    before = _peak_rss_mib()
    started = time.perf_counter()
    server.start_round()
    g = torch.Generator().manual_seed(0)
    for k in range(n_sites):
        params = {key: v + 1e-4 * torch.randn(v.shape, generator=g) for key, v in update.params.items()}
        server.accept(dataclasses.replace(update, site=f"site-{k}", params=params))
    if n_sites:
        server.finish_round(min_sites=1)
    return {"sites": n_sites, "peak_before_mib": before, "peak_after_mib": _peak_rss_mib(),
            "seconds": time.perf_counter() - started}


def server_memory(config: FedAnchorConfig, counts: Sequence[int] = (0, 2, 4, 8, 16)) -> list[dict[str, float]]:
    """``server_peak`` for each count of sites, each in a fresh interpreter."""
    rows = []
    for n in counts:
        code = ("import json, sys; from fedanchor.bench.scale import server_peak; from fedanchor.config import config_from_dict; "
                f"print(json.dumps(server_peak(config_from_dict(json.loads(sys.argv[1])), {int(n)})))")
        done = subprocess.run([sys.executable, "-c", code, json.dumps(config_to_dict(config))], capture_output=True,
                              text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"server memory run with {n} sites failed: {done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


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


def flare_cost(job: Path, out: Path) -> dict[str, Any]:
    """The job in the FLARE simulator and the same config in process: wall seconds and the ratio."""
    from ..federation.loop import run_in_process
    from ..flare.jobs import read_job_config
    from ..simulate import simulate

    config = config_from_dict(read_job_config(job))
    started = time.perf_counter()
    run_in_process(config, progress=None)
    in_process = time.perf_counter() - started
    summary = simulate(job, out / "simulator", echo=lambda _line: None)
    return {"job": str(job), "rounds": config.rounds, "in_process_s": in_process, "simulator_s": summary["wall_seconds"],
            "ratio": summary["wall_seconds"] / in_process}


def scale_markdown(memory: list[dict[str, float]], cost: dict[str, Any] | None,
                   anchors: list[dict[str, Any]] | None = None) -> str:
    lines = ["| sites | server process peak RSS (MiB) | growth while accepting and merging (MiB) | accept + merge s |",
             "|---|---|---|---|"]
    lines += [f"| {r['sites']} | {r['peak_after_mib']:.0f} | {r['peak_after_mib'] - r['peak_before_mib']:.1f} | "
              f"{r['seconds']:.2f} |" for r in memory]
    if anchors:
        lines += ["", "| modality | anchors | bytes up per site per round | of which the Gram (float16) |", "|---|---|---|---|"]
        lines += [f"| {r['modality']} | {r['anchors']} | {r['bytes_up'] / 1024:.1f} KiB | {r['gram_share']:.0%} |" for r in anchors]
    if cost:
        lines += ["", f"FLARE cost ({cost['job']}, {cost['rounds']} rounds): simulator {cost['simulator_s']:.1f} s, in process "
                      f"{cost['in_process_s']:.1f} s, ratio {cost['ratio']:.2f}."]
    return "\n".join(lines) + "\n"
