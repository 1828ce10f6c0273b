"""Cross-site evaluation of the final global models, as a job option (``jobs.write_job(cross_site_eval=True)``).

FLARE's ``CrossSiteModelEval`` sends each server model (the persistor's ``last``
and ``best`` checkpoints, found by ``FedAnchorModelLocator``) to every site as a
``validate`` task; the site scores it on its own modality's anchors against the
other modalities' anchor targets (``executor.anchor_validation``) and returns
metrics only. Site models are never collected: a site's model is the global
model plus its ``delta_site``, which never leaves. ``CrossSiteTable`` gathers the
results into ``<run dir>/cross_site_val/fedanchor_cross_site.json`` (site ->
model -> metrics). The classes carry fedanchor's name so that a server
allow-list of ``fedanchor.`` admits the workflow.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model_locator import ModelLocator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.widgets.widget import Widget

from .persistor import BEST_FILE, LAST_FILE, CheckpointError, load_state
from .shareable import state_to_dxo

RESULTS_FILE = "fedanchor_cross_site.json"
MODELS = {"last": LAST_FILE, "best": BEST_FILE}


class FedAnchorCrossSiteEval(CrossSiteModelEval):
    def __init__(self, model_locator_id: str = "model_locator", validation_timeout: int = 600,
                 wait_for_clients_timeout: int = 300):
        """
        Args:
            model_locator_id: id of the FedAnchorModelLocator component.
            validation_timeout: seconds a site has to score one model.
            wait_for_clients_timeout: seconds to wait for the sites to be connected.
        """
        super().__init__(model_locator_id=model_locator_id, submit_model_task_name="",
                         validation_task_name=AppConstants.TASK_VALIDATION, validation_timeout=validation_timeout,
                         wait_for_clients_timeout=wait_for_clients_timeout)


class FedAnchorModelLocator(ModelLocator):
    def __init__(self, persistor_id: str = "persistor"):
        """
        Args:
            persistor_id: id of the FedAnchorPersistor whose checkpoint folder holds last and best.
        """
        super().__init__()
        self.persistor_id = persistor_id

    def _folder(self, fl_ctx: FLContext) -> Path:
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        if persistor is None or not hasattr(persistor, "checkpoint_folder"):
            raise ValueError(f"component {self.persistor_id!r} is not a FedAnchorPersistor; set persistor_id")
        return persistor.checkpoint_folder(fl_ctx)

    def get_model_names(self, fl_ctx: FLContext) -> list[str]:
        folder = self._folder(fl_ctx)
        return [name for name, file in MODELS.items() if (folder / file).is_file()]

    def locate_model(self, model_name: str, fl_ctx: FLContext):
        if model_name not in MODELS:
            raise ValueError(f"model {model_name!r} is not one of {list(MODELS)}")
        try:
            return state_to_dxo(load_state(self._folder(fl_ctx) / MODELS[model_name]))
        except CheckpointError as err:
            self.log_error(fl_ctx, f"cannot load the {model_name} model for cross-site evaluation: {err}")
            return None


class CrossSiteTable(Widget):
    """Collects every validation result of the cross-site evaluation into one JSON table."""

    def __init__(self, results_file: str = RESULTS_FILE):
        super().__init__()
        self.results_file = results_file
        self._table: dict[str, dict[str, Any]] = {}

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != AppEventType.VALIDATION_RESULT_RECEIVED:
            return
        site = fl_ctx.get_prop(AppConstants.DATA_CLIENT)
        model = fl_ctx.get_prop(AppConstants.MODEL_OWNER)
        result = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
        entry: dict[str, Any]
        if result is None or result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            entry = {"error": str(result.get_return_code() if result is not None else "no result")}
        else:
            dxo = from_shareable(result)
            entry = {k: float(v) for k, v in (dxo.data or {}).items()} if dxo.data_kind == DataKind.METRICS else {"error": str(dxo.data_kind)}
        self._table.setdefault(str(site), {})[str(model)] = entry
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        path = run_dir / AppConstants.CROSS_VAL_DIR / self.results_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self._table, indent=1, sort_keys=True))
        self.log_info(fl_ctx, f"cross-site: {site} scored {model}: " + " ".join(
            f"{k}={v:.3f}" for k, v in entry.items() if isinstance(v, float) and k.endswith("recall@1")))
