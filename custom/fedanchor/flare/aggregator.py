"""ScatterAndGather's aggregator: check each site's update as it arrives, merge by precision at the end of the round.

All of the maths is ``FederatedServer.accept`` / ``finish_round`` / ``evaluate``;
this class turns FLARE shareables into SiteUpdates and back, logs one line per
round and keeps the run's summary JSON (``fedanchor_summary.json`` in the
server's run folder) up to date after every round.
"""
from __future__ import annotations

import json
import time
from typing import Any

from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.abstract.aggregator import Aggregator

from ..federation.loop import RoundRecord, format_round
from ..federation.server import ContributionRejected, RoundFailed
from ..plots import plot_embedding_map
from .persistor import atomic_write_bytes
from .server_state import get_server_component, selection_metric

# Which data chose what: written into every run summary so that a reader can check no held-out pair chose anything.
CHOSEN_BY = {
    "readout (blocks, truncation, ridge, directions)": "k-fold cross-validation on the public anchors (alignment.readout_folds)",
    "best model (best_round, best.safetensors)": "anchor_cv/mrr: the readout's cross-validated rank of held-out anchors",
    "held-out or validation pairs (eval)": "reported only; they choose nothing",
}
from .shareable import dxo_to_update, state_to_dxo
from .tracking import round_scalars

SUMMARY_FILE = "fedanchor_summary.json"
EMBEDDING_MAP = "embeddings.png"  # the held-out pairs of the latest global model, redrawn each round


def serialized_size(shareable: Shareable) -> int | None:
    """Bytes of the shareable as FLARE serialises it (FOBS), or None when it cannot be measured here."""
    try:
        from nvflare.fuel.utils import fobs

        return len(fobs.dumps(shareable))
    except Exception:
        return None


