"""fedanchor on NVIDIA FLARE: checkpoint files, the shareable round-trip, site settings, and the real simulator."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_png_drawn
from fedanchor.federation.messages import GlobalState, SiteUpdate
from fedanchor.flare import jobs
from fedanchor.flare.persistor import (BEST_FILE, LAST_FILE, CheckpointError, atomic_write_bytes, latest_state,
                                       load_state, save_state)
from fedanchor.flare.shareable import (FedAnchorShareableGenerator, dxo_to_state, dxo_to_update, learnable_to_state,
                                       state_to_dxo, state_to_learnable, update_to_dxo)
from fedanchor.flare.site_config import SiteConfig, SiteConfigError, load_site_config, resolve_shard

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"


def make_state(round_: int = 3, seed: int = 0) -> GlobalState:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "adapter/layer.0.query/S": torch.randn(4, 4, generator=g),
        "adapter/layer.0.query/m": torch.rand(8, generator=g),
        "adapter/layer.0.query/U": torch.randn(8, 4, generator=g),
        "projector/accel/weight": torch.randn(6, 3, generator=g),
        "consensus/gram_upper": torch.rand(10, generator=g),
        "targets/gyro": torch.randn(4, 5, generator=g),
    }
    return GlobalState(round=round_, anchor_fingerprint="f" * 64, tensors=tensors, meta={"eval": {"a->b/recall@1": 0.5}})


def make_update() -> SiteUpdate:
    g = torch.Generator().manual_seed(1)
    params = {"adapter/layer.0.query/S": torch.randn(4, 4, generator=g), "adapter/layer.0.query/m": torch.rand(8, generator=g),
              "projector/accel/weight": torch.randn(6, 3, generator=g)}
    precision = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) + 0.1 for k, v in params.items() if k.startswith("adapter/")}
    return SiteUpdate(site="site-1", modality="accel", round=2, anchor_fingerprint="f" * 64, params=params,
                      precision=precision, gram_upper=torch.rand(10, generator=g), n_samples=20, uncertainty=3.5,
                      metrics={"loss/loss": 1.25})


def assert_same_state(a: GlobalState, b: GlobalState) -> None:
    assert (a.round, a.anchor_fingerprint) == (b.round, b.anchor_fingerprint)
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k


# -- fast: checkpoint files ------------------------------------------------------
def test_checkpoint_round_trip_keeps_tensors_and_meta(tmp_path):
    state = make_state()
    save_state(tmp_path / "round-0003.safetensors", state)
    loaded = load_state(tmp_path / "round-0003.safetensors")
    assert_same_state(state, loaded)
    assert loaded.meta == state.meta
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"


def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new content")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_latest_state_falls_back_past_damaged_files(tmp_path, caplog):
    for r in (1, 2, 3):
        save_state(tmp_path / f"round-{r:04d}.safetensors", make_state(r, seed=r))
    save_state(tmp_path / LAST_FILE, make_state(3, seed=3))
    assert latest_state(tmp_path).round == 3
    # a cut-short newest round and a garbled last file: round 2 is the newest complete state
    data = (tmp_path / "round-0003.safetensors").read_bytes()
    (tmp_path / "round-0003.safetensors").write_bytes(data[: len(data) // 2])
    garbled = bytearray((tmp_path / LAST_FILE).read_bytes())
    garbled[-5] ^= 0xFF
    (tmp_path / LAST_FILE).write_bytes(bytes(garbled))
    with pytest.raises(CheckpointError):
        load_state(tmp_path / LAST_FILE)
    with caplog.at_level("WARNING"):
        state = latest_state(tmp_path)
    assert state.round == 2
    assert_same_state(state, make_state(2, seed=2))
    assert "falling back" in caplog.text
    assert latest_state(tmp_path / "nothing-here") is None


# -- fast: what travels ----------------------------------------------------------
def test_global_state_round_trips_through_dxo_learnable_and_generator():
    state = make_state()
    assert_same_state(state, dxo_to_state(state_to_dxo(state, {"job_config": {"rounds": 2}})))
    learnable = state_to_learnable(state, {"job_config": {"rounds": 2}})
    assert_same_state(state, learnable_to_state(learnable))
    generator = FedAnchorShareableGenerator()
    shareable = generator.learnable_to_shareable(learnable, fl_ctx=None)
    back = generator.shareable_to_learnable(shareable, fl_ctx=None)
    restored = learnable_to_state(back)
    assert_same_state(state, restored)
    assert restored.meta["job_config"] == {"rounds": 2} and restored.meta["eval"] == state.meta["eval"]


def test_site_update_round_trips_and_refuses_extra_entries():
    update = make_update()
    dxo = update_to_dxo(update)
    back = dxo_to_update(dxo)
    assert (back.site, back.modality, back.round, back.n_samples, back.uncertainty) == ("site-1", "accel", 2, 20, 3.5)
    for k, v in update.params.items():
        assert torch.equal(back.params[k], v)
    assert back.metrics == update.metrics
    dxo.data["private/embeddings"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="unexpected entries"):
        dxo_to_update(dxo)
    with pytest.raises(ValueError, match="COLLECTION"):
        dxo_to_update(state_to_dxo(make_state()))


# -- fast: the site's own settings and the job folders --------------------------------
def test_site_shard_resolution():
    sites = {"hospital-a": "report", "hospital-b": "report", "hospital-c": "findings"}
    assert resolve_shard("hospital-c", SiteConfig(), sites) == ("hospital-c", "findings")
    assert resolve_shard("site-3", SiteConfig(), sites) == ("hospital-c", "findings")  # simulator / POC names
    with pytest.raises(SiteConfigError, match="not in the job's site list"):
        resolve_shard("site-4", SiteConfig(), sites)
    with pytest.raises(SiteConfigError, match="modality 'findings'"):
        resolve_shard("hospital-a", SiteConfig.from_dict({"modality": "findings"}), sites)


def test_site_config_file_errors_are_clear(tmp_path):
    assert load_site_config(tmp_path / "absent.json") == SiteConfig()
    path = tmp_path / "fedanchor_site.json"
    path.write_text(json.dumps({"modality": "report", "data": {"source": "bundled", "shard": "hospital-b"}, "device": "cpu"}))
    cfg = load_site_config(path)
    assert (cfg.modality, cfg.data.shard, cfg.device) == ("report", "hospital-b", "cpu")
    path.write_text(json.dumps({"modaliti": "report"}))
    with pytest.raises(SiteConfigError, match="unknown key"):
        load_site_config(path)
    path.write_text(json.dumps({"data": {"source": "folder", "path": "/data/fedanchor"}}))
    assert load_site_config(path).data.path == "/data/fedanchor"
    path.write_text(json.dumps({"data": {"source": "folder"}}))
    with pytest.raises(SiteConfigError, match="needs data.path"):
        load_site_config(path)
    path.write_text(json.dumps({"data": {"path": "/data/fedanchor"}}))
    with pytest.raises(SiteConfigError, match="set data.source to 'folder'"):
        load_site_config(path)


@pytest.mark.parametrize("name", sorted(jobs.DEMO_JOBS))
def test_job_folders_are_plain_and_match_their_definition(name, tmp_path):
    job = JOBS / name
    assert not list(job.rglob("custom")), "a fedanchor job must not need custom code"
    config = jobs.read_job_config(job)  # server and client copies agree
    meta = json.loads((job / "meta.json").read_text())
    n_sites = len(jobs.job_sites(config))
    assert meta["min_clients"] == n_sites and meta["deploy_map"] == {"app": ["@ALL"]}
    server_file, client_files = jobs.job_config_files(job)
    assert server_file == job / "app/config/config_fed_server.json" and client_files == [job / "app/config/config_fed_client.json"]
    sag = next(w for w in json.loads(server_file.read_text())["workflows"] if w["path"] == jobs.SAG)["args"]
    assert sag["min_clients"] == n_sites and sag["wait_time_after_min_received"] == 0
    # jobs/<name> is what DEMO_JOBS describes, exported from its recipe (regenerate with `make jobs`)
    fresh = jobs.write_demo_job(tmp_path, name)
    for rel in ("meta.json", "app/config/config_fed_server.json", "app/config/config_fed_client.json"):
        assert json.loads((fresh / rel).read_text()) == json.loads((job / rel).read_text()), rel


def test_export_byoc_bundles_the_package(tmp_path):
    out = jobs.export_byoc(JOBS / "motion", tmp_path / "motion-byoc")
    assert (out / "app/custom/fedanchor/flare/executor.py").is_file()
    assert (out / "app/custom/fedanchor/federation/server.py").is_file()
    assert not list(out.rglob("__pycache__"))
    assert json.loads((out / "meta.json").read_text())["name"] == "fedanchor-motion-byoc"
    assert jobs.main([str(JOBS / "motion"), str(tmp_path / "motion-byoc")]) == 2  # exists, no --force
    assert jobs.main([str(JOBS / "motion"), str(tmp_path / "motion-byoc"), "--force"]) == 0


# -- executor and server components outside FLARE's runtime (tiny trunk, motion) ------------------
class FakeEngine:
    """Just enough of a FLARE engine for one component: a workspace, events and other components."""

    def __init__(self, workspace, components=None):
        self.workspace, self.components, self.events = workspace, dict(components or {}), []

    def get_workspace(self):
        return self.workspace

    def get_component(self, component_id):
        return self.components.get(component_id)

    def fire_event(self, event_type, fl_ctx):
        self.events.append(event_type)


def fake_ctx(root: Path, name: str, components=None):
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.workspace import Workspace

    for sub in ("startup", "local"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    engine = FakeEngine(Workspace(str(root), site_name=name), components)
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, name, private=True, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, "job-1", private=True, sticky=False)
    return ctx


def test_components_train_validate_submit_and_keep_delta_site(tmp_path):
    from nvflare.apis.dxo import DataKind, from_shareable
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import ReservedKey, ReturnCode
    from nvflare.apis.signal import Signal

    from fedanchor.flare.aggregator import FedAnchorAggregator
    from fedanchor.flare.executor import FedAnchorExecutor
    from fedanchor.flare.persistor import FedAnchorPersistor
    from fedanchor.flare.server_state import FedAnchorServerComponent

    config = jobs.read_job_config(JOBS / "motion")
    component = FedAnchorServerComponent(config=config)
    persistor, aggregator = FedAnchorPersistor(), FedAnchorAggregator()
    server_ctx = fake_ctx(tmp_path / "server", "server", {"fedanchor_server": component})
    task = FedAnchorShareableGenerator().learnable_to_shareable(persistor.load_model(server_ctx), server_ctx)

    site_ctx = fake_ctx(tmp_path / "site-1", "site-1")
    executor = FedAnchorExecutor(config=config)
    executor.handle_event(EventType.START_RUN, site_ctx)
    result = executor.execute("train", task, site_ctx, Signal())
    assert from_shareable(result).data_kind == DataKind.COLLECTION
    from fedanchor.flare.filters import update_violation

    assert update_violation(result) is None  # what the executor sends passes the site's release filter
    result.set_peer_props({ReservedKey.IDENTITY_NAME: "site-1"})
    assert aggregator.accept(result, server_ctx)
    assert not aggregator.accept(result, server_ctx)  # the same site twice in one round
    forged = executor.execute("train", task, site_ctx, Signal())
    forged.set_peer_props({ReservedKey.IDENTITY_NAME: "site-2"})
    assert not aggregator.accept(forged, server_ctx)  # claims to be site-1, sent by site-2
    new_state = shareable_to_state_checked(aggregator.aggregate(server_ctx))
    assert new_state.round == 1 and "eval" in new_state.meta
    summary = json.loads((tmp_path / "server/job-1/fedanchor_summary.json").read_text())
    assert summary["rounds"][0]["accepted"] == ["site-1"] and "site-2" in summary["rounds"][0]["rejected"]

    delta_file = next((tmp_path / "site-1/job-1/fedanchor").glob("delta_site-*.safetensors"))
    delta = executor._trainer.local_state()
    assert any(float(v.abs().sum()) > 0 for v in delta.values())

    metrics = from_shareable(executor.execute("validate", task, site_ctx, Signal()))
    assert metrics.data_kind == DataKind.METRICS and "anchor/accel->gyro/recall@1" in metrics.data
    submitted = from_shareable(executor.execute("submit_model", task, site_ctx, Signal()))
    assert submitted.data_kind == DataKind.WEIGHTS and not [k for k in submitted.data if "delta" in k]

    aborted = Signal()
    aborted.trigger("stop")
    assert executor.execute("train", task, site_ctx, aborted).get_return_code() == ReturnCode.TASK_ABORTED
    for k, v in executor._trainer.local_state().items():
        assert torch.equal(v, delta[k]), "an aborted round must not change delta_site"

    restarted = FedAnchorExecutor(config=config)  # a restarted site picks up its delta_site
    restarted.handle_event(EventType.START_RUN, site_ctx)
    for k, v in restarted._trainer.local_state().items():
        assert torch.equal(v, delta[k])
    assert delta_file.exists()
    # ... and the bases it held, so a task sent without them (flare/basis_cache.py) still trains
    sent = shareable_to_state_checked(task)
    light = state_to_dxo(sent.without_basis()).to_shareable()
    assert restarted._trainer.basis_digest == sent.basis_digest()
    assert from_shareable(restarted.execute("train", light, site_ctx, Signal())).data_kind == DataKind.COLLECTION
    newcomer_ctx = fake_ctx(tmp_path / "site-2-new", "site-2")  # holds nothing: refuses, with the reason
    newcomer = FedAnchorExecutor(config=config)
    newcomer.handle_event(EventType.START_RUN, newcomer_ctx)
    assert newcomer.execute("train", light, newcomer_ctx, Signal()).get_return_code() == ReturnCode.BAD_TASK_DATA

    other = dict(config, train=dict(config["train"], lr=0.5))  # a site whose job copy differs
    odd = FedAnchorExecutor(config=other)
    odd.handle_event(EventType.START_RUN, fake_ctx(tmp_path / "site-2", "site-2"))
    assert odd.execute("train", task, fake_ctx(tmp_path / "site-2", "site-2"), Signal()).get_return_code() == ReturnCode.BAD_TASK_DATA

    ctx3 = fake_ctx(tmp_path / "site-9", "site-9")  # not in the job's site list: fails at START_RUN, clearly
    lost = FedAnchorExecutor(config=config)
    lost.handle_event(EventType.START_RUN, ctx3)
    assert "not in the job's site list" in lost._setup_error
    assert lost.execute("train", task, ctx3, Signal()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION


def shareable_to_state_checked(shareable):
    from fedanchor.flare.shareable import shareable_to_state

    return shareable_to_state(shareable)


# -- slow: the real FLARE simulator ------------------------------------------------
def run_recipe_simulation(job: Path, workspace_root: Path, clients: str | None = None):
    """`python -m fedanchor.flare.recipe simulate`: the job folder loaded into its recipe and run with SimEnv."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "fedanchor.flare.recipe", "simulate", str(job), "--workspace-root", str(workspace_root)]
    return subprocess.run(command + (["--clients", clients] if clients else []), env=env, cwd=workspace_root.parent,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_simulation_past_its_timeout_is_stopped_with_every_process_it_started(tmp_path):
    """FLARE's simulator waits for ever for a simulated site whose process died: `simulate(timeout=...)` stops the
    whole simulation (the recipe's child process, the simulator, which runs in a process group of its own, and its
    site processes) and says so. (Had it left the simulator running, reading its output would never end: the call
    would not return.)"""
    from fedanchor.simulate import simulate

    # The motion job itself can end in about as long as the timeout on a quiet machine: 200 rounds of it cannot.
    job = jobs.write_job(tmp_path / "job", "fedanchor-long", jobs.read_job_config(JOBS / "motion"), num_rounds=200)
    out = tmp_path / "stopped"
    seen: list[list[str]] = []  # the simulation's processes while it ran: the timeout must have had something to stop

    def watch() -> None:
        while not stop_watching.is_set():
            running = [_cmdline(p) for p in Path("/proc").glob("[0-9]*") if str(out) in _cmdline(p)]
            if running:
                seen.append(running)
            time.sleep(0.5)

    import threading

    stop_watching = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(TimeoutError, match="did not end within 25s"):
            simulate(job, out, echo=lambda _line: None, timeout=25)
    finally:
        stop_watching.set()
        watcher.join()
    assert any("nvflare.private.fed.app.simulator.simulator" in c for running in seen for c in running), seen[-1:]
    time.sleep(1)
    left = [p for p in Path("/proc").glob("[0-9]*") if str(out) in _cmdline(p)]
    assert not left, [(_cmdline(p)) for p in left]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # it ended while we looked
        return ""


@pytest.mark.slow
def test_motion_job_in_the_flare_simulator(tmp_path):
    """`fedanchor simulate` (what `make demo` runs): jobs/motion loaded into its FedAnchorRecipe, run with SimEnv in a
    child process whose output it reads."""
    from fedanchor.simulate import simulate

    out = tmp_path / "run"
    lines: list[str] = []
    summary = simulate(JOBS / "motion", out, echo=lines.append, timeout=900)
    workspace = out / "fedanchor-motion"  # SimEnv's <workspace_root>/<job name>
    assert summary["workspace"] == str(workspace)
    assert "fedanchor." in json.loads((workspace / "local/resources.json").read_text())["class_allow_list"]
    run_dir = workspace / "server" / "simulate_job"
    assert (run_dir / "fedanchor_summary.json").is_file()
    assert sum("round " in line for line in lines) == 2, lines  # one line of progress per round
    assert (out / "results.json").is_file()
    assert_png_drawn(out / "rounds.png", (15, 4.2))
    assert_png_drawn(out / "embeddings.png", (6.5, 6))
    # every round's metrics went to TensorBoard through FLARE's analytics events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run_dir / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval/accel->gyro/recall@1", "weight/site-1", "site/site-2/loss/loss"} <= tags, sorted(tags)[:10]
    assert [e.step for e in events.Scalars("weight/site-1")] == [1, 2]
    # ... and to MLflow (a job option, on in jobs/motion): one run for the job, every round a step, the config as params
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedanchor").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["job_name"] == "fedanchor-motion"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "weight/site-1")] == [1, 2]
    assert {"eval/accel_to_gyro/recall_at_1", "site/site-2/loss/loss"} <= set(run.data.metrics)  # MLflow's charset
    assert run.data.params["data.scenario"] == "motion" and run.data.params["rounds"] == "2"
    # cross-site evaluation (a job option, on in jobs/motion): every site scored the last and the best global model
    table = json.loads((run_dir / "cross_site_val" / "fedanchor_cross_site.json").read_text())
    assert set(table) == {"site-1", "site-2"} and all(set(models) == {"SRV_last", "SRV_best"} for models in table.values())
    assert all("anchor/cka_to_consensus" in m for models in table.values() for m in models.values()), table

    # every site contributed each round, nothing rejected, bytes up recorded per site
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    # jobs/motion refreshes its bases (adapter.refresh_every=2): gradients up in round 0, augmented cores in round 1,
    # then the server truncated every layer within the tolerance
    assert [r["basis"]["phase"] for r in summary["rounds"]] == ["gradients", "augmented"]
    assert all(1 <= rank <= 12 for rank in summary["rounds"][1]["basis"]["ranks"].values())
    assert max(summary["rounds"][1]["basis"]["discarded"].values()) <= 0.2 + 1e-6
    for record in summary["rounds"]:
        assert record["accepted"] == ["site-1", "site-2"], record
        assert record["rejected"] == {}
        assert set(record["bytes_up"]) == {"site-1", "site-2"}
        # what FLARE serialised carries at least the update's own arrays
        assert all(record["bytes_up"][s] >= record["bytes_up_payload"][s] > 0 for s in record["bytes_up"])
        assert set(record["bytes_down"]) == {"site-1", "site-2"} and min(record["bytes_down"].values()) > 0
        assert set(record["site_weights"]) == {"site-1", "site-2"}
    final = summary["final_eval"]
    assert {"accel->gyro/recall@1", "gyro->accel/recall@1"} <= set(final)
    assert all(0.0 <= final[k] <= 1.0 for k in ("accel->gyro/recall@1", "gyro->accel/recall@1"))
    assert "accel->gyro/recall@1" in summary["initial_eval"]

    # one checkpoint per round, the global state moved between rounds, and the last one resumes a server
    ckpt = run_dir / "checkpoints"
    r1, r2, last = (load_state(ckpt / n) for n in ("round-0001.safetensors", "round-0002.safetensors", LAST_FILE))
    assert (r1.round, r2.round, last.round) == (1, 2, 2)
    assert (ckpt / BEST_FILE).is_file()
    cores = [k for k in r1.tensors if k.endswith(("/S", "/m"))]
    assert cores and any(not torch.equal(r1.tensors[k], r2.tensors[k]) for k in cores)
    assert_same_state(r2, last)
    assert last.meta["eval"] == final

    from fedanchor.config import config_from_dict
    from fedanchor.federation.loop import make_split
    from fedanchor.federation.server import FederatedServer

    config = config_from_dict(jobs.read_job_config(JOBS / "motion"))
    split = make_split(config)
    server = FederatedServer(config, {m: d.spec for m, d in split.anchors.items()}, split.anchors, split.anchor_fingerprint,
                             split.feature_stats, split.test, device="cpu")
    server.resume(last)
    assert server.evaluate(last)["accel->gyro/recall@1"] == pytest.approx(final["accel->gyro/recall@1"])

    # delta_site stayed at each site, on its disk
    for site in ("site-1", "site-2"):
        assert list((workspace / site / "simulate_job" / "fedanchor").glob("delta_site-*.safetensors")), site


@pytest.mark.parametrize("folder_file,content,reason", [
    (None, None, "does not exist"),
    ("accel.npy", b"not an array", "not a readable .npy"),
    ("gyro.npy", None, "accel.npy is missing"),
])
def test_a_site_with_broken_data_fails_before_training_naming_the_file(tmp_path, caplog, folder_file, content, reason):
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.signal import Signal

    from fedanchor.flare.executor import FedAnchorExecutor
    from fedanchor.flare.persistor import FedAnchorPersistor
    from fedanchor.flare.server_state import FedAnchorServerComponent

    config = jobs.read_job_config(JOBS / "motion")
    server_ctx = fake_ctx(tmp_path / "server", "server", {"fedanchor_server": FedAnchorServerComponent(config=config)})
    task = FedAnchorShareableGenerator().learnable_to_shareable(FedAnchorPersistor().load_model(server_ctx), server_ctx)
    site_ctx = fake_ctx(tmp_path / "site-1", "site-1")
    data = tmp_path / "hospital-data"
    if folder_file is not None:
        data.mkdir()
        if content is not None:
            (data / folder_file).write_bytes(content)
        else:
            np.save(data / folder_file, np.zeros((4, 3, 100), np.float32))
    (tmp_path / "site-1/local/fedanchor_site.json").write_text(json.dumps({"data": {"source": "folder", "path": str(data)}}))
    executor = FedAnchorExecutor(config=config)
    executor.handle_event(EventType.START_RUN, site_ctx)
    with caplog.at_level("ERROR"):
        reply = executor.execute("train", task, site_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert reason in caplog.text and "cannot start" in caplog.text
    assert not list((tmp_path / "site-1").rglob("delta_site-*.safetensors"))  # nothing was trained


def test_a_site_trains_on_its_own_folder(tmp_path):
    from nvflare.apis.dxo import from_shareable
    from nvflare.apis.event_type import EventType
    from nvflare.apis.signal import Signal

    from fedanchor.flare.executor import FedAnchorExecutor
    from fedanchor.flare.persistor import FedAnchorPersistor
    from fedanchor.flare.server_state import FedAnchorServerComponent

    config = jobs.read_job_config(JOBS / "motion")
    server_ctx = fake_ctx(tmp_path / "server", "server", {"fedanchor_server": FedAnchorServerComponent(config=config)})
    task = FedAnchorShareableGenerator().learnable_to_shareable(FedAnchorPersistor().load_model(server_ctx), server_ctx)
    site_ctx = fake_ctx(tmp_path / "site-1", "site-1")
    data = tmp_path / "hospital-data"
    data.mkdir()
    np.save(data / "accel.npy", np.random.default_rng(0).normal(size=(12, 3, 100)).astype(np.float32))
    (tmp_path / "site-1/local/fedanchor_site.json").write_text(json.dumps({"data": {"source": "folder", "path": str(data)}}))
    executor = FedAnchorExecutor(config=config)
    executor.handle_event(EventType.START_RUN, site_ctx)
    update = from_shareable(executor.execute("train", task, site_ctx, Signal()))
    assert update.get_meta_props()["n_samples"] == 12


@pytest.mark.slow
def test_a_failing_site_drops_out_and_the_rounds_complete_without_it(tmp_path):
    """Three simulated sites, one of which is not in the job's site list and fails at set-up: with min_clients=2 the
    job still runs every round on the other two, and the failure is in the failing site's log, not a stopped job."""
    from fedanchor.simulate import find_summary

    config = jobs.read_job_config(JOBS / "motion")
    job = jobs.write_job(tmp_path / "job", "fedanchor-dropout", config, num_rounds=2, min_clients=2)
    done = run_recipe_simulation(job, tmp_path / "sim", clients="site-1,site-2,site-9")
    workspace = tmp_path / "sim" / "fedanchor-dropout"
    summary = json.loads(find_summary(workspace).read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1], done.stdout[-3000:]
    for record in summary["rounds"]:
        assert record["accepted"] == ["site-1", "site-2"], record
    log = (workspace / "site-9" / "log.txt").read_text()
    assert "not in the job's site list" in log


@pytest.mark.slow
def test_a_job_resubmitted_after_a_server_crash_resumes_and_matches_the_uninterrupted_run(tmp_path):
    """Checkpoints and site deltas kept outside the job's run folder: a job stopped after round 1 and submitted again
    continues from its last complete round, and ends where the uninterrupted two-round job ends."""
    from fedanchor.flare.recipe import FedAnchorRecipe

    config = jobs.read_job_config(JOBS / "motion")

    def run(name: str, rounds: int, checkpoints: Path, states: Path) -> None:
        # what docs/FLARE.md tells a consortium to do, as recipe arguments: an absolute checkpoint_dir, a state_dir
        site_file = tmp_path / f"{states.name}.json"
        site_file.write_text(json.dumps({"state_dir": str(states)}))
        recipe = FedAnchorRecipe(f"fedanchor-{name}", config, rounds, component_args={
            "persistor": {"checkpoint_dir": str(checkpoints)}, "executor": {"site_config_file": str(site_file)}})
        done = run_recipe_simulation(recipe.export_folder(tmp_path / name), tmp_path / f"sim-{name}")
        assert done.returncode == 0, done.stdout[-3000:]

    run("whole", 2, tmp_path / "ckpt-whole", tmp_path / "sites-whole")
    run("before-crash", 1, tmp_path / "ckpt-resumed", tmp_path / "sites-resumed")
    assert load_state(tmp_path / "ckpt-resumed" / LAST_FILE).round == 1
    run("after-restart", 1, tmp_path / "ckpt-resumed", tmp_path / "sites-resumed")
    whole, resumed = load_state(tmp_path / "ckpt-whole" / LAST_FILE), load_state(tmp_path / "ckpt-resumed" / LAST_FILE)
    assert whole.round == resumed.round == 2
    for key, value in whole.tensors.items():
        if key.endswith(("/S", "/m")):
            # The merge sums the sites in arrival order, which the simulator does not fix: equal up to rounding.
            assert torch.allclose(value, resumed.tensors[key], rtol=1e-4, atol=1e-6), key


def test_the_template_site_configuration_is_valid():
    cfg = load_site_config(ROOT / "provision" / "templates" / "fedanchor_site.json")
    assert cfg.data.source == "folder" and cfg.data.path and cfg.state_dir and cfg.modality == "report"


def test_round_scalars_tag_the_global_model_the_sites_and_their_weights():
    from fedanchor.federation.loop import RoundRecord
    from fedanchor.flare.tracking import round_scalars

    record = RoundRecord(0, 1.0, {"site-1": {"loss/loss": 2.5, "cka_to_consensus": 0.7}}, {"site-1": 1.0}, {"site-1": 3.0},
                         {}, {"site-1": 1234}, {"a->b/recall@1": 0.1, "a->b/chance_recall@1": 0.01})
    assert round_scalars(record) == {"eval/a->b/recall@1": 0.1, "site/site-1/loss/loss": 2.5,
                                     "site/site-1/cka_to_consensus": 0.7, "weight/site-1": 1.0, "bytes_up/site-1": 1234.0}


@pytest.mark.parametrize("tag, key", [
    ("eval/a->b/recall@1", "eval/a_to_b/recall_at_1"),
    ("site/hospital-a/loss/loss", "site/hospital-a/loss/loss"),
    ("weight/site 1", "weight/site 1"),
    ("odd/é[x]", "odd/é_x_"),
])
def test_mlflow_metric_keys_keep_to_its_charset(tag, key):
    from fedanchor.flare.mlflow_receiver import metric_key

    assert metric_key(tag) == key


def test_mlflow_params_are_the_flattened_config():
    from fedanchor.flare.mlflow_receiver import flatten

    assert flatten({"rounds": 3, "train": {"lr": 0.001, "sched": {"warmup": 2}}, "targets": ["q", "v"]}) == {
        "rounds": "3", "train.lr": "0.001", "train.sched.warmup": "2", "targets": "['q', 'v']"}


@pytest.mark.parametrize("tracking, ids", [
    ((), []),
    (("tensorboard",), ["tensorboard"]),
    (("mlflow", "tensorboard"), ["mlflow", "tensorboard"]),
])
def test_tracking_option_adds_its_receivers(tracking, ids, tmp_path):
    from fedanchor.flare.recipe import FedAnchorRecipe

    job = FedAnchorRecipe("fedanchor-tracking", jobs.DEMO_JOBS["motion"]["config"], 2, tracking=tracking).export_folder(tmp_path / "job")
    components = json.loads((job / "app/config/config_fed_server.json").read_text())["components"]
    receivers = [c["id"] for c in components if c["path"] in (jobs.TENSORBOARD, jobs.MLFLOW)]
    assert receivers == ids
    assert all(c["args"].get("tracking_uri") is None for c in components if c["id"] == "mlflow")  # no secret, no host


@pytest.mark.parametrize("tracking", [("wandb",), ("mlflow", "mlflow"), ("TensorBoard",)])
def test_tracking_option_refuses_what_it_does_not_know(tracking):
    from fedanchor.flare.recipe import FedAnchorRecipe

    with pytest.raises(ValueError, match="may be named once"):
        FedAnchorRecipe("fedanchor-tracking", jobs.DEMO_JOBS["motion"]["config"], 2, tracking=tracking)


def test_mlflow_receiver_without_mlflow_says_what_to_install(monkeypatch):
    import builtins

    from fedanchor.flare.mlflow_receiver import FedAnchorMLflow

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(RuntimeError, match=r'pip install "fedanchor\[mlflow\]"'):
        FedAnchorMLflow().initialize(None)
    with pytest.raises(ValueError, match="tracking_uri"):
        FedAnchorMLflow(tracking_uri="  ")


@pytest.mark.slow
def test_sixteen_hospitals_in_the_flare_simulator(tmp_path):
    """jobs/digits16: sixteen sites, eight per modality, every one counted in every round."""
    from fedanchor.simulate import simulate

    summary = simulate(JOBS / "digits16", tmp_path / "run", echo=lambda _line: None, timeout=1200)
    sites = {f"hospital-{i:02d}" for i in range(1, 17)}
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for record in summary["rounds"]:
        assert set(record["accepted"]) == sites and not record["rejected"], record["rejected"]
        assert sum(record["site_weights"].values()) == pytest.approx(1.0)
    # BasisCacheFilter: in round 1 every site holds the bases it trained on in round 0, so U and V stay home. The
    # round-1 state (the persistor's round-0001 file) is what was sent, less its bases; it also carries the private
    # codebook the server built from the round-0 centroids.
    first, second = (r["bytes_down"] for r in summary["rounds"])
    sent = load_state(next(tmp_path.rglob("round-0001.safetensors")))
    assert sent.codebooks() and sent.has_basis()
    assert all(second[s] == sent.without_basis().nbytes() < sent.nbytes() for s in sites), (first, second)


def test_basis_cache_filter_leaves_held_bases_out_and_never_fails_a_task(tmp_path):
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext

    from fedanchor.flare.basis_cache import BasisCacheFilter
    from fedanchor.flare.server_state import FedAnchorServerComponent

    config = jobs.full_config(jobs.DEMO_JOBS["hospitals-motion"]["config"])
    component = FedAnchorServerComponent(config=config)
    ctx = fake_ctx(tmp_path / "server", "server", {"fedanchor_server": component})
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, "hospital-a", private=False, sticky=False)
    ctx.set_peer_context(peer)
    server = component.server(ctx)
    state = server.initial_state()
    task = state_to_dxo(state, component.state_meta()).to_shareable()
    task.set_header("current_round", 0)
    assert BasisCacheFilter().process(task, ctx) is task  # the site holds nothing yet: the whole state
    server.site_bases["hospital-a"] = state.basis_digest()
    light = BasisCacheFilter().process(task, ctx)
    received = shareable_to_state_checked(light)
    assert not received.has_basis() and received.basis_digest() == state.basis_digest()
    assert light.get_header("current_round") == 0 and received.meta["job_config"] == component.state_meta()["job_config"]
    assert server.bytes_down["hospital-a"] < state.nbytes()
    assert BasisCacheFilter().process(task, ctx) is task  # sent once: the record is gone until its next update
    broken = fake_ctx(tmp_path / "other", "server", {})  # no server component: log, and send the whole state
    broken.set_peer_context(peer)
    assert BasisCacheFilter().process(task, broken) is task


def test_a_dp_site_trains_through_the_executor_and_submits_only_what_it_released(tmp_path):
    """A DP round's update carries only seconds and dp/* metrics: the executor's round log must not need the losses,
    and submit_model must send the noised cores that left, never the trained ones."""
    from nvflare.apis.dxo import from_shareable
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import FLContextKey, ReturnCode
    from nvflare.apis.signal import Signal

    from fedanchor.federation.state import core_params
    from fedanchor.flare.executor import FedAnchorExecutor
    from fedanchor.flare.filters import SiteReleaseFilter
    from fedanchor.flare.persistor import FedAnchorPersistor
    from fedanchor.flare.server_state import FedAnchorServerComponent

    config = jobs.read_job_config(JOBS / "motion")
    config = dict(config, privacy=dict(config.get("privacy", {}), dp=True, noise_multiplier=2.0, clip_update=0.1),
                  adapter=dict(config["adapter"], refresh_every=0))  # projected basis gradients are not released under DP
    component = FedAnchorServerComponent(config=config)
    server_ctx = fake_ctx(tmp_path / "server", "server", {"fedanchor_server": component})
    task = FedAnchorShareableGenerator().learnable_to_shareable(FedAnchorPersistor().load_model(server_ctx), server_ctx)
    site_ctx = fake_ctx(tmp_path / "site-1", "site-1")
    executor = FedAnchorExecutor(config=config)
    executor.handle_event(EventType.START_RUN, site_ctx)
    release = SiteReleaseFilter()

    def leaving(task_name, result):
        site_ctx.set_prop(FLContextKey.TASK_NAME, task_name, private=True, sticky=False)
        return release.process(result, site_ctx)

    early = executor.execute("submit_model", task, site_ctx, Signal())
    assert early.get_return_code() == ReturnCode.EXECUTION_EXCEPTION  # nothing released yet, nothing to submit
    trained = leaving("train", executor.execute("train", task, site_ctx, Signal()))
    assert trained.get_return_code(ReturnCode.OK) == ReturnCode.OK
    sent = dxo_to_update(from_shareable(trained))
    assert set(sent.metrics) == {"seconds", "dp/epsilon", "dp/delta", "dp/rounds"} and not sent.codebook_counts.numel()
    submitted = leaving("submit_model", executor.execute("submit_model", task, site_ctx, Signal()))
    assert submitted.get_return_code(ReturnCode.OK) == ReturnCode.OK
    data = from_shareable(submitted).data
    assert set(data) == set(sent.params)
    local = core_params(executor._trainer.model)
    for key, value in sent.params.items():
        assert np.array_equal(data[key], value.numpy())
    assert any(not torch.equal(local[k].detach().cpu(), sent.params[k]) for k in local), "the noise was not applied"
