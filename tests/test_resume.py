"""A crashed server (or site) resumes from its last checkpoint and reproduces the uninterrupted run bit for bit; a run's
identity (its run key) decides what a resubmitted job may continue, and a site asked again for a round it trained
trains it from the state it started that round with."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

from conftest import tiny_config
from fedanchor.config import config_to_dict
from fedanchor.deploy import admin_api
from fedanchor.federation import FederatedServer, SiteTrainer
from fedanchor.federation.loop import make_split
from fedanchor.flare.executor import FedAnchorExecutor
from fedanchor.flare.persistor import (LAST_FILE, RUN_SUMMARY, RUNS_DIR, FedAnchorPersistor, RunIdentityError,
                                       check_run_key, load_state, save_state)
from fedanchor.flare.server_state import FedAnchorServerComponent
from fedanchor.flare.shareable import FedAnchorShareableGenerator, dxo_to_update
from fedanchor.typicality import Summary

ROUNDS = 3


def world(config, split):
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats)
    sites = {s: SiteTrainer(config, s, d, split.anchors[d.spec.name], split.anchor_fingerprint, modalities, split.feature_stats)
             for s, d in split.private.items()}
    return server, sites


def run_rounds(server, sites, state, rounds):
    for _ in range(rounds):
        server.start_round()
        for trainer in sites.values():
            server.accept(trainer.train_round(state))
        state = server.finish_round(min_sites=len(sites))
    return state


def assert_identical(a, b):
    assert a.round == b.round and set(a.tensors) == set(b.tensors)
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


@pytest.mark.parametrize("adapter", [{}, {"refresh_every": 2, "refresh_tolerance": 0.3, "rank_max": 6}],
                         ids=["fixed basis", "after a basis refresh"])
def test_resumed_server_and_restarted_sites_reproduce_the_uninterrupted_run(tmp_path, adapter):
    """With a refresh, the checkpoint after round 2 holds truncated bases of other ranks than a fresh model's."""
    config = tiny_config(rounds=ROUNDS, adapter=adapter)
    split = make_split(config)
    server, sites = world(config, split)
    uninterrupted = run_rounds(server, sites, server.initial_state(), ROUNDS)

    server, sites = world(config, split)
    state = run_rounds(server, sites, server.initial_state(), ROUNDS - 1)
    save_state(tmp_path / "round-0002.safetensors", state)
    deltas = {name: trainer.local_state() for name, trainer in sites.items()}  # what each site keeps on its disk
    del server, sites  # the crash: nothing in memory survives

    server, sites = world(config, split)
    server.resume(load_state(tmp_path / "round-0002.safetensors"))
    for name, trainer in sites.items():
        trainer.load_local_state(deltas[name])
    resumed = run_rounds(server, sites, server.state, 1)
    assert_identical(resumed, uninterrupted)


def test_a_site_that_loses_its_delta_diverges_so_the_delta_file_matters(tmp_path):
    config = tiny_config(rounds=2)
    split = make_split(config)
    server, sites = world(config, split)
    uninterrupted = run_rounds(server, sites, server.initial_state(), 2)
    server, sites = world(config, split)
    state = run_rounds(server, sites, server.initial_state(), 1)
    _, fresh_sites = world(config, split)  # restarted without their delta files
    again = run_rounds(server, fresh_sites, state, 1)
    assert any(not torch.equal(again.tensors[k], uninterrupted.tensors[k]) for k in again.tensors if k.endswith("/S"))


# -- the run's identity: a run key, resume or start, refused with the reason (FLARE's components, no FLARE runtime) --


class Engine:
    """Just enough of a FLARE engine: a workspace and the job's components (a workflow is one too)."""

    def __init__(self, root: Path, components):
        self.workspace, self.components = Workspace(str(root), site_name="server"), components

    def get_workspace(self):
        return self.workspace

    def get_component(self, component_id):
        return self.components.get(component_id)

    def fire_event(self, event_type, fl_ctx):
        pass


