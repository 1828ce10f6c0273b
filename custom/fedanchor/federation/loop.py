"""The in-process round loop: every site and the server in one Python process.

It calls exactly the functions that the FLARE components call (SiteTrainer.
train_round, FederatedServer.accept / finish_round / evaluate), so experiments
and tests exercise the same maths as a deployment; only the transport differs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..config import FedAnchorConfig
from ..data import corrupt
from ..data.pack import AnchorPack, bundled_pack, load_pack
from ..data.scenario import FederatedSplit, ModalityData
from ..model.homogeneous import build_model
from .messages import GlobalState
from .server import LEFT_OUT, VOUCHED, ContributionRejected, FederatedServer
from .progress import local_step_bar
from .site import SiteTrainer

log = logging.getLogger(__name__)

DEFAULT_SITES: dict[str, dict[str, str]] = {
    "xray": {"hospital-a": "report", "hospital-b": "report", "hospital-c": "findings"},
    "digits": {"hospital-a": "pixels", "hospital-b": "pixels", "hospital-c": "zernike", "hospital-d": "zernike"},
    "motion": {"site-1": "accel", "site-2": "gyro"},
}


def site_modality(config: FedAnchorConfig) -> dict[str, str]:
    if config.data.sites:
        return dict(config.data.sites)
    if config.data.pack:
        raise ValueError(f"a job on pack {config.data.pack} must name its sites: data.sites (site -> modality), "
                         "as `fedanchor job new --site NAME=MODALITY` writes it")
    if config.data.scenario not in DEFAULT_SITES:
        raise ValueError(f"scenario {config.data.scenario!r} has no default sites; set data.sites")
    return dict(DEFAULT_SITES[config.data.scenario])


def job_pack(config: FedAnchorConfig) -> AnchorPack:
    """The job's anchor pack: the folder ``data.pack`` (checked against ``data.pack_fingerprint``), else the bundled
    scenario dealt by ``data.seed``."""
    data = config.data
    if data.pack:
        return load_pack(data.pack, data.pack_fingerprint)
    return bundled_pack(data.scenario, site_modality(config), data.n_anchors, data.n_test, data.seed,
                        data.max_private_per_site)


def make_split(config: FedAnchorConfig) -> FederatedSplit:
    return job_pack(config).federated_split(site_modality(config))


@dataclass
class RoundRecord:
    round: int
    seconds: float
    site_metrics: dict[str, dict[str, float]]
    site_weights: dict[str, float]
    site_uncertainty: dict[str, float]
    rejected: dict[str, str]
    bytes_up: dict[str, int]
    eval: dict[str, float]
    bytes_down: dict[str, int] = field(default_factory=dict)  # the global state each site received this round

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class RunResult:
    config: FedAnchorConfig
    initial_eval: dict[str, float]
    rounds: list[RoundRecord] = field(default_factory=list)
    final_state: GlobalState | None = None
    embeddings: dict[str, Any] = field(default_factory=dict)  # the final model's scored held-out embeddings

    @property
    def final_eval(self) -> dict[str, float]:
        return self.rounds[-1].eval if self.rounds else self.initial_eval


def site_inputs(split: FederatedSplit, corruptions: Mapping[str, tuple[str, float]] | None = None,
                corrupt_anchors: bool = False, seed: int = 0) -> dict[str, tuple[ModalityData, ModalityData]]:
    """Each site's private data and its copy of its modality's anchors, a corrupted site's passed through
    ``data.corrupt`` (its anchors too where ``corrupt_anchors``; a small site's anchors are the public ones whole)."""
    unknown = sorted(set(corruptions or {}) - set(split.private))
    if unknown:
        raise ValueError(f"corruptions name {unknown}, which are not sites of this split ({sorted(split.private)})")
    out = {}
    for site, private in split.private.items():
        anchors = split.anchors[private.spec.name]
        if corruptions and site in corruptions:
            mode, severity = corruptions[site]
            private = corrupt(private, mode, severity, seed=seed)
            if corrupt_anchors and mode != "small":
                anchors = corrupt(anchors, mode, severity, seed=seed + 1)
        out[site] = (private, anchors)
    return out


def run_in_process(config: FedAnchorConfig, progress: Callable[[str], None] | None = print,
                   corruptions: Mapping[str, tuple[str, float]] | None = None, split: FederatedSplit | None = None,
                   freeze_delta: bool = False, evaluate_each_round: bool = True,
                   corrupt_anchors: bool = False) -> RunResult:
    """Train ``config.rounds`` rounds.

    ``corruptions`` maps a site to (mode, severity) for noisy-site studies; ``corrupt_anchors`` puts the corruption
    in the site's pipeline, so its copy of the public anchors passes through it too (a broken loader or scanner
    setting, rather than bad records);
    ``freeze_delta`` keeps every site's log-gain delta at 0 (the no-delta_site ablation);
    ``evaluate_each_round=False`` scores only the final state (benchmarks need no per-round table,
    and held-out scoring with a text trunk costs as much as a site's round on a small CPU).
    """
    say = progress or (lambda _msg: None)
    split = split or make_split(config)
    modalities = {name: data.spec for name, data in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats, split.test)
    sites: dict[str, SiteTrainer] = {}
    for site, (private, anchors) in site_inputs(split, corruptions, corrupt_anchors, config.data.seed).items():
        model = build_model(config, modalities, split.feature_stats)
        if freeze_delta:
            for layer in model.adapters().values():
                layer.delta.requires_grad_(False)  # Adam skips parameters without gradients
        sites[site] = SiteTrainer(config, site, private, anchors, split.anchor_fingerprint,
                                  modalities, split.feature_stats, model=model)
    state = server.initial_state()
    result = RunResult(config=config, initial_eval=server.evaluate(state) if evaluate_each_round else {})
    say(f"{split.scenario}: {len(sites)} sites ({', '.join(f'{s}={t.modality}[{len(t.private)}]' for s, t in sites.items())}), "
        f"{len(next(iter(split.anchors.values())))} anchors, {len(next(iter(split.test.values()), ()))} evaluation pairs")
    for r in range(config.rounds):
        started = time.perf_counter()
        server.start_round()
        for name, trainer in sites.items():
            with local_step_bar(f"{name} round {r + 1}", config.train.local_steps) as bar:
                update = trainer.train_round(server.state_for(name, state), progress=bar if progress is not None else None)
            try:
                server.accept(update)
            except ContributionRejected:
                pass  # recorded in the round report
        state = server.finish_round(min_sites=1)
        metrics = server.evaluate(state) if evaluate_each_round or r == config.rounds - 1 else {}
        report = server.report
        record = RoundRecord(r, time.perf_counter() - started, report.site_metrics, report.site_weights,
                             report.site_uncertainty, report.rejected, report.bytes_up, metrics,
                             {s: server.bytes_down[s] for s in sites})
        result.rounds.append(record)
        say(format_round(record))
    if freeze_delta:
        moved = [n for n, t in sites.items() if any(float(layer.delta.abs().max()) != 0.0 for layer in t.model.adapters().values())]
        if moved:
            raise RuntimeError(f"site(s) {moved}: delta moved although it was frozen")
    result.final_state = state
    result.embeddings = dict(server.last_embeddings)
    return result


CHECK_FACTORS = {"anchor_check/factor": "anchor check", "data_check/factor": "data check",
                 "information_check/factor": "information check", "typicality_check/factor": "typicality check"}


def _checked(metrics: Mapping[str, float]) -> str:
    """Why a site weighs less than its share: the checks that took say from it this round, e.g. " (data check 0.02)",
    or left it out, e.g. " (left out: typicality check 0.001)"; for a site vouched for, what the checks read though
    it keeps its say, e.g. " (vouched for: data check 0.02)"."""
    taken = [f"{name} {metrics[key]:.2g}" for key, name in CHECK_FACTORS.items() if metrics.get(key, 1.0) < 1.0]
    if not taken:
        return ""
    verdict = "left out: " if metrics.get(LEFT_OUT) else "vouched for: " if metrics.get(VOUCHED) else ""
    return f" ({verdict}{', '.join(taken)})"


def format_round(record: RoundRecord) -> str:
    losses = " ".join(f"{s}:{m.get('loss/loss', float('nan')):.3f}" for s, m in record.site_metrics.items())
    weights = " ".join(f"{s}:{w:.2f}{_checked(record.site_metrics.get(s, {}))}" for s, w in record.site_weights.items())
    recall = " ".join(f"{k.split('/')[0]} R@1/5/10 {record.eval.get(k.replace('@1', '@1'), 0):.3f}/"
                      f"{record.eval.get(k.replace('@1', '@5'), 0):.3f}/{record.eval.get(k.replace('@1', '@10'), 0):.3f}"
                      for k in record.eval if k.endswith("/recall@1"))
    return f"round {record.round + 1}: {record.seconds:.1f}s | loss {losses} | weight {weights} | {recall}"
