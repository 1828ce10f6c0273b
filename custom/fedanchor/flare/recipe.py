"""``FedAnchorRecipe``: a fedanchor job as a FLARE 2.9 recipe, one Python object from the simulator to production.

    from fedanchor.flare.recipe import FedAnchorRecipe
    from nvflare.recipe.sim_env import SimEnv
    from nvflare.recipe.prod_env import ProdEnv

    recipe = FedAnchorRecipe("fedanchor-motion", {"data": {"scenario": "motion"}, "trunk": {"name": "tiny"}}, num_rounds=2)
    recipe.run(SimEnv(clients=recipe.sites, workspace_root="/tmp/fedanchor-sim"))     # the simulator
    recipe.run(ProdEnv(startup_kit_location="/opt/flare/lead@hospital.org", username="lead@hospital.org"))
    recipe.export_folder("jobs/motion")                                               # a job folder (jobs/)

The recipe holds a FedJob with the components fedanchor's jobs always had: ScatterAndGather, the shared
server component, persistor, shareable generator, aggregator, the ``BasisCacheFilter`` on the train task,
the tracking receivers and, optionally, cross-site evaluation; at the sites ``FedAnchorExecutor``. The job is
package-only (``set_app_packages(["fedanchor"])``: no app/custom/ folder), one app deployed to ``@ALL``, so an
exported folder is ``meta.json`` + ``app/config/config_fed_{server,client}.json``, and names the privacy scope
``fedanchor``. In the simulator ``process_env`` admits ``fedanchor.`` in the workspace's class allow-list before
FLARE writes its default one.

FedJob writes a component's arguments from its instance attributes and leaves out those equal to the class
default; the recipe marks every argument it sets as always written, so a job folder spells out what it runs with
(``checkpoint_dir``, ``memory_gc_rounds``, ...), and a later default cannot change a deployed job silently.

A job folder loads back into a recipe (``FedAnchorRecipe.from_job_dir``) when it is one that this recipe can
write, including edited arguments of its components (an absolute ``checkpoint_dir``, a ``train_timeout``);
anything else (another component, filter or class) is refused with the differences named.

``python -m fedanchor.flare.recipe simulate JOB_DIR --workspace-root DIR [--threads N]`` runs a job folder with
SimEnv in this process; ``fedanchor simulate`` starts it as a child process and reads its output.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import json
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType
from nvflare.recipe.spec import ExecEnv, Recipe

from . import jobs
from .jobs import (AGGREGATOR, BASIS_CACHE, CROSS_SITE_EVAL, CROSS_SITE_TABLE, DEFAULT_TRACKING, EXECUTOR, MLFLOW,
                   MODEL_LOCATOR, PACKAGE, PERSISTOR, PRIVACY_SCOPE, SAG, SERVER_COMPONENT, SHAREABLE_GENERATOR,
                   TENSORBOARD, TRACKERS)

EXECUTOR_ID = "executor"  # the key of the executor's arguments in ``component_args`` (FLARE's JSON gives it no id)
CLIENT_TASKS = ["train", "validate", "submit_model"]
TRAIN_TASK = "train"

# A site that asks for a task before the next round's is scheduled waits this long to ask again (FLARE's default
# 2 s is most of a short round). Hundreds of sites polling this often load the server: raise it there.
SERVER_PARAMS = {"server": {"task_request_interval": 0.5}}

# id -> class path of every component the recipe may hold (what ``component_args`` may name).
COMPONENT_PATHS = {
    "fedanchor_server": SERVER_COMPONENT,
    "persistor": PERSISTOR,
    "shareable_generator": SHAREABLE_GENERATOR,
    "aggregator": AGGREGATOR,
    "tensorboard": TENSORBOARD,
    "mlflow": MLFLOW,
    "model_locator": MODEL_LOCATOR,
    "cross_site_table": CROSS_SITE_TABLE,
    "scatter_and_gather": SAG,
    "cross_site_eval": CROSS_SITE_EVAL,
    "basis_cache": BASIS_CACHE,
    EXECUTOR_ID: EXECUTOR,
}
TRACKER_IDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
# Arguments the recipe's own parameters set; component_args may not contradict them.
RECIPE_OWNED = {"fedanchor_server": ("config",), EXECUTOR_ID: ("config",),
                "scatter_and_gather": ("num_rounds", "min_clients")}


def load_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments of ``cls.__init__`` (what a job's ``args`` may hold)."""
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _make(cls: type, args: Mapping[str, Any]) -> Any:
    """``cls(**args)``, with every given argument written to the job even where it equals the class default.

    FedJob (nvflare/job_config/fed_job_config.py ``_get_args``) writes an argument equal to its default only if
    the instance lists it in ``_always_serialize_args``.
    """
    obj = cls(**args)
    obj._always_serialize_args = tuple(args)
    return obj