def server_job(root: Path, job_id: str, config=None, meta=None, rounds: int = 4):
    """One server job process: the components, a ScatterAndGather of ``rounds`` rounds, meta.json as the admin wrote it."""
    for sub in ("startup", "local", job_id):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / job_id / "meta.json").write_text(json.dumps({"name": "fedanchor-test", **(meta or {})}))
    component = FedAnchorServerComponent(config=config_to_dict(config or tiny_config()))
    workflow = ScatterAndGather(min_clients=1, num_rounds=rounds, persistor_id="persistor")
    persistor = FedAnchorPersistor()
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, Engine(root, {"fedanchor_server": component, "persistor": persistor,
                                                   "scatter_and_gather": workflow}), private=True, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "server", private=True, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=True, sticky=False)
    ctx.set_prop(FLContextKey.WORKFLOW, "scatter_and_gather", private=True, sticky=False)
    return component, persistor, workflow, ctx


def play(component, persistor, ctx, rounds: int):
    """Rounds as the aggregator leaves them: a summary entry written, then the next global state checkpointed."""
    server = component.server(ctx)
    state = server.state
    summary_file = persistor._job_run_dir(ctx) / RUN_SUMMARY
    for _ in range(rounds):
        state = dataclasses.replace(state, round=state.round + 1, tensors={k: v + 1 for k, v in state.tensors.items()})
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"rounds": []}
        summary["rounds"].append({"round": state.round - 1})
        summary_file.write_text(json.dumps(summary))
        persistor.save_model(component.to_learnable(state), ctx)
    return state


def start(persistor, ctx):
    return FedAnchorShareableGenerator().learnable_to_shareable(persistor.load_model(ctx), ctx)


def test_a_job_resubmitted_under_its_run_key_continues_at_its_last_round(tmp_path):
    component, persistor, workflow, ctx = server_job(tmp_path, "job-1", meta={"fedanchor_run_key": "run-a",
                                                                              "fedanchor_resume": False})
    start(persistor, ctx)
    server = component.server(ctx)
    server.codebook_temperature, server.codebook_form, server.anchor_factors = 0.3, "kernel", {"site-1": 0.5}  # what the rounds leave in its memory
    server.data_modality, server.data_distances, server.data_factors = {"site-1": "accel"}, {"site-1": 1.7}, {"site-1": 0.01}
    typical = server._typicality_reference("accel")  # four sites reporting: three like the anchors, one far off and left out
    far = Summary({**typical.mean, "energy": typical.mean["energy"] + 9.0}, typical.sd, 12)
    server.typicality_reports = {"site-1": ("accel", typical), "site-2": ("accel", typical), "site-3": ("accel", far),
                                 "site-4": ("accel", typical)}
    server.silenced = {"site-3": {"typicality_check/z": 11.0, "typicality_check/factor": 1e-4}}
    saved = play(component, persistor, ctx, 2)
    run = tmp_path / RUNS_DIR / "run-a"
    assert (run / "checkpoints" / "round-0002.safetensors").is_file()
    assert not (tmp_path / "job-1" / "checkpoints").exists()  # not in the job's run folder: a new job id loses that
    del component, persistor, workflow  # the crash

    assert load_state(run / "checkpoints" / "round-0002.safetensors").meta["server_memory"]["anchor_factors"] == {"site-1": 0.5}
    component, persistor, workflow, ctx = server_job(tmp_path, "job-2", meta={"fedanchor_run_key": "run-a",
                                                                              "fedanchor_resume": True})
    sent = start(persistor, ctx)
    dxo = from_shareable(sent)
    assert "server_memory" not in repr(dxo.meta) and "server_memory" not in dxo.data  # no site learns the others' factors
    assert_identical(component.server(ctx).state, saved)
    resumed = component.server(ctx)
    assert (resumed.codebook_temperature, resumed.codebook_form, resumed.anchor_factors) == (0.3, "kernel", {"site-1": 0.5})
    assert (resumed.data_modality, resumed.data_distances, resumed.data_factors) == ({"site-1": "accel"}, {"site-1": 1.7},
                                                                                    {"site-1": 0.01})
    assert resumed.typicality_reports == server.typicality_reports  # kept, and the factors judged again from them
    assert resumed.silenced == server.silenced  # ... without the site the checks left out
    assert resumed.typicality_factors == {"site-1": 1.0, "site-2": 1.0, "site-4": 1.0}
    assert resumed.check_factor("site-1") == pytest.approx(0.005)
    assert workflow.get_persist_state(ctx)["current_round"] == 2  # ScatterAndGather runs rounds 2 and 3 only
    assert component.state_meta()["run_key"] == "run-a"  # the sites learn the run from every global state
    assert "server_memory" not in component.state_meta()
    summary = json.loads((tmp_path / "job-2" / RUN_SUMMARY).read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1] and summary["resumed"] == [{"job_id": "job-2", "from_round": 2}]
    assert [j["from_round"] for j in json.loads((run / "run.json").read_text())["jobs"]] == [0, 2]

    persistor.handle_event(EventType.END_RUN, ctx)  # the downloaded result holds the whole run's checkpoints
    assert sorted(p.name for p in (tmp_path / "job-2" / "checkpoints").iterdir()) == \
        sorted(p.name for p in (run / "checkpoints").iterdir())


