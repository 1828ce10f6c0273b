"""The FLARE server components around a failed round and a restart: the aggregator keeps the previous global state
when a round fails and records why; a restarted server resumes the newest checkpoint and keeps its best model.

The components run outside FLARE's runtime (fake_ctx, as in test_simulator.py) on the tiny trunk; the sites'
updates are made here from the global state (the server checks and merges them as it would a trained site's)."""
from __future__ import annotations

import json

import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey

from conftest import tiny_config
from fedanchor.config import config_to_dict
from fedanchor.federation.messages import CONSENSUS_KEY, GlobalState, SiteUpdate, is_core_or_magnitude
from fedanchor.flare.aggregator import SUMMARY_FILE, FedAnchorAggregator
from fedanchor.flare.persistor import BEST_FILE, LAST_FILE, FedAnchorPersistor, load_state
from fedanchor.flare.server_state import FedAnchorServerComponent
from fedanchor.flare.shareable import FedAnchorShareableGenerator, shareable_to_state, state_to_dxo, update_to_dxo
from test_simulator import fake_ctx

SITES = {"site-1": "accel", "site-2": "gyro"}


def start_server(root):
    """One server process: the components config_fed_server.json lists, on the same workspace folder."""
    component = FedAnchorServerComponent(config=config_to_dict(tiny_config()))
    ctx = fake_ctx(root, "server", {"fedanchor_server": component})
    return component, FedAnchorPersistor(), FedAnchorAggregator(), ctx


def scored(component, ctx, score: float):
    """The server's evaluation replaced by a fixed model-selection score: the test decides which round is best."""
    server = component.server(ctx)
    server.evaluate = lambda state=None: {"anchor_cv/mrr": score}
    return server


def site_update(state: GlobalState, site: str, seed: int) -> SiteUpdate:
    """What a site of ``SITES`` sends in ``state``'s round: the global cores moved a little, its modality's projector,
    uniform precision, the consensus as its Gram."""
    modality = SITES[site]
    g = torch.Generator().manual_seed(seed)
    params = {k: v + 1e-3 * torch.randn(v.shape, generator=g) if is_core_or_magnitude(k) else v.clone()
              for k, v in state.tensors.items() if is_core_or_magnitude(k) or k.startswith(f"projector/{modality}/")}
    precision = {k: torch.ones_like(v, dtype=torch.float64) for k, v in params.items() if is_core_or_magnitude(k)}
    return SiteUpdate(site, modality, state.round, state.anchor_fingerprint, params, precision,
                      state.tensors[CONSENSUS_KEY].float(), n_samples=10, uncertainty=1.0)


def play_round(component, persistor, aggregator, ctx, score: float) -> GlobalState:
    """One ScatterAndGather round: every site's result accepted, aggregated, the new global model saved."""
    state = scored(component, ctx, score).state
    for k, site in enumerate(SITES):
        shareable = update_to_dxo(site_update(state, site, seed=10 * state.round + k)).to_shareable()
        shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
        assert aggregator.accept(shareable, ctx), site
    reply = aggregator.aggregate(ctx)
    persistor.save_model(FedAnchorShareableGenerator().shareable_to_learnable(reply, ctx), ctx)
    aggregator.reset(ctx)
    return shareable_to_state(reply)


def assert_same_tensors(a: GlobalState, b: GlobalState) -> None:
    assert a.round == b.round and set(a.tensors) == set(b.tensors)
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


def test_a_failed_round_returns_the_previous_state_and_records_why(tmp_path):
    component, _, aggregator, ctx = start_server(tmp_path / "server")
    server = component.server(ctx)
    previous = server.initial_state()
    malformed = state_to_dxo(previous).to_shareable()  # a global state where an update belongs
    malformed.set_peer_props({ReservedKey.IDENTITY_NAME: "site-1"})
    assert not aggregator.accept(malformed, ctx)

    reply = aggregator.aggregate(ctx)
    returned = shareable_to_state(reply)
    assert_same_tensors(returned, previous)
    assert returned.meta["job_config"] == component.state_meta()["job_config"]
    assert server.state is previous
    summary = json.loads((component.run_dir(ctx) / SUMMARY_FILE).read_text())
    (failure,) = summary["failures"]
    assert failure.startswith("round 0: 0 valid contribution(s), at least 1 needed (site-1: malformed update")
    assert failure.endswith("the global model is left unchanged") and summary["rounds"] == []
    engine = ctx.get_engine()
    assert engine.events.count(EventType.FATAL_SYSTEM_ERROR) == 1  # the job is told to stop, with the reason
    assert ctx.get_prop(FLContextKey.EVENT_DATA) == failure

    # the next round opens afresh (no stale rejection in its report), and its failure is added, not written over
    assert shareable_to_state(aggregator.aggregate(ctx)).round == previous.round
    summary = json.loads((component.run_dir(ctx) / SUMMARY_FILE).read_text())
    assert summary["failures"][0] == failure and "(no site reported)" in summary["failures"][1]


def test_a_restarted_server_resumes_the_newest_checkpoint_and_keeps_its_best(tmp_path):
    root = tmp_path / "server"
    component, persistor, aggregator, ctx = start_server(root)
    scored(component, ctx, 0.0)
    assert shareable_to_state(FedAnchorShareableGenerator().learnable_to_shareable(persistor.load_model(ctx), ctx)).round == 0
    states = [play_round(component, persistor, aggregator, ctx, score) for score in (0.5, 0.7, 0.6)]  # rounds 1, 2, 3
    folder = persistor.checkpoint_folder(ctx)
    assert load_state(folder / BEST_FILE).round == 2
    summary_file = component.run_dir(ctx) / SUMMARY_FILE
    assert json.loads(summary_file.read_text())["best_round"] == 1  # the round that made state 2
    del component, persistor, aggregator  # the crash

    component, persistor, aggregator, ctx = start_server(root)
    server = scored(component, ctx, 0.0)
    resumed = shareable_to_state(FedAnchorShareableGenerator().learnable_to_shareable(persistor.load_model(ctx), ctx))
    assert_same_tensors(resumed, states[-1])
    assert server.state.round == 3 and component.initial_eval == {}  # resumed, not started afresh
    assert_same_tensors(load_state(folder / LAST_FILE), states[-1])

    best = (folder / BEST_FILE).read_bytes()
    play_round(component, persistor, aggregator, ctx, 0.65)  # state 4: better than 0.6, worse than the best 0.7
    assert (folder / BEST_FILE).read_bytes() == best
    summary = json.loads(summary_file.read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3] and summary["best_round"] == 1

    fifth = play_round(component, persistor, aggregator, ctx, 0.8)  # state 5: the new best
    assert_same_tensors(load_state(folder / BEST_FILE), fifth)
    assert json.loads(summary_file.read_text())["best_round"] == 4
