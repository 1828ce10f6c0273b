"""FLARE job folders for fedanchor: the demo jobs, reading a folder's settings, a BYOC variant, the allow-list.

Jobs are written by one thing, ``FedAnchorRecipe`` (recipe.py), which exports a plain FLARE job folder with no
``custom/`` code::

    jobs/<scenario>/meta.json                            # name, min_clients, deploy_map {"app": ["@ALL"]}, scope
    jobs/<scenario>/app/config/config_fed_server.json   # ScatterAndGather + our server components
    jobs/<scenario>/app/config/config_fed_client.json   # FedAnchorExecutor

``DEMO_JOBS`` describes jobs/*/ (``make jobs`` = ``python -m fedanchor.flare.jobs write-demo-jobs jobs``
exports each as a recipe). Readers here find the apps through meta.json's deploy_map, so a folder with one app
per site (app_server, app_<site>) reads too.

Its components are classes of the installed ``fedanchor`` package, which a hospital admits by listing
``fedanchor.`` in its class allow-list. For sites that accept custom code instead, ``export_byoc`` copies a job
and bundles the package source under each app's ``custom/``::

    python -m fedanchor.flare.jobs export-byoc jobs/xray /tmp/xray-byoc
    fedanchor export-byoc jobs/xray /tmp/xray-byoc      # the same, from the fedanchor command

FLARE 2.9 enforces a class allow-list for jobs without custom code, in the simulator too; the recipe writes
WS/local/resources.json with FLARE's default list plus ``fedanchor.`` before SimEnv runs it
(``prepare-simulator WS`` does the same for ``nvflare simulator -w WS`` by hand).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import fedanchor

from ..config import config_from_dict, config_to_dict

PACKAGE = "fedanchor"
SERVER_COMPONENT = "fedanchor.flare.server_state.FedAnchorServerComponent"
PERSISTOR = "fedanchor.flare.persistor.FedAnchorPersistor"
SHAREABLE_GENERATOR = "fedanchor.flare.shareable.FedAnchorShareableGenerator"
AGGREGATOR = "fedanchor.flare.aggregator.FedAnchorAggregator"
TENSORBOARD = "fedanchor.flare.tb_receiver.FedAnchorTensorBoard"
MLFLOW = "fedanchor.flare.mlflow_receiver.FedAnchorMLflow"
BASIS_CACHE = "fedanchor.flare.basis_cache.BasisCacheFilter"
CROSS_SITE_EVAL = "fedanchor.flare.cross_site.FedAnchorCrossSiteEval"
MODEL_LOCATOR = "fedanchor.flare.cross_site.FedAnchorModelLocator"
CROSS_SITE_TABLE = "fedanchor.flare.cross_site.CrossSiteTable"
EXECUTOR = "fedanchor.flare.executor.FedAnchorExecutor"
SAG = "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather"

# The tiny motion settings that the test job and the deployment test's job share.
_MOTION: dict[str, Any] = {
    "trunk": {"name": "tiny"},
    "data": {"scenario": "motion", "n_anchors": 16, "n_test": 24},
    "train": {"local_steps": 8, "batch_size": 8},
    "precision": {"site_scalar_samples": 2},
    # One pass of the 5-fold readout choice: the automatic 13 reshuffles on 16 anchors cost seconds a round.
    "alignment": {"readout_repeats": 1},
}

# The demo jobs: what jobs/<name>/ holds. Only the keys that differ from fedanchor's defaults.
DEMO_JOBS: dict[str, dict[str, Any]] = {
    # The test job: tiny random trunk, two sites, seconds per round.
    "motion": {
        "num_rounds": 2,
        "cross_site_eval": True,  # after training, each site scores the last and best global models on its anchors
        "tracking": ("tensorboard", "mlflow"),  # <run dir>/tensorboard and <run dir>/mlflow.db
        # a basis refresh every 2 rounds: round 0 gathers projected gradients, round 1 trains the augmented cores
        "config": {**_MOTION, "adapter": {"refresh_every": 2, "refresh_tolerance": 0.2, "rank_max": 12}},
    },
    # MiniLM trunk; hospital-a and hospital-b hold reports, hospital-c findings. Sized for a 2-core CPU (see docs/FLARE.md).
    "xray": {
        "num_rounds": 3,
        "config": {
            "data": {"scenario": "xray", "n_test": 500, "max_private_per_site": 300},
            "train": {"local_steps": 12, "batch_size": 16},
            "alignment": {"anchor_batch": 32},
        },
    },
    # The deployment test's job (tests/deployment): motion on the tiny trunk, dealt to the provisioned hospitals.
    "hospitals-motion": {
        "num_rounds": 2,
        "config": {**_MOTION, "data": {**_MOTION["data"],
                                       "sites": {"hospital-a": "accel", "hospital-b": "gyro", "hospital-c": "accel"}}},
    },
    # Two image sites (pixels) and two vector sites (Zernike moments), tiny trunk.
    "digits": {
        "num_rounds": 3,
        "config": {
            "trunk": {"name": "tiny"},
            "data": {"scenario": "digits", "n_anchors": 100, "n_test": 200, "max_private_per_site": 300},
            "train": {"local_steps": 10, "batch_size": 16},
        },
    },
    # Sixteen hospitals: eight image sites and eight Zernike sites, tiny trunk, small shards.
    "digits16": {
        "num_rounds": 2,
        "config": {
            "trunk": {"name": "tiny", "embed_dim": 32},
            "adapter": {"rank": 4},
            "alignment": {"readout_repeats": 1, "anchor_batch": 16, "codebook_temperature": 0.2},
            "data": {"scenario": "digits", "n_anchors": 100, "n_test": 200, "max_private_per_site": 60,
                     "sites": {f"hospital-{i:02d}": ("pixels" if i % 2 else "zernike") for i in range(1, 17)}},
            "train": {"local_steps": 8, "batch_size": 16},
            "precision": {"window": 4, "site_scalar_samples": 2, "site_scalar_anchors": 8},
        },
    },
}


def full_config(values: Mapping[str, Any] | None, num_rounds: int | None = None) -> dict[str, Any]:
    """Every key spelt out (checked by config_from_dict), so both sides of the job read the same settings."""
    cfg = config_to_dict(config_from_dict(values or {}))
    if num_rounds is not None:
        cfg["rounds"] = num_rounds
    cfg["adapter"]["targets"] = list(cfg["adapter"]["targets"])
    return cfg


def job_sites(config: Mapping[str, Any]) -> dict[str, str]:
    from ..federation.loop import site_modality

    return site_modality(config_from_dict(config))


TRACKERS = ("tensorboard", "mlflow")
DEFAULT_TRACKING = ("tensorboard",)  # every job writes TensorBoard; MLflow when the job asks for it

# The privacy scope every fedanchor job asks for. A site with a local/privacy.json must define it (else it refuses
# the job); provision/site/privacy.json does, and puts fedanchor's release filter on every task result in it.
PRIVACY_SCOPE = "fedanchor"


def write_job(job_dir: str | Path, name: str, config: Mapping[str, Any] | None = None, num_rounds: int = 3,
              min_clients: int | None = None, cross_site_eval: bool = False,
              tracking: Sequence[str] = DEFAULT_TRACKING) -> Path:
    """``FedAnchorRecipe(name, config, num_rounds, ...).export_folder(job_dir)``: the job folder for ``config``;
    min_clients defaults to the number of sites (see FLARE-NOTES)."""
    from .recipe import FedAnchorRecipe

    return FedAnchorRecipe(name, config, num_rounds, min_clients=min_clients, cross_site_eval=cross_site_eval,
                           tracking=tracking).export_folder(job_dir)


def write_demo_job(root: str | Path, name: str) -> Path:
    """(Re)write <root>/<name>/ as DEMO_JOBS[name] describes it, exported from its recipe."""
    from .recipe import FedAnchorRecipe

    return FedAnchorRecipe.from_demo(name).export_folder(Path(root) / name)


def write_demo_jobs(root: str | Path) -> list[Path]:
    """(Re)write every jobs/<name>/ of DEMO_JOBS."""
    return [write_demo_job(root, name) for name in DEMO_JOBS]


def read_meta(job_dir: str | Path) -> dict[str, Any]:
    meta_file = Path(job_dir) / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{job_dir} is not a FLARE job folder (no meta.json)")
    return json.loads(meta_file.read_text())


def job_config_files(job_dir: str | Path) -> tuple[Path, list[Path]]:
    """(the server's config_fed_server.json, every client app's config_fed_client.json) of a job folder, found
    through meta.json's deploy_map (one app for @ALL, or app_server and an app per site)."""
    job_dir = Path(job_dir)
    deploy_map = read_meta(job_dir).get("deploy_map") or {}
    servers, clients = [], []
    for app in deploy_map:
        config_dir = job_dir / app / "config"
        if not config_dir.is_dir():
            raise FileNotFoundError(f"{job_dir}/meta.json deploys app {app!r}, but {config_dir} does not exist")
        servers += [p for p in [config_dir / "config_fed_server.json"] if p.is_file()]
        clients += [p for p in [config_dir / "config_fed_client.json"] if p.is_file()]
    if len(servers) != 1 or not clients:
        raise FileNotFoundError(f"{job_dir}: expected one app with config_fed_server.json and at least one with "
                                f"config_fed_client.json among the apps of meta.json's deploy_map {deploy_map}, found "
                                f"{len(servers)} and {len(clients)}")
    return servers[0], clients


