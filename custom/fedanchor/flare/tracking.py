"""Experiment tracking through FLARE's analytics: every round's metrics to TensorBoard (and MLflow) on the server.

The server already receives what tracking needs: each site's losses, its anchor CKA
to the consensus and its uncertainty travel in its update (docs/DESIGN.md, "What crosses the network",
"metrics"), and the server scores the global model itself. After each round the
aggregator fires them as FLARE analytics events (``analytix_log_stats``), and
the receivers the job's ``tracking`` option names write them under the run folder:
``tb_receiver.FedAnchorTensorBoard`` (FLARE's ``TBAnalyticsReceiver`` under
fedanchor's name, so a server allow-list of ``fedanchor.`` admits it) and
``mlflow_receiver.FedAnchorMLflow`` (one MLflow run per job):

    tensorboard --logdir <server run dir>/tensorboard
    mlflow ui --backend-store-uri sqlite:///<server run dir>/mlflow.db

Tags: ``eval/<direction>/<metric>`` for the global model, ``site/<site>/<metric>``
and ``weight/<site>`` for each site, ``bytes_up/<site>``. Nothing leaves the
server; nothing needs a secret. Another FLARE receiver (W&B) listens to the same
events: add its component to the server config.
"""
from __future__ import annotations

from typing import Mapping

from ..federation.loop import RoundRecord


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """The scalars of one round, by TensorBoard tag."""
    out: dict[str, float] = {}
    for key, value in record.eval.items():
        if "chance" not in key:
            out[f"eval/{key}"] = float(value)
    for site, metrics in record.site_metrics.items():
        for key, value in _numbers(metrics).items():
            out[f"site/{site}/{key}"] = value
    out.update({f"weight/{site}": float(w) for site, w in record.site_weights.items()})
    out.update({f"bytes_up/{site}": float(b) for site, b in record.bytes_up.items()})
    return out


def _numbers(metrics: Mapping[str, object]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
