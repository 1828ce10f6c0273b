"""The one FederatedServer of a FLARE job, shared by the persistor and the aggregator.

Listed once in config_fed_server.json (id ``fedanchor_server``) with the job's
settings; the persistor asks it for the initial or resumed state, the aggregator
for the merge and the evaluation. It builds the server lazily, the first time
either needs it, with the same steps as ``run_in_process``: the seeded split
(public anchors, held-out test pairs), the modalities, then the server.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping

from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable

from ..alignment.codebook import form_of_code
from ..config import FedAnchorConfig, config_from_dict, config_to_dict
from ..federation.loop import make_split
from ..federation.messages import GlobalState
from ..federation.server import FederatedServer
from ..typicality import Summary
from .shareable import state_to_learnable


def selection_metric(metrics: Mapping[str, float]) -> float | None:
    """Model selection without held-out pairs: how well the round's readout ranks held-out anchors under the
    server's k-fold anchor cross-validation (``anchor_cv/mrr``); None when the job fits no readout."""
    value = metrics.get("anchor_cv/mrr")
    return float(value) if value is not None else None


class FedAnchorServerComponent(FLComponent):
    def __init__(self, config: dict | None = None, device: str | None = None):
        """
        Args:
            config: the job's settings, nested like ``fedanchor.config.config_from_dict`` (the same dict the
                executors get).
            device: where the server's evaluation model runs; default ``config.train.device``.
        """
        super().__init__()
        self.config = dict(config or {})
        self.device = device
        self._config: FedAnchorConfig = config_from_dict(self.config)  # a wrong key fails when the job is built
        self._server: FederatedServer | None = None
        self._lock = threading.RLock()
        self.initial_eval: dict[str, float] = {}
        self.anchors_only_eval: dict[str, float] = {}
        self.evaluated_on = ""  # which pairs the reported recall comes from (set with the server)
        self.run_key = ""  # the run's identity when it has one (set by the persistor): sent with every global state

    @property
    def fedanchor_config(self) -> FedAnchorConfig:
        return self._config

    def server(self, fl_ctx: FLContext | None = None) -> FederatedServer:
        with self._lock:
            if self._server is None:
                cfg = self._config
                split = make_split(cfg)
                modalities = {name: data.spec for name, data in split.anchors.items()}
                self._server = FederatedServer(cfg, modalities, split.anchors, split.anchor_fingerprint,
                                               split.feature_stats, split.test, device=self.device)
                self.evaluated_on = evaluation_set(cfg, split)
                if fl_ctx is not None:
                    self.log_info(fl_ctx, f"fedanchor server: {'pack' if cfg.data.pack else 'scenario'} {split.scenario} "
                                          f"({split.anchor_fingerprint[:12]}), trunk {cfg.trunk.name}, modalities "
                                          f"{list(modalities)}, {len(next(iter(split.anchors.values())))} anchors, evaluated "
                                          f"on {self.evaluated_on}, device {self._server.device}")
            return self._server

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def record_initial_eval(self, fl_ctx: FLContext, state: GlobalState) -> dict[str, float]:
        server = self.server(fl_ctx)
        self.initial_eval = server.evaluate(state)
        self.anchors_only_eval = server.anchors_only_eval()
        return self.initial_eval

    def state_meta(self, metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
        """What the server adds to a global state's meta, which every site receives: its job config, its run key when
        the run has one, and the evaluation when there is one. (Not ``server_memory``: it names every site and its
        factor, which is the server's business; the persistor adds it to the checkpoint only.)"""
        meta: dict[str, Any] = {"job_config": config_to_dict(self._config)}
        if self.run_key:
            meta["run_key"] = self.run_key
        if metrics:
            meta["eval"] = {k: float(v) for k, v in metrics.items()}
            score = selection_metric(metrics)
            if score is not None:
                meta["selection_metric"] = score
        return meta

    def server_memory(self) -> dict[str, Any]:
        """What the server remembers between rounds beside the global state: the codebook block's form (temperature and
        map, reported in every evaluation), the anchor, data and information checks' factors, the typicality
        check's reports (its factors follow from them), the sites the checks left out, and the outlier check's
        reference (they weigh or refuse the next round's updates). Kept in each checkpoint's meta, so a resumed run goes
        on as the uninterrupted one would."""
        server = self.server()
        return {"codebook_temperature": server.codebook_temperature, "codebook_form": server.codebook_form,
                "anchor_factors": {site: float(f) for site, f in server.anchor_factors.items()},
                "information_factors": {site: float(f) for site, f in server.information_factors.items()},
                "typicality_reports": {site: [modality, summary.items, summary.metrics()]
                                       for site, (modality, summary) in server.typicality_reports.items()},
                "data_check": {site: [server.data_modality[site], float(d), float(server.data_factors.get(site, 1.0))]
                               for site, d in server.data_distances.items()},
                "silenced": {site: {k: float(v) for k, v in figures.items()} for site, figures in server.silenced.items()},
                "outlier_reference": server.outlier_reference()}

    def restore_server_memory(self, meta: Mapping[str, Any]) -> None:
        """Put back what ``server_memory`` kept (a checkpoint of an older version keeps none: nothing to restore)."""
        memory = meta.get("server_memory") or {}
        server = self.server()
        if memory.get("codebook_temperature") is not None:
            server.codebook_temperature = float(memory["codebook_temperature"])
            # Older checkpoints kept a position flag (its 0/1 are the same form codes) or, older still, none: a position.
            server.codebook_form = str(memory.get("codebook_form")
                                       or form_of_code(float(memory.get("codebook_position", True))))
        server.anchor_factors = {site: float(f) for site, f in (memory.get("anchor_factors") or {}).items()}
        server.information_factors = {site: float(f) for site, f in (memory.get("information_factors") or {}).items()}
        reports = memory.get("typicality_reports") or {}
        server.typicality_reports = {site: (str(m), Summary.from_metrics(metrics, int(items)))
                                     for site, (m, items, metrics) in reports.items()}
        server.silenced = {site: {k: float(v) for k, v in figures.items()} for site, figures in (memory.get("silenced") or {}).items()}
        server.judge_typicality(exclude=server.silenced)
        data_check = memory.get("data_check") or {}
        server.data_modality = {site: str(m) for site, (m, _, _) in data_check.items()}
        server.data_distances = {site: float(d) for site, (_, d, _) in data_check.items()}
        server.data_factors = {site: float(f) for site, (_, _, f) in data_check.items()}
        server._previous_changes = [float(c) for c in memory.get("outlier_reference") or []]

    def to_learnable(self, state: GlobalState, metrics: Mapping[str, float] | None = None) -> ModelLearnable:
        return state_to_learnable(state, self.state_meta(metrics))

    @staticmethod
    def run_dir(fl_ctx: FLContext) -> Path:
        workspace = fl_ctx.get_engine().get_workspace()
        return Path(workspace.get_run_dir(fl_ctx.get_job_id()))


def get_server_component(fl_ctx: FLContext, component_id: str) -> FedAnchorServerComponent:
    component = fl_ctx.get_engine().get_component(component_id)
    if not isinstance(component, FedAnchorServerComponent):
        raise RuntimeError(
            f"component {component_id!r} is {type(component).__name__ if component is not None else 'missing'}; "
            "config_fed_server.json must list fedanchor.flare.server_state.FedAnchorServerComponent under that id")
    return component


def evaluation_set(config: FedAnchorConfig, split) -> str:
    """What the run's recall is measured on, in words for the summary and the log."""
    n = len(next(iter(split.test.values()))) if split.test else 0
    if not n:
        return "nothing: the pack has no validation pairs (anchor cross-validation still chooses the readout and best model)"
    if config.data.pack:
        return f"the pack's {n} public validation pairs"
    return f"{n} held-out pairs of the bundled {split.scenario} scenario (demo only: a deployment has none)"