class FedAnchorAggregator(Aggregator):
    def __init__(self, server_id: str = "fedanchor_server", min_sites: int = 1, summary_file: str = SUMMARY_FILE,
                 measure_bytes: bool = True):
        """
        Args:
            server_id: id of the FedAnchorServerComponent in config_fed_server.json.
            min_sites: fewest valid contributions that make a round; with fewer the job stops (RoundFailed).
            summary_file: the per-round JSON record, relative to the server's run folder.
            measure_bytes: record each received shareable's serialised size (one extra FOBS serialisation).
        """
        super().__init__()
        self.server_id = server_id
        self.min_sites = min_sites
        self.summary_file = summary_file
        self.measure_bytes = measure_bytes
        self._round_open = False
        self._round_started = 0.0
        self._bytes_serialized: dict[str, int] = {}
        self._summary: dict[str, Any] | None = None

    # -- helpers -----------------------------------------------------------
    def _component(self, fl_ctx: FLContext):
        return get_server_component(fl_ctx, self.server_id)

    def _open_round(self, fl_ctx: FLContext) -> None:
        if not self._round_open:
            self._component(fl_ctx).server(fl_ctx).start_round()
            self._round_open = True
            self._round_started = time.perf_counter()
            self._bytes_serialized = {}

    # -- Aggregator API ----------------------------------------------------
    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        component = self._component(fl_ctx)
        sender = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default=None)
        with component.lock:
            self._open_round(fl_ctx)
            server = component.server(fl_ctx)
            try:
                update = dxo_to_update(from_shareable(shareable))
            except Exception as err:  # malformed payload: not a DXO, wrong kind, missing or unexpected entries
                reason = f"malformed update: {type(err).__name__}: {err}"
                if sender:
                    server.record_rejection(sender, reason)
                self.log_warning(fl_ctx, f"rejected the contribution of {sender or '?'}: {reason}")
                return False
            if sender and update.site != sender:
                reason = f"it claims to come from {update.site!r} but was sent by {sender!r}"
                server.record_rejection(sender, reason)
                self.log_warning(fl_ctx, f"rejected the contribution of {sender}: {reason}")
                return False
            try:
                server.accept(update)
            except ContributionRejected as err:
                self.log_warning(fl_ctx, f"rejected the contribution of {err.site}: {err.reason}")
                return False
            if self.measure_bytes:
                size = serialized_size(shareable)
                if size is not None:
                    self._bytes_serialized[update.site] = size
            self.log_info(fl_ctx, f"accepted {update.site} ({update.modality}) for round {update.round}: "
                                  f"loss {update.metrics.get('loss/loss', float('nan')):.4f}")
            return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        component = self._component(fl_ctx)
        with component.lock:
            self._open_round(fl_ctx)
            server = component.server(fl_ctx)
            previous = server.state
            try:
                state = server.finish_round(self.min_sites)
            except RoundFailed as err:
                self._round_open = False
                self.log_error(fl_ctx, str(err))
                self._write_summary(fl_ctx, failure=str(err))
                self.system_panic(str(err), fl_ctx)
                return state_to_dxo(previous, component.state_meta()).to_shareable()
            self._round_open = False
            metrics = server.evaluate(state)
            report = server.report
            bytes_up = {site: self._bytes_serialized.get(site, n) for site, n in report.bytes_up.items()}
            down = previous.nbytes() if previous is not None else 0  # the whole state; BasisCacheFilter may send less
            record = RoundRecord(report.round, time.perf_counter() - self._round_started, report.site_metrics,
                                 report.site_weights, report.site_uncertainty, report.rejected, bytes_up, metrics,
                                 {s: server.bytes_down.get(s, down) for s in report.accepted})
            self._plot_embeddings(fl_ctx, server.last_embeddings, report.round)
            self._stream(fl_ctx, record)
            cka = " ".join(f"{s}:{m['cka_to_consensus']:.3f}" for s, m in report.site_metrics.items() if "cka_to_consensus" in m)
            self.log_info(fl_ctx, f"fedanchor {format_round(record)} | cka {cka or '-'} | bytes up "
                                  f"{' '.join(f'{s}:{b}' for s, b in bytes_up.items())}"
                                  + (f" | rejected {report.rejected}" if report.rejected else ""))
            self._append_round(fl_ctx, record, payload_bytes=dict(report.bytes_up), basis=dict(report.basis))
            return state_to_dxo(state, component.state_meta(metrics)).to_shareable()

    def _stream(self, fl_ctx: FLContext, record: RoundRecord) -> None:
        """The round's metrics as FLARE analytics events, for whichever tracking receiver the job configures."""
        try:
            for tag, value in round_scalars(record).items():
                dxo = create_analytic_dxo(tag, value, AnalyticsDataType.SCALAR, global_step=record.round + 1)
                send_analytic_dxo(self, dxo, fl_ctx)
        except (TypeError, ValueError) as err:  # tracking must never stop a round
            self.log_warning(fl_ctx, f"could not stream round {record.round} metrics: {err}")

    def _plot_embeddings(self, fl_ctx: FLContext, embeddings, round_: int) -> None:
        if not embeddings:
            return
        path = self._component(fl_ctx).run_dir(fl_ctx) / EMBEDDING_MAP
        try:
            plot_embedding_map(embeddings, path, title=f"held-out pairs after round {round_ + 1}")
        except (ValueError, OSError, RuntimeError) as err:  # a picture must never stop a round
            self.log_warning(fl_ctx, f"could not draw {path.name}: {err}")

    def reset(self, fl_ctx: FLContext) -> None:
        # ScatterAndGather calls this after each round; the next accept opens the next round on the server.
        self._round_open = False
        self._bytes_serialized = {}

    # -- summary -----------------------------------------------------------
    def _summary_path(self, fl_ctx: FLContext):
        return self._component(fl_ctx).run_dir(fl_ctx) / self.summary_file

    def _load_summary(self, fl_ctx: FLContext) -> dict[str, Any]:
        if self._summary is None:
            component = self._component(fl_ctx)
            path = self._summary_path(fl_ctx)
            summary: dict[str, Any] | None = None
            if path.exists():  # a resumed job appends to its own record
                try:
                    summary = json.loads(path.read_text())
                except json.JSONDecodeError:
                    summary = None
            self._summary = summary or {
                "job_id": fl_ctx.get_job_id(),
                "config": component.state_meta()["job_config"],
                "initial_eval": component.initial_eval,
                "anchors_only_eval": component.anchors_only_eval,
                "chosen_by": CHOSEN_BY,
                "evaluated_on": component.evaluated_on,
                "rounds": [],
            }
        return self._summary

    def _append_round(self, fl_ctx: FLContext, record: RoundRecord, payload_bytes: dict[str, int],
                      basis: dict[str, Any]) -> None:
        summary = self._load_summary(fl_ctx)
        entry = record.as_dict()
        entry["bytes_up_payload"] = payload_bytes  # raw array bytes (SiteUpdate.nbytes), beside the serialised size
        entry["accepted"] = sorted(record.site_metrics)
        entry["selection_metric"] = selection_metric(record.eval)
        if basis:  # a basis refresh's round: its phase and each layer's rank (adapters/refresh.py)
            entry["basis"] = basis
        summary["rounds"].append(entry)
        scores = [(r["selection_metric"], r["round"]) for r in summary["rounds"] if r.get("selection_metric") is not None]
        summary["best_round"] = max(scores)[1] if scores else None
        summary["final_eval"] = record.eval
        self._write(fl_ctx, summary)

    def _write_summary(self, fl_ctx: FLContext, failure: str) -> None:
        summary = self._load_summary(fl_ctx)
        summary.setdefault("failures", []).append(failure)
        self._write(fl_ctx, summary)

    def _write(self, fl_ctx: FLContext, summary: dict[str, Any]) -> None:
        atomic_write_bytes(self._summary_path(fl_ctx), json.dumps(summary, indent=2, sort_keys=True, default=float).encode())