class FedAnchorRecipe(Recipe):
    def __init__(self, name: str, config: Mapping[str, Any] | None, num_rounds: int, min_clients: int | None = None,
                 cross_site_eval: bool = False, tracking: Sequence[str] = DEFAULT_TRACKING,
                 component_args: Mapping[str, Mapping[str, Any]] | None = None):
        """
        Args:
            name: the job's name (letters, digits, '.', '_', '-'), e.g. "fedanchor-xray".
            config: fedanchor settings nested like ``fedanchor.config`` (only the keys that differ from the
                defaults); spelt out in full in the job, the same for the server and every site.
            num_rounds: training rounds (ScatterAndGather's num_rounds; also the config's ``rounds``).
            min_clients: sites the job needs; default: every site of the job (``data.sites`` or the scenario's).
            cross_site_eval: after training, every site scores the last and best global model (flare/cross_site.py).
            tracking: receivers of the round metrics, any of "tensorboard", "mlflow" (flare/tracking.py).
            component_args: per component id (``COMPONENT_PATHS``), arguments that replace the recipe's own, e.g.
                ``{"persistor": {"checkpoint_dir": "/data/ckpt"}, "scatter_and_gather": {"train_timeout": 600}}``.
        """
        _check_name(name)
        if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
            raise ValueError(f"num_rounds={num_rounds!r}: give the number of training rounds, a whole number >= 1")
        if config is not None and not isinstance(config, Mapping):
            raise ValueError(f"config must be a dict of fedanchor settings (e.g. {{'data': {{'scenario': 'xray'}}}}), "
                             f"got {type(config).__name__}")
        if not isinstance(cross_site_eval, bool):
            raise ValueError(f"cross_site_eval={cross_site_eval!r}: give True or False")
        tracking = _check_tracking(tracking)
        cfg = jobs.full_config(config, num_rounds)  # every key checked by config_from_dict, with the key named
        self.sites = list(jobs.job_sites(cfg))
        if min_clients is None:
            min_clients = len(self.sites)
        if isinstance(min_clients, bool) or not isinstance(min_clients, int) or not 1 <= min_clients <= len(self.sites):
            raise ValueError(f"min_clients={min_clients!r}: give a whole number from 1 to the job's {len(self.sites)} "
                             f"sites ({', '.join(self.sites)}), or None for all of them")
        overrides = _check_component_args(component_args or {}, cross_site_eval, tracking)

        self.config = cfg
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.cross_site_eval = cross_site_eval
        self.tracking = tracking
        self.component_args = copy.deepcopy(overrides)
        self.components: dict[str, Any] = {}  # id -> the component object in the job (the executor under "executor")

        job = FedJob(name=name, min_clients=min_clients, meta_props={"scope": PRIVACY_SCOPE})
        job.set_app_packages([PACKAGE])  # the sites import fedanchor from their installation: no app/custom/ copy
        self._build(job, overrides)
        super().__init__(job)

    # -- the job -------------------------------------------------------------------------------------------------
    def _component(self, component_id: str, args: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]]):
        obj = _make(load_class(COMPONENT_PATHS[component_id]), {**args, **overrides.get(component_id, {})})
        self.components[component_id] = obj
        return obj

    def _build(self, job: FedJob, overrides: Mapping[str, Mapping[str, Any]]) -> None:
        def server(component_id: str, args: Mapping[str, Any]) -> None:
            job.to_server(self._component(component_id, args, overrides), id=component_id)

        job.to_server(copy.deepcopy(SERVER_PARAMS))
        server("fedanchor_server", {"config": copy.deepcopy(self.config)})
        server("persistor", {"server_id": "fedanchor_server", "checkpoint_dir": "checkpoints"})
        server("shareable_generator", {})
        server("aggregator", {"server_id": "fedanchor_server", "min_sites": 1})
        for tracker in self.tracking:
            server(TRACKER_IDS[tracker], {
                # Every round's metrics to <run dir>/tensorboard.
                "tensorboard": {"tb_folder": "tensorboard"},
                # One MLflow run per job in <run dir>/mlflow.db; set tracking_uri to use a tracking server instead.
                "mlflow": {"tracking_uri": None, "experiment_name": "fedanchor"},
            }[tracker])
        if self.cross_site_eval:
            # After training: every site scores the last and the best global model on its anchors (cross_site.py).
            server("model_locator", {"persistor_id": "persistor"})
            server("cross_site_table", {})
        # U and V stay out of a site's train task while it holds them (basis_cache.py).
        job.to_server(self._component("basis_cache", {"server_id": "fedanchor_server"}, overrides),
                      filter_type=FilterType.TASK_DATA, tasks=[TRAIN_TASK])
        server("scatter_and_gather", {
            "min_clients": self.min_clients,
            "num_rounds": self.num_rounds,
            "start_round": 0,
            "wait_time_after_min_received": 0,
            "aggregator_id": "aggregator",
            "persistor_id": "persistor",
            "shareable_generator_id": "shareable_generator",
            "train_task_name": TRAIN_TASK,
            "train_timeout": 0,
            # A site that fails (bad data, crash) must not end the job: its error reply is dropped and the round
            # goes on with the others; the aggregator fails the round only below min_sites valid ones.
            "ignore_result_error": True,
            # FLARE's cost per round (bench --scale): notice the last result within 0.1 s instead of 0.5 s. A
            # gc.collect + malloc_trim (0.25-0.4 s with torch loaded) every 10th round, not every round: each round
            # leaves 1.5-2 MiB that only a collection frees; without any the server's job process grew 0.5-0.8
            # MiB a round over 80-100 rounds; with one every 10 its peaks stay within 590-611 MiB (bench
            # --server-memory, docs/results/cpu-server-memory).
            "task_check_period": 0.1,
            "memory_gc_rounds": 10,
        })
        if self.cross_site_eval:
            server("cross_site_eval", {"model_locator_id": "model_locator"})
        executor = self._component(EXECUTOR_ID, {"config": copy.deepcopy(self.config),
                                                 "site_config_file": "fedanchor_site.json"}, overrides)
        job.to_clients(executor, tasks=list(CLIENT_TASKS))

    # -- environments --------------------------------------------------------------------------------------------
    def process_env(self, env: ExecEnv) -> None:
        """In the simulator: admit ``fedanchor.`` in WS/local/resources.json before SimEnv writes FLARE's default
        list (it keeps a list that is already there); FLARE builds a job without custom code only from allowed
        classes. A deployment's sites list ``fedanchor.`` in their own kits (provision/site/resources.json)."""
        from nvflare.recipe.sim_env import SimEnv

        if isinstance(env, SimEnv):
            jobs.prepare_simulator_workspace(simulator_workspace(env, self.name))

    # FLARE scans a recipe's parameters and exported files for secret-looking values. A job on an anchor pack names
    # the pack's SHA-256 fingerprint (data.pack_fingerprint), a public digest the sites check, which the scan
    # takes for a secret; only that warning (a 64-character hex string) is silenced.
    def export(self, *args, **kwargs):
        with _fingerprints_are_not_secrets():
            return super().export(*args, **kwargs)

    def run(self, *args, **kwargs):
        with _fingerprints_are_not_secrets():
            return super().run(*args, **kwargs)

    # -- job folders -----------------------------------------------------------------------------------------------
    def export_folder(self, job_dir: str | Path) -> Path:
        """Export the job to exactly ``job_dir`` (``Recipe.export(root)`` writes ``root/<job name>``), replacing a job
        folder already there; a folder that is not a job folder (no meta.json) and not empty is left alone."""
        job_dir = Path(job_dir).resolve()
        if job_dir.exists() and any(job_dir.iterdir()) and not (job_dir / "meta.json").is_file():
            raise ValueError(f"{job_dir} holds files but no meta.json, so it is not a job folder to replace; "
                             "choose an empty or new folder")
        job_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".export-", dir=job_dir.parent) as staging:
            self.export(staging)
            if job_dir.exists():
                shutil.rmtree(job_dir)
            shutil.move(str(Path(staging) / self.name), str(job_dir))
        return job_dir

    @classmethod
    def from_demo(cls, name: str) -> "FedAnchorRecipe":
        """The recipe of ``jobs/<name>/``: an entry of ``jobs.DEMO_JOBS``."""
        if name not in jobs.DEMO_JOBS:
            raise ValueError(f"{name!r} is not a demo job; choose from {sorted(jobs.DEMO_JOBS)}")
        spec = jobs.DEMO_JOBS[name]
        return cls(f"fedanchor-{name}", spec["config"], spec["num_rounds"],
                   cross_site_eval=spec.get("cross_site_eval", False), tracking=spec.get("tracking", DEFAULT_TRACKING))

    @classmethod
    def from_job_dir(cls, job_dir: str | Path) -> "FedAnchorRecipe":
        """The recipe that writes ``job_dir``: read back from its meta.json and config files, then checked by
        exporting it and comparing (arguments filled with their defaults, ``{var}`` placeholders resolved, so
        folders written by earlier fedanchor versions load too). Raises ValueError naming what differs."""
        job_dir = Path(job_dir)
        meta = jobs.read_meta(job_dir)
        server_file, client_files = jobs.job_config_files(job_dir)
        server = resolved_app(json.loads(server_file.read_text()))
        config = jobs.read_job_config(job_dir)
        workflows = {w.get("id"): w for w in server.get("workflows", [])}
        sag = next((w for w in workflows.values() if w.get("path") == SAG), None)
        if sag is None:
            raise ValueError(f"{server_file}: no ScatterAndGather workflow ({SAG}); not a fedanchor job")
        receivers = {TENSORBOARD: "tensorboard", MLFLOW: "mlflow"}
        tracking = tuple(receivers[c["path"]] for c in server.get("components", []) if c.get("path") in receivers)
        component_args: dict[str, dict[str, Any]] = {}
        for entry in [*server.get("components", []), *server.get("workflows", [])]:
            if entry.get("id") in COMPONENT_PATHS and entry.get("path") == COMPONENT_PATHS[entry["id"]]:
                component_args[entry["id"]] = dict(entry.get("args", {}))
        for group in server.get("task_data_filters", []):
            for f in group.get("filters", []):
                if f.get("path") == BASIS_CACHE:
                    component_args["basis_cache"] = dict(f.get("args", {}))
        client = resolved_app(json.loads(client_files[0].read_text()))
        for entry in client.get("executors", []):
            if entry.get("executor", {}).get("path") == EXECUTOR:
                component_args[EXECUTOR_ID] = dict(entry["executor"].get("args", {}))
        sag_args = component_args.get("scatter_and_gather", sag.get("args", {}))
        num_rounds = sag_args.get("num_rounds", config.get("rounds"))
        if sag_args.get("min_clients", meta.get("min_clients")) != meta.get("min_clients"):
            raise ValueError(f"{job_dir}: ScatterAndGather's min_clients {sag_args.get('min_clients')} differs from "
                             f"meta.json's {meta.get('min_clients')}; make them equal")
        for component_id, owned in RECIPE_OWNED.items():
            for key in owned:
                component_args.get(component_id, {}).pop(key, None)
        try:
            recipe = cls(meta["name"], config, num_rounds, min_clients=meta.get("min_clients"),
                         cross_site_eval=CROSS_SITE_EVAL in {w.get("path") for w in workflows.values()},
                         tracking=tracking, component_args=component_args)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{job_dir} does not load as a FedAnchorRecipe: {err}") from None
        differences = recipe.differences_from(job_dir)
        if differences:
            raise ValueError(f"{job_dir} holds more than a FedAnchorRecipe writes, which would be lost; it differs at "
                             + "; ".join(differences[:8])
                             + ". Build the job with FedAnchorRecipe (component_args for component arguments), or "
                               "run the folder as it is with `nvflare simulator`")
        return recipe

    def differences_from(self, job_dir: str | Path) -> list[str]:
        """Where ``job_dir`` differs from this recipe's export (normalized: defaults filled, placeholders resolved)."""
        with tempfile.TemporaryDirectory(prefix="fedanchor-recipe-") as tmp:
            ours = self.export_folder(Path(tmp) / "job")
            return _differences(normalized_job(ours), normalized_job(Path(job_dir)))