def test_a_run_key_is_neither_started_twice_nor_resumed_from_nothing_or_from_another_run(tmp_path):
    component, persistor, _, ctx = server_job(tmp_path, "job-1", meta={"fedanchor_run_key": "run-a",
                                                                       "fedanchor_resume": False})
    start(persistor, ctx)
    play(component, persistor, ctx, 1)
    last = (tmp_path / RUNS_DIR / "run-a" / "checkpoints" / LAST_FILE).read_bytes()

    _, persistor, _, ctx = server_job(tmp_path, "job-2", meta={"fedanchor_run_key": "run-a", "fedanchor_resume": False})
    with pytest.raises(RunIdentityError, match=r"run 'run-a' .* already holds checkpoints \(up to round 1\).*new run key"):
        start(persistor, ctx)
    _, persistor, _, ctx = server_job(tmp_path, "job-3", meta={"fedanchor_run_key": "run-b", "fedanchor_resume": True})
    with pytest.raises(RunIdentityError, match="run 'run-b' .* holds no complete checkpoint to continue from"):
        start(persistor, ctx)
    other = tiny_config(train={"local_steps": 6, "batch_size": 8, "lr": 1e-2})
    _, persistor, _, ctx = server_job(tmp_path, "job-4", other, meta={"fedanchor_run_key": "run-a", "fedanchor_resume": True})
    with pytest.raises(RunIdentityError, match=r"other settings \(train.lr: checkpoint 0.005, job 0.01\)"):
        start(persistor, ctx)
    moved = tiny_config(data={"scenario": "motion", "n_anchors": 16, "n_test": 24, "seed": 1})
    _, persistor, _, ctx = server_job(tmp_path, "job-5", moved, meta={"fedanchor_run_key": "run-a", "fedanchor_resume": True})
    with pytest.raises(RunIdentityError, match="anchor set .* it is another run"):
        start(persistor, ctx)
    assert (tmp_path / RUNS_DIR / "run-a" / "checkpoints" / LAST_FILE).read_bytes() == last  # nothing was overwritten

    # more rounds are no other run: a finished run may be continued further
    longer = tiny_config(rounds=6)
    component, persistor, workflow, ctx = server_job(tmp_path, "job-6", longer, rounds=6,
                                                     meta={"fedanchor_run_key": "run-a", "fedanchor_resume": True})
    start(persistor, ctx)
    assert component.server(ctx).state.round == 1 and workflow.get_persist_state(ctx)["current_round"] == 1


