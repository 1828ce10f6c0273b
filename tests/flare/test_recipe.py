"""FedAnchorRecipe: jobs/ is its export, every component argument survives the export, folders load back, bad
arguments are refused with the fix, and in SimEnv the allow-list admits fedanchor before FLARE writes its default.

All fast (no FLARE process): building a recipe imports the components (torch) once, an export takes milliseconds."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from fedanchor.flare import jobs
from fedanchor.flare.recipe import COMPONENT_PATHS, EXECUTOR_ID, FedAnchorRecipe, init_parameters, load_class, load_recipe

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
MOTION = jobs.DEMO_JOBS["motion"]["config"]


def files_of(job_dir: Path) -> dict[str, object]:
    return {p.relative_to(job_dir).as_posix(): json.loads(p.read_text()) for p in sorted(job_dir.rglob("*")) if p.is_file()}


def exported_entries(job_dir: Path) -> dict[str, dict]:
    """component id -> its entry in the exported JSON (the filter as "basis_cache", the executor as "executor")."""
    server = json.loads((job_dir / "app/config/config_fed_server.json").read_text())
    client = json.loads((job_dir / "app/config/config_fed_client.json").read_text())
    entries = {e["id"]: e for e in server["components"] + server["workflows"]}
    (group,) = server["task_data_filters"]
    assert group["tasks"] == ["train"]
    (entries["basis_cache"],) = group["filters"]
    (executor,) = client["executors"]
    assert executor["tasks"] == ["train", "validate", "submit_model"]
    entries[EXECUTOR_ID] = executor["executor"]
    return entries


def init_values(obj) -> dict[str, object]:
    """What FedJob reads back for each __init__ argument: the attribute named like it (or with a leading _)."""
    attrs = vars(obj)
    return {name: attrs[name] if name in attrs else attrs.get(f"_{name}", "<not kept>")
            for name in init_parameters(type(obj))}


@pytest.mark.parametrize("name", sorted(jobs.DEMO_JOBS))
def test_jobs_folders_are_the_recipes_export(name, tmp_path):
    """jobs/<name>/ is byte for byte (parsed) what FedAnchorRecipe exports: `make jobs` regenerates it."""
    exported = FedAnchorRecipe.from_demo(name).export_folder(tmp_path / name)
    assert files_of(exported) == files_of(JOBS / name), f"jobs/{name} is stale: run `make jobs`"
    assert sorted(files_of(exported)) == ["app/config/config_fed_client.json", "app/config/config_fed_server.json",
                                          "meta.json"]  # package-only: no app/custom/
    meta = json.loads((exported / "meta.json").read_text())
    assert meta["scope"] == jobs.PRIVACY_SCOPE == "fedanchor"
    assert meta["name"] == f"fedanchor-{name}" and meta["deploy_map"] == {"app": ["@ALL"]}
    assert meta["min_clients"] == len(jobs.job_sites(jobs.read_job_config(exported)))


@pytest.mark.parametrize("name", sorted(jobs.DEMO_JOBS))
def test_every_component_argument_survives_the_export(name, tmp_path):
    """Each component FLARE builds from the exported JSON holds the same arguments as the recipe's object, and
    every argument the recipe set is spelt out in the JSON (FedJob leaves out values equal to the default)."""
    recipe = FedAnchorRecipe.from_demo(name)
    entries = exported_entries(recipe.export_folder(tmp_path / name))
    assert set(entries) == set(recipe.components)
    for component_id, obj in recipe.components.items():
        entry = entries[component_id]
        assert entry["path"] == COMPONENT_PATHS[component_id] == f"{type(obj).__module__}.{type(obj).__name__}"
        assert set(entry["args"]) == set(obj._always_serialize_args), component_id
        rebuilt = load_class(entry["path"])(**entry["args"])  # as FLARE's component builder does
        ours, theirs = init_values(obj), init_values(rebuilt)
        assert "<not kept>" not in ours.values(), f"{component_id}: an argument is kept under another name: {ours}"
        assert json.loads(json.dumps(theirs, default=str)) == json.loads(json.dumps(ours, default=str)), component_id
    sag = entries["scatter_and_gather"]["args"]
    assert (sag["num_rounds"], sag["min_clients"]) == (jobs.DEMO_JOBS[name]["num_rounds"], len(recipe.sites))
    as_json = json.loads(json.dumps(recipe.config))  # tuples (alignment.readout_blocks) are lists in JSON
    assert entries["fedanchor_server"]["args"]["config"] == entries[EXECUTOR_ID]["args"]["config"] == as_json
    assert ("cross_site_eval" in entries) == jobs.DEMO_JOBS[name].get("cross_site_eval", False)


def test_component_args_reach_the_job_and_a_folder_loads_back_with_them(tmp_path):
    recipe = FedAnchorRecipe("fedanchor-resumable", MOTION, 3, component_args={
        "persistor": {"checkpoint_dir": "/data/fedanchor/ckpt"}, "scatter_and_gather": {"train_timeout": 600}})
    job = recipe.export_folder(tmp_path / "job")
    entries = exported_entries(job)
    assert entries["persistor"]["args"]["checkpoint_dir"] == "/data/fedanchor/ckpt"
    assert entries["scatter_and_gather"]["args"]["train_timeout"] == 600
    loaded = FedAnchorRecipe.from_job_dir(job)
    assert (loaded.name, loaded.num_rounds, loaded.min_clients, loaded.tracking) == ("fedanchor-resumable", 3, 2, ("tensorboard",))
    assert loaded.components["persistor"].checkpoint_dir == "/data/fedanchor/ckpt"
    assert files_of(loaded.export_folder(tmp_path / "again")) == files_of(job)
    # an edit of a component's arguments in the folder is kept, as docs/FLARE.md ("After a server crash") describes
    server_file = job / "app/config/config_fed_server.json"
    server = json.loads(server_file.read_text())
    next(c for c in server["components"] if c["id"] == "persistor")["args"]["checkpoint_dir"] = "/elsewhere"
    server_file.write_text(json.dumps(server))
    assert FedAnchorRecipe.from_job_dir(job).components["persistor"].checkpoint_dir == "/elsewhere"


def test_a_hand_written_folder_of_earlier_versions_loads(tmp_path):
    """Job folders written before the recipe: {min_clients}/{num_rounds} placeholders, defaults spelt out, ids on
    executors. They load into the recipe they mean."""
    job = FedAnchorRecipe.from_demo("motion").export_folder(tmp_path / "job")
    server_file, (client_file,) = jobs.job_config_files(job)
    server = json.loads(server_file.read_text())
    sag = next(w for w in server["workflows"] if w["id"] == "scatter_and_gather")["args"]
    server.update(num_rounds=sag["num_rounds"], min_clients=sag["min_clients"])
    sag.update(num_rounds="{num_rounds}", min_clients="{min_clients}", allow_empty_global_weights=False)
    server_file.write_text(json.dumps(server, indent=2))
    client = json.loads(client_file.read_text())
    client["executors"][0]["executor"]["id"] = "executor"
    client_file.write_text(json.dumps(client, indent=2))
    meta = json.loads((job / "meta.json").read_text())
    (job / "meta.json").write_text(json.dumps(dict(meta, mandatory_clients=[])))
    recipe = FedAnchorRecipe.from_job_dir(job)
    assert (recipe.num_rounds, recipe.min_clients, recipe.cross_site_eval) == (2, 2, True)
    assert recipe.tracking == ("tensorboard", "mlflow")


def test_a_folder_with_more_than_the_recipe_writes_is_refused_naming_it(tmp_path):
    job = FedAnchorRecipe.from_demo("motion").export_folder(tmp_path / "job")
    server_file = job / "app/config/config_fed_server.json"
    server = json.loads(server_file.read_text())
    server["components"].append({"id": "extra", "path": "nvflare.app_common.widgets.streaming.AnalyticsReceiver", "args": {}})
    server_file.write_text(json.dumps(server))
    with pytest.raises(ValueError, match=r"config_fed_server.json/components/extra \(only in the folder\)"):
        FedAnchorRecipe.from_job_dir(job)
    with pytest.raises(FileNotFoundError, match="neither a demo job"):
        load_recipe(tmp_path / "nothing")
    assert load_recipe("motion").name == "fedanchor-motion"


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="fedanchor motion"), "name='fedanchor motion'"),
    (dict(num_rounds=0), "num_rounds=0"),
    (dict(num_rounds="2"), "num_rounds='2'"),
    (dict(config={"train": {"lrr": 0.1}}), "unknown config key\(s\) 'train.lrr'"),
    (dict(config=["trunk"]), "config must be a dict"),
    (dict(min_clients=3), "from 1 to the job's 2 sites"),
    (dict(tracking=("wandb",)), "may be named once"),
    (dict(cross_site_eval="yes"), "cross_site_eval='yes'"),
    (dict(component_args={"persistr": {}}), "does not hold"),
    (dict(component_args={"model_locator": {}}), "does not hold"),  # cross-site evaluation is off
    (dict(component_args={"persistor": {"checkpoint_folder": "/x"}}), r"\['checkpoint_folder'\] are not arguments"),
    (dict(component_args={"scatter_and_gather": {"num_rounds": 9}}), "recipe's own parameters"),
])
def test_bad_arguments_are_refused_with_the_fix(kwargs, message):
    args = dict(name="fedanchor-motion", config=MOTION, num_rounds=2) | kwargs
    with pytest.raises(ValueError, match=message):
        FedAnchorRecipe(**args)


def test_in_simenv_the_allow_list_admits_fedanchor_before_flare_writes_its_default(tmp_path):
    """SimEnv.deploy writes FLARE's default class_allow_list unless the workspace has one: process_env (which
    Recipe.run calls first) puts fedanchor's there, and SimEnv keeps it."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
    from nvflare.recipe.sim_env import SimEnv

    recipe = FedAnchorRecipe.from_demo("motion")
    env = SimEnv(clients=recipe.sites, workspace_root=str(tmp_path))
    recipe.process_env(env)
    workspace = tmp_path / "fedanchor-motion"
    SimEnv._ensure_default_component_policy(str(workspace))  # what SimEnv.deploy does next
    allow = json.loads((workspace / "local/resources.json").read_text())["class_allow_list"]
    assert allow == [*DEFAULT_CLASS_ALLOW_LIST, "fedanchor."]


def test_the_recipe_keeps_to_write_jobs_signature():
    """FedAnchorRecipe takes what jobs.write_job takes (a thin wrapper over it), so callers move over one to one."""
    write_job = inspect.signature(jobs.write_job).parameters
    recipe = inspect.signature(FedAnchorRecipe.__init__).parameters
    assert [p for p in write_job if p != "job_dir"] == [p for p in recipe if p not in ("self", "component_args")]