@contextlib.contextmanager
def _fingerprints_are_not_secrets():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*high-entropy hex string '\*\*\*' \(64 chars\)")
        yield


def simulator_workspace(env: Any, job_name: str) -> Path:
    """The workspace SimEnv runs a job in (nvflare/recipe/sim_env.py: ``<workspace_root>/<job name>``)."""
    return Path(env.workspace_root) / job_name


def load_recipe(job: str | Path) -> FedAnchorRecipe:
    """A demo job's name (``motion``) or a job folder (``jobs/motion``, a folder ``fedanchor job new`` wrote)."""
    if str(job) in jobs.DEMO_JOBS and not Path(job).exists():
        return FedAnchorRecipe.from_demo(str(job))
    path = Path(job)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{job} is neither a demo job ({', '.join(sorted(jobs.DEMO_JOBS))}) nor a FLARE job "
                                "folder (no meta.json)")
    return FedAnchorRecipe.from_job_dir(path)


# -- checks ----------------------------------------------------------------------------------------------------------
def _check_name(name: Any) -> None:
    from nvflare.fuel.utils.validation_utils import check_job_name

    try:
        check_job_name("name", name)
    except (TypeError, ValueError) as err:
        raise ValueError(f"name={name!r}: {err}; e.g. 'fedanchor-xray'") from None