def test_run_keys_that_are_no_folder_name_are_refused_before_anything_is_submitted(tmp_path):
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 101):
        if bad:
            with pytest.raises(ValueError, match="run key .* is not valid"):
                check_run_key(bad)
    job = tmp_path / "job"
    (job / "app" / "config").mkdir(parents=True)
    (job / "meta.json").write_text(json.dumps({"name": "j", "deploy_map": {"app": ["@ALL"]}}))
    (job / "app" / "config" / "config_fed_server.json").write_text("{}")
    admin_api.set_run(job, "hospitals-2025", resume=True)
    meta = json.loads((job / "meta.json").read_text())
    assert meta["fedanchor_run_key"] == "hospitals-2025" and meta["fedanchor_resume"] is True
    assert (job / "app" / "config" / "config_fed_server.json").read_text() == "{}"  # a site's approval of the app holds
    with pytest.raises(ValueError, match="not valid"):
        admin_api.set_run(job, "../x", resume=None)
    assert admin_api.new_run_key(job).startswith("job-")


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "differential privacy"])
def test_a_restarted_site_asked_again_for_a_round_it_trained_sends_the_same_update(tmp_path, dp):
    """The server crashed after sending round 1 and a site had trained it: the resumed job asks for round 1 again, and
    the site, restarted in a new job process, trains it from the delta_site it started round 1 with the first time.
    Under differential privacy the noise is fresh, so the retrained round is a third release: the accountant says so."""
    config = config_to_dict(tiny_config(privacy={"dp": dp}))
    component, persistor, _, server_ctx = server_job(tmp_path / "server", "job-1", config=tiny_config(privacy={"dp": dp}),
                                                     meta={"fedanchor_run_key": "run-a"})
    task0 = start(persistor, server_ctx)

    def site(job_id: str):
        root = tmp_path / "site-1"
        for sub in ("startup", "local", job_id):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / job_id / "meta.json").write_text(json.dumps({"fedanchor_run_key": "run-a"}))
        ctx = FLContext()
        ctx.set_prop(ReservedKey.ENGINE, Engine(root, {}), private=True, sticky=False)
        ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=True, sticky=False)
        ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=True, sticky=False)
        executor = FedAnchorExecutor(config=config)
        executor.handle_event(EventType.START_RUN, ctx)
        return executor, ctx

    executor, ctx = site("job-1")
    update0 = dxo_to_update(from_shareable(executor.execute("train", task0, ctx, Signal())))
    server = component.server(server_ctx)
    server.start_round()
    server.accept(update0)
    task1 = FedAnchorShareableGenerator().learnable_to_shareable(component.to_learnable(server.finish_round(1)), server_ctx)
    first = dxo_to_update(from_shareable(executor.execute("train", task1, ctx, Signal())))
    assert (tmp_path / "site-1" / RUNS_DIR / "run-a" / "site-1").is_dir()
    del executor  # the crash

    executor, ctx = site("job-2")  # a new job id: the state comes from the run's folder
    again = dxo_to_update(from_shareable(executor.execute("train", task1, ctx, Signal())))
    assert again.round == first.round == 1
    if dp:
        assert (first.metrics["dp/rounds"], again.metrics["dp/rounds"]) == (2.0, 3.0)
        return
    for key, value in first.params.items():
        assert torch.equal(again.params[key], value), key

    component.run_key = ""  # a global state of a job without this run key: refused, not trained on this run's delta
    unkeyed = FedAnchorShareableGenerator().learnable_to_shareable(component.to_learnable(server.state), server_ctx)
    assert executor.execute("train", unkeyed, ctx, Signal()).get_return_code() == ReturnCode.BAD_TASK_DATA


@pytest.mark.parametrize("memory, form", [({"codebook_position": False}, "assignment"), ({"codebook_position": True}, "assignment+position"),
                                          ({}, "assignment+position"), ({"codebook_form": "kernel"}, "kernel")])
def test_a_checkpoint_from_before_the_form_code_restores_its_codebook_form(tmp_path, memory, form):
    component, persistor, workflow, ctx = server_job(tmp_path, "job-1", meta={"fedanchor_run_key": "run-a",
                                                                              "fedanchor_resume": False})
    start(persistor, ctx)
    component.restore_server_memory({"server_memory": {"codebook_temperature": 0.3, **memory}})
    assert (component.server(ctx).codebook_temperature, component.server(ctx).codebook_form) == (0.3, form)
