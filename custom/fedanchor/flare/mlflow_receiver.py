"""The round metrics the aggregator streams (``tracking.py``), written to MLflow as one run per job.

FLARE 2.9's own ``MLflowReceiver`` keeps one MLflow run per *site* and listens to
events sent by sites (``fed.analytix_log_stats``); fedanchor's metrics are fired on
the server by the aggregator (the sites' figures travel inside their updates), so
that receiver would drop them. This one records every analytics event the server
sees, from the aggregator or a site, in a single run named after the job, with the
job's configuration as parameters: one row per job in the MLflow UI, every round a
step.

No secret is configured in the job: the default store is a SQLite file in the
server's run folder (``<run dir>/mlflow.db``, downloaded with the job), readable
with ``mlflow ui --backend-store-uri sqlite:///<path>/mlflow.db``. A tracking
server is named by ``tracking_uri``; its credentials, if any, come from the
server's environment (``MLFLOW_TRACKING_TOKEN`` ...), as MLflow reads them, never
from the job folder.

Needs the ``mlflow`` extra (``pip install "fedanchor[mlflow]"``: mlflow-skinny and
alembic for the SQLite store). Without it the job still runs; the server log says
what to install.
"""
from __future__ import annotations

import os
import re
import time
from typing import Any, Mapping

from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.widgets.streaming import AnalyticsReceiver

from .server_state import get_server_component

MLFLOW_DB = "mlflow.db"
INSTALL_HINT = 'pip install "fedanchor[mlflow]" (mlflow-skinny and alembic) on the FLARE server'
_SCALAR_TYPES = (AnalyticsDataType.SCALAR, AnalyticsDataType.METRIC)
_DICT_TYPES = (AnalyticsDataType.SCALARS, AnalyticsDataType.METRICS)


def metric_key(tag: str) -> str:
    """A tag as MLflow accepts it (alphanumerics, ``_ - . : /`` and spaces): ``eval/a->b/recall@1`` -> ``eval/a_to_b/recall_at_1``."""
    return re.sub(r"[^\w\-.:/ ]", "_", tag.replace("->", "_to_").replace("@", "_at_"))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested configuration keys as MLflow parameters: ``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": "0.001"}``."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = str(value)[:500]  # MLflow's limit on a parameter's value
    return out


class FedAnchorMLflow(AnalyticsReceiver):
    def __init__(self, tracking_uri: str | None = None, experiment_name: str = "fedanchor",
                 server_id: str = "fedanchor_server"):
        """
        Args:
            tracking_uri: an MLflow tracking URI (``http://mlflow.hospital.org:5000``, ``sqlite:////abs/path.db``);
                None writes ``<server run dir>/mlflow.db``.
            experiment_name: the MLflow experiment that holds one run per job.
            server_id: id of the FedAnchorServerComponent, whose configuration is logged as the run's parameters.
        """
        if tracking_uri is not None and (not isinstance(tracking_uri, str) or not tracking_uri.strip()):
            raise ValueError(f"tracking_uri must be None or a non-empty string, got {tracking_uri!r}")
        if not isinstance(experiment_name, str) or not experiment_name.strip():
            raise ValueError(f"experiment_name must be a non-empty string, got {experiment_name!r}")
        super().__init__()  # both the server's own events and those sites send (fed.)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.server_id = server_id
        self._client: Any = None
        self._run_id: str | None = None
        self._pending: list[Any] = []

    def tracking_uri_for(self, fl_ctx: FLContext) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        return f"sqlite:///{os.path.abspath(os.path.join(run_dir, MLFLOW_DB))}"

    def initialize(self, fl_ctx: FLContext) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise RuntimeError(f"the job asks for MLflow tracking but mlflow cannot be imported ({err}): {INSTALL_HINT}; "
                               "or write the job without it (tracking=('tensorboard',))") from err
        uri = self.tracking_uri_for(fl_ctx)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(self.experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.experiment_name)
        job_id = str(fl_ctx.get_job_id())
        meta = fl_ctx.get_prop(ReservedKey.JOB_META) or {}
        job_name = meta.get(JobMetaKey.JOB_NAME, "fedanchor") if isinstance(meta, dict) else "fedanchor"
        run = client.create_run(experiment_id, run_name=f"{job_name}-{job_id[:8]}",
                                tags={"job_id": job_id, "job_name": str(job_name)})
        self._client, self._run_id = client, run.info.run_id
        config = self._job_config(fl_ctx)
        if config:
            params = [Param(k, v) for k, v in flatten(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                client.log_batch(self._run_id, params=params[start:start + 100])
        self.log_info(fl_ctx, f"MLflow: experiment '{self.experiment_name}', run {self._run_id} at {uri}")

    def _job_config(self, fl_ctx: FLContext) -> dict[str, Any]:
        try:
            return dict(get_server_component(fl_ctx, self.server_id).config)
        except (RuntimeError, AttributeError, TypeError):
            return {}

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str) -> None:
        from mlflow.entities import Metric

        data = AnalyticsData.from_dxo(from_shareable(shareable))
        if data is None:
            return
        stamp, step = int(time.time() * 1000), int(data.step or 0)
        # A site's own stream is kept apart from the server's figures about it.
        prefix = "" if record_origin == fl_ctx.get_identity_name() else f"from/{record_origin}/"
        if data.data_type in _SCALAR_TYPES:
            self._pending.append(Metric(metric_key(prefix + data.tag), float(data.value), stamp, step))
        elif data.data_type in _DICT_TYPES:
            self._pending.extend(Metric(metric_key(f"{prefix}{data.tag}/{k}"), float(v), stamp, step)
                                 for k, v in data.value.items())

    def flush(self) -> None:
        """Write what arrived since the last flush: once per round and at the end of the run."""
        if self._client is None or not self._pending:
            return
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), 1000):  # MLflow's per-batch limit on metrics
            self._client.log_batch(self._run_id, metrics=pending[start:start + 1000])

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == AppEventType.ROUND_DONE and self._client is not None:
            try:
                with self._save_lock:
                    self.flush()
            except Exception as err:  # tracking must never stop a round
                self.log_warning(fl_ctx, f"MLflow: could not write this round's metrics: {err}")
            return
        super().handle_event(event_type, fl_ctx)

    def finalize(self, fl_ctx: FLContext) -> None:
        if self._client is None:
            return
        self.flush()
        self._client.set_terminated(self._run_id)
        self.log_info(fl_ctx, f"MLflow: run {self._run_id} closed")