def _check_tracking(tracking: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tracking, str):
        tracking = (tracking,)
    tracking = tuple(tracking)
    unknown = [t for t in tracking if t not in TRACKERS]
    if unknown or len(set(tracking)) != len(tracking):
        raise ValueError(f"tracking={list(tracking)}: each of {list(TRACKERS)} may be named once "
                         f"(unknown: {unknown or 'none'}); e.g. tracking=('tensorboard', 'mlflow')")
    return tracking


def _check_component_args(component_args: Mapping[str, Mapping[str, Any]], cross_site_eval: bool,
                          tracking: Sequence[str]) -> dict[str, dict[str, Any]]:
    if not isinstance(component_args, Mapping):
        raise ValueError(f"component_args must map component ids to argument dicts, got {type(component_args).__name__}")
    present = set(COMPONENT_PATHS) - {"model_locator", "cross_site_table", "cross_site_eval", "tensorboard", "mlflow"}
    present |= {TRACKER_IDS[t] for t in tracking}
    if cross_site_eval:
        present |= {"model_locator", "cross_site_table", "cross_site_eval"}
    out = {}
    for component_id, args in component_args.items():
        if component_id not in present:
            raise ValueError(f"component_args names {component_id!r}, which this job does not hold; "
                             f"its components are {sorted(present)}")
        if not isinstance(args, Mapping):
            raise ValueError(f"component_args[{component_id!r}] must be a dict of arguments, got {type(args).__name__}")
        known = init_parameters(load_class(COMPONENT_PATHS[component_id]))
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"component_args[{component_id!r}]: {unknown} are not arguments of "
                             f"{COMPONENT_PATHS[component_id]}; it takes {sorted(known)}")
        owned = sorted(set(args) & set(RECIPE_OWNED.get(component_id, ())))
        if owned:
            raise ValueError(f"component_args[{component_id!r}] sets {owned}, which the recipe's own parameters "
                             "(config, num_rounds, min_clients) decide; set those instead")
        out[component_id] = dict(args)
    return out