def read_job_config(job_dir: str | Path) -> dict[str, Any]:
    """The job's fedanchor settings; fails if the server's and the sites' copies differ."""
    server_file, client_files = job_config_files(job_dir)
    server = json.loads(server_file.read_text())
    server_cfg = next((c["args"]["config"] for c in server.get("components", []) if c.get("path") == SERVER_COMPONENT), None)
    if server_cfg is None:
        raise ValueError(f"{server_file}: no {SERVER_COMPONENT} with a config; not a fedanchor job")
    for client_file in client_files:
        client = json.loads(client_file.read_text())
        client_cfg = next((e["executor"]["args"].get("config") for e in client.get("executors", [])
                           if e.get("executor", {}).get("path") == EXECUTOR), None)
        if server_cfg != client_cfg:
            raise ValueError(f"{job_dir}: the fedanchor config in {server_file.relative_to(Path(job_dir))} and "
                             f"{client_file.relative_to(Path(job_dir))} differ")
    return server_cfg


def package_source_dir() -> Path:
    return Path(fedanchor.__file__).resolve().parent


def export_byoc(job_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Copy a job to ``out_dir`` and bundle the fedanchor package source under each app's custom/ folder.

    For sites that accept custom code (BYOC): they still need fedanchor's dependencies (torch, transformers,
    safetensors, nvflare and the data/weight packages) installed, but not fedanchor itself.
    """
    job_dir, out_dir = Path(job_dir), Path(out_dir)
    meta_file = job_dir / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{job_dir} is not a FLARE job folder (no meta.json)")
    if out_dir.exists():
        if not force:
            raise FileExistsError(f"{out_dir} exists; choose another folder or pass --force")
        shutil.rmtree(out_dir)
    shutil.copytree(job_dir, out_dir, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    meta = json.loads(meta_file.read_text())
    meta["name"] = f"{meta.get('name', job_dir.name)}-byoc"
    _write_json(out_dir / "meta.json", meta)
    source = package_source_dir()
    for app in meta.get("deploy_map") or {}:
        if not (out_dir / app).is_dir():
            raise FileNotFoundError(f"{job_dir}: deploy_map names app {app!r} but there is no such folder")
        target = out_dir / app / "custom" / PACKAGE
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return out_dir


def allow_fedanchor(resources_file: str | Path) -> Path:
    """Admit ``fedanchor.`` classes in a site's local/resources.json (created with FLARE's default list if absent).

    FLARE 2.9 builds a job without custom code only from classes in the site's class allow-list; the default
    list (about 88 FLARE classes) does not hold ours. A trailing dot admits the whole package.
    """
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    path = Path(resources_file)
    resources: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    allow = list(resources.get("class_allow_list", DEFAULT_CLASS_ALLOW_LIST))
    if f"{PACKAGE}." not in allow:
        allow.append(f"{PACKAGE}.")
    resources["class_allow_list"] = allow
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, resources)
    return path


def prepare_simulator_workspace(workspace: str | Path) -> Path:
    """Make the simulator accept fedanchor jobs in WORKSPACE: WORKSPACE/local/resources.json admits fedanchor.

    The simulator keeps WORKSPACE/local/ between runs and copies it into every site's and the server's local/.
    ``FedAnchorRecipe.process_env`` calls it on a SimEnv's workspace; by hand, before ``nvflare simulator -w WS``.
    """
    return allow_fedanchor(Path(workspace) / "local" / "resources.json")


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``export-byoc JOB_DIR OUT_DIR [--force]``: a BYOC copy of a job with the fedanchor source in app/custom/."""
    parser = argparse.ArgumentParser(prog="fedanchor export-byoc",
                                     description="Copy a fedanchor FLARE job and bundle the fedanchor package source "
                                                 "under app/custom/ for sites that allow custom code.")
    parser.add_argument("job_dir", help="a job folder, e.g. jobs/xray")
    parser.add_argument("out_dir", help="where to write the BYOC job (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    args = parser.parse_args(argv)
    try:
        out = export_byoc(args.job_dir, args.out_dir, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"export-byoc: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (fedanchor {getattr(fedanchor, '__version__', '')} source under app/custom/{PACKAGE})")
    return 0


def _module_main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedanchor.flare.jobs export-byoc JOB OUT`` | ``prepare-simulator WORKSPACE`` | ``write-demo-jobs ROOT``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("export-byoc", "prepare-simulator", "write-demo-jobs")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m fedanchor.flare.jobs {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "export-byoc":
        return main(rest)
    if len(rest) != 1:
        print(f"usage: python -m fedanchor.flare.jobs {command} FOLDER", file=sys.stderr)
        return 2
    if command == "prepare-simulator":
        print(f"wrote {prepare_simulator_workspace(rest[0])} (class_allow_list admits {PACKAGE}.)")
    else:
        for path in write_demo_jobs(rest[0]):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_module_main())