# -- comparing job folders ---------------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def _resolve(value: Any, variables: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        match = _PLACEHOLDER.match(value)
        return variables[match.group(1)] if match and match.group(1) in variables else value
    if isinstance(value, list):
        return [_resolve(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, variables) for k, v in value.items()}
    return value


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, str):
        match = _PLACEHOLDER.match(value)
        return {match.group(1)} if match else set()
    if isinstance(value, list):
        return set().union(*(_placeholders(v) for v in value)) if value else set()
    if isinstance(value, dict):
        return set().union(*(_placeholders(v) for v in value.values())) if value else set()
    return set()


def _full_args(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A component entry with its args completed by the class's defaults (FedJob leaves defaults out)."""
    out = dict(entry)
    args = dict(entry.get("args", {}))
    path = entry.get("path")
    if isinstance(path, str):
        try:
            parameters = init_parameters(load_class(path))
        except (ImportError, AttributeError, ValueError):
            parameters = {}
        for name, parameter in parameters.items():
            if name not in args and parameter.default is not inspect.Parameter.empty:
                args[name] = parameter.default
    out["args"] = json.loads(json.dumps(args, default=str))  # tuples as lists, as in JSON
    return out


def resolved_app(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config_fed_{server,client}.json with its ``{var}`` placeholders replaced by the top-level values they name
    (which then go): what FLARE reads, as fedanchor's hand-written job folders spelt num_rounds and min_clients."""
    used = _placeholders(dict(config))
    variables = {k: v for k, v in config.items() if k in used}
    return {k: _resolve(v, variables) for k, v in config.items() if k not in used}


def normalized_app(config: Mapping[str, Any]) -> dict[str, Any]:
    """``resolved_app`` with every component's args completed by its class defaults and executor ids dropped."""
    out = resolved_app(config)
    for key in ("components", "workflows"):
        out[key] = [_full_args(c) for c in out.get(key, [])]
    for key in ("task_data_filters", "task_result_filters"):
        out[key] = [dict(g, filters=[_full_args(f) for f in g.get("filters", [])]) for g in out.get(key, [])]
    if "executors" in out:
        out["executors"] = [dict(e, executor={k: v for k, v in _full_args(e.get("executor", {})).items() if k != "id"})
                            for e in out["executors"]]
    return out


def normalized_job(job_dir: Path) -> dict[str, Any]:
    meta = dict(jobs.read_meta(job_dir))
    meta.setdefault("mandatory_clients", [])
    meta.setdefault("resource_spec", {})
    out: dict[str, Any] = {"meta.json": meta}
    for path in sorted(job_dir.rglob("*")):
        rel = path.relative_to(job_dir).as_posix()
        if path.is_file() and rel != "meta.json" and not path.name.startswith(".__nvfl_") and "__pycache__" not in rel:
            out[rel] = normalized_app(json.loads(path.read_text())) if path.suffix == ".json" else path.read_bytes()
    return out


def _differences(ours: Any, theirs: Any, where: str = "") -> list[str]:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(ours) | set(theirs), key=str):
            here = f"{where}/{key}" if where else str(key)
            if key not in ours:
                out.append(f"{here} (only in the folder)")
            elif key not in theirs:
                out.append(f"{here} (missing from the folder)")
            else:
                out += _differences(ours[key], theirs[key], here)
        return out
    if isinstance(ours, list) and isinstance(theirs, list):
        keyed = [{item.get("id"): item for item in side if isinstance(item, dict)} for side in (ours, theirs)]
        if all(None not in k and len(k) == len(side) for k, side in zip(keyed, (ours, theirs))):
            return _differences(*keyed, where)  # components and workflows: by id, whatever their order
        if len(ours) == len(theirs):
            return [d for i, (a, b) in enumerate(zip(ours, theirs)) for d in _differences(a, b, f"{where}[{i}]")]
    return [] if ours == theirs else [f"{where} (recipe {_short(ours)}, folder {_short(theirs)})"]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, bytes) else f"<{len(value)} bytes>"
    return text if len(text) <= 60 else text[:57] + "..."


# -- the simulator, in this process (what `fedanchor simulate` runs as its child) ------------------------------------
def simulate(job: str | Path, workspace_root: str | Path, threads: int | None = None,
             clients: Sequence[str] | None = None) -> Path:
    """Run a demo job or job folder with SimEnv (one client per site of the job); returns the workspace."""
    from nvflare.recipe.sim_env import SimEnv

    recipe = load_recipe(job)
    clients = list(clients or recipe.sites)
    env = SimEnv(clients=clients, num_threads=threads or len(clients), workspace_root=str(Path(workspace_root).resolve()))
    recipe.run(env)
    return simulator_workspace(env, recipe.name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedanchor.flare.recipe",
                                     description="Run a fedanchor job (a demo job's name or a job folder) in the FLARE "
                                                 "simulator through FedAnchorRecipe and SimEnv, or export it.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("simulate", help="run the job with SimEnv in this process")
    p.add_argument("job", help="a demo job's name (motion) or a job folder (jobs/motion)")
    p.add_argument("--workspace-root", required=True, help="SimEnv's workspace_root: the run is in <this>/<job name>")
    p.add_argument("--threads", type=int, default=None, help="clients run in parallel (default: one per site)")
    p.add_argument("--clients", default=None, help="comma-separated client names (default: the job's sites)")
    p = sub.add_parser("export", help="write the job folder")
    p.add_argument("job", help="a demo job's name or a job folder")
    p.add_argument("out", help="the job folder to write (replaced if it is a job folder)")
    args = parser.parse_args(argv)
    try:
        if args.command == "simulate":
            clients = [c.strip() for c in args.clients.split(",")] if args.clients else None
            print(f"simulation workspace {simulate(args.job, args.workspace_root, args.threads, clients)}")
        else:
            print(f"wrote {load_recipe(args.job).export_folder(args.out)}")
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"fedanchor recipe: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
