"""Run every method of the bench on one split with the same seeds and write results.json, results.md and a PNG."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..config import FedAnchorConfig, config_from_dict, config_to_dict, with_overrides
from ..federation.loop import RoundRecord, RunResult, make_split, run_in_process
from ..federation.server import ContributionRejected, FederatedServer
from ..federation.site import SiteTrainer
from ..model.homogeneous import build_model
from . import rivals

# Per scenario: split sizes of the reference measurements (issue 4); motion has only 80 samples.
SCENARIO_DATA: dict[str, dict[str, Any]] = {
    "xray": {"data.n_anchors": 200, "data.n_test": 500},
    "digits": {"data.n_anchors": 100, "data.n_test": 400},
    "motion": {"data.n_anchors": 16, "data.n_test": 24},
}
QUICK: dict[str, Any] = {
    "rounds": 2, "train.local_steps": 8, "train.batch_size": 16, "alignment.anchor_batch": 16,
    "precision.window": 4, "precision.site_scalar_samples": 2, "precision.site_scalar_anchors": 8,
}
QUICK_SCENARIO: dict[str, dict[str, Any]] = {
    "xray": {"data.n_test": 200, "data.max_private_per_site": 200},
    "digits": {"data.n_test": 200, "data.max_private_per_site": 200},
    "motion": {"train.batch_size": 8, "alignment.anchor_batch": 8},
}
TINY: dict[str, Any] = {"trunk.embed_dim": 32, "adapter.rank": 4}

NO_ALIGNMENT = {"alignment.lambda_cka": 0.0, "alignment.lambda_cross": 0.0}
FEDERATED: dict[str, dict[str, Any]] = {
    "local only": NO_ALIGNMENT,
    "fedanchor": {},
    "fedanchor - CKA term": {"alignment.lambda_cka": 0.0},
    "fedanchor - cross term": {"alignment.lambda_cross": 0.0},
    "fedanchor - private SSL": {"private.weight": 0.0},
    "fedanchor, uniform weights": {"precision.method": "uniform"},
}
NO_DELTA = "fedanchor - delta_site"
CEILINGS = ("ceiling (all true pairs)", "ceiling CCA (all true pairs)")
ANCHORS_ONLY = ("anchors-only model", "anchors-only CCA", "anchors-only ASIF")
CENTRALISED = ("ceiling (all true pairs)", "anchors-only model")
METHODS: tuple[str, ...] = (*CEILINGS, *ANCHORS_ONLY, *FEDERATED, NO_DELTA)
NOT_YET_RUN = (
    ("FedAvg on PEFT LoRA factors", "A and B averaged separately, no anchors (FLARE LLM examples)"),
    ("FedAvg on PEFT LoRA + anchor contrastive", "the same plus the cross-modal anchor loss"),
    ("FedProto", "prototype sharing"),
    ("CreamFL", "public-embedding sharing"),
    ("noisy-site study", "one corrupted site; per-round site weights; recall under uniform vs precision weighting"),
    ("bytes down per site per round", "only bytes up are recorded (RoundRecord.bytes_up)"),
    ("several splits", "one split only: no split-to-split spread yet"),
)


@dataclass
class MethodResult:
    metrics: dict[str, float]
    seconds: float
    overrides: dict[str, Any] = field(default_factory=dict)
    bytes_up: list[dict[str, int]] | None = None  # per round, per site
    site_weights: list[dict[str, float]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BenchResult:
    scenario: str
    config: FedAnchorConfig
    methods: dict[str, MethodResult]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "config": config_to_dict(self.config), "seconds": self.seconds,
                "methods": {k: v.as_dict() for k, v in self.methods.items()}, "gap_closed": gap_closed(self.methods),
                "not_yet_run": dict(NOT_YET_RUN)}


def bench_config(scenario: str, quick: bool = False, seed: int = 0, trunk: str | None = None,
                 overrides: Mapping[str, Any] | None = None) -> FedAnchorConfig:
    values: dict[str, Any] = {"data.scenario": scenario, **SCENARIO_DATA[scenario], "data.seed": seed, "train.seed": seed,
                              "adapter.seed": seed}
    if quick:
        values.update(QUICK)
        values.update(QUICK_SCENARIO[scenario])
    if trunk:
        values["trunk.name"] = trunk
        if trunk == "tiny":
            values.update(TINY)
    values.update(overrides or {})
    return with_overrides(config_from_dict({}), values)


def run_bench(config: FedAnchorConfig, methods: Sequence[str] | None = None,
              say: Callable[[str], None] = print) -> BenchResult:
    started = time.perf_counter()
    chosen = list(methods or METHODS)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown bench method(s) {unknown}; choose from {list(METHODS)}")
    split = make_split(config)
    seed = config.train.seed
    # Centralised models get as many gradient steps as all sites of a federated run together.
    steps = config.rounds * config.train.local_steps * len(split.private)
    out: dict[str, MethodResult] = {}
    features = None
    for name in chosen:
        t0 = time.perf_counter()
        say(f"== {name} ==")
        if name == "ceiling (all true pairs)":
            pairs = rivals.true_pairs(split)
            model = rivals.train_centralised(config, split, pairs, steps, seed)
            out[name] = MethodResult(rivals.score_model(model, split), 0.0, notes={"pairs": len(next(iter(pairs.values()))), "steps": steps})
        elif name == "anchors-only model":
            model = rivals.train_centralised(config, split, split.anchors, steps, seed)
            out[name] = MethodResult(rivals.score_model(model, split), 0.0, notes={"pairs": len(next(iter(split.anchors.values()))), "steps": steps})
        elif name in ("anchors-only CCA", "anchors-only ASIF", "ceiling CCA (all true pairs)"):
            if features is None:
                features = rivals.frozen_features(config, split, seed, rivals.true_pairs(split))
            anchor_f, test_f, source, pair_f = features
            if name.startswith("ceiling"):
                metrics, notes = rivals.cca_rival(pair_f, test_f, split)
                notes["pairs"] = len(next(iter(pair_f.values())))
            else:
                fit = rivals.cca_rival if name.endswith("CCA") else rivals.asif_rival
                metrics, notes = fit(anchor_f, test_f, split)
            out[name] = MethodResult(metrics, 0.0, notes={**notes, "features": source})
        else:
            overrides = FEDERATED.get(name, {})
            cfg = with_overrides(config, overrides) if overrides else config
            torch.manual_seed(seed)
            result = run_frozen_delta(cfg, split) if name == NO_DELTA else run_in_process(cfg, progress=None, split=split)
            out[name] = MethodResult(result.final_eval, 0.0, overrides=dict(overrides),
                                     bytes_up=[dict(r.bytes_up) for r in result.rounds],
                                     site_weights=[dict(r.site_weights) for r in result.rounds],
                                     notes={"rounds": cfg.rounds, "local_steps": cfg.train.local_steps})
        out[name].seconds = time.perf_counter() - t0
        say(f"   {_summary(out[name].metrics)} ({out[name].seconds:.1f}s)")
    return BenchResult(config.data.scenario, config, out, time.perf_counter() - started)


def run_frozen_delta(config: FedAnchorConfig, split) -> RunResult:
    """``run_in_process`` with every site's log-gain delta frozen at 0 (the no-delta_site ablation).

    The same server and SiteTrainer calls as ``federation.loop.run_in_process``; the only
    difference is that each site's model is built here with ``delta.requires_grad = False``,
    so its optimizer never moves delta (Adam skips parameters without gradients).
    """
    modalities = {name: data.spec for name, data in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats, split.test)
    sites = {}
    for site, private in split.private.items():
        model = build_model(config, modalities, split.feature_stats)
        for layer in model.adapters().values():
            layer.delta.requires_grad_(False)
        sites[site] = SiteTrainer(config, site, private, split.anchors[private.spec.name], split.anchor_fingerprint,
                                  modalities, split.feature_stats, model=model)
    state = server.initial_state()
    result = RunResult(config=config, initial_eval=server.evaluate(state))
    for r in range(config.rounds):
        started = time.perf_counter()
        server.start_round()
        for trainer in sites.values():
            try:
                server.accept(trainer.train_round(state))
            except ContributionRejected:
                pass
        state = server.finish_round(min_sites=1)
        metrics = server.evaluate(state)
        report = server.report
        assert report is not None
        result.rounds.append(RoundRecord(r, time.perf_counter() - started, report.site_metrics, report.site_weights,
                                         report.site_uncertainty, report.rejected, report.bytes_up, metrics))
    for name, trainer in sites.items():
        if any(float(layer.delta.abs().max()) != 0.0 for layer in trainer.model.adapters().values()):
            raise RuntimeError(f"site {name!r}: delta moved although it was frozen")
    result.final_state = state
    return result


# -- summaries --------------------------------------------------------------------
def directions(metrics: Mapping[str, float]) -> list[str]:
    return sorted({k.split("/")[0] for k in metrics if "->" in k.split("/")[0]})


def mean_recall(metrics: Mapping[str, float], level: str, k: int = 10) -> float:
    key = "recall" if level == "instance" else "semantic_recall"
    values = [metrics[f"{d}/{key}@{k}"] for d in directions(metrics) if f"{d}/{key}@{k}" in metrics]
    return float(np.mean(values)) if values else float("nan")


def _summary(metrics: Mapping[str, float]) -> str:
    return f"mean R@10 instance {mean_recall(metrics, 'instance'):.3f}, semantic {mean_recall(metrics, 'semantic'):.3f}"


def gap_closed(methods: Mapping[str, MethodResult]) -> dict[str, Any]:
    """(method - best anchors-only) / (ceiling - best anchors-only), on mean recall@10 over both directions."""
    ceilings = {m: methods[m] for m in CEILINGS if m in methods}
    bars = {m: methods[m] for m in ANCHORS_ONLY if m in methods}
    if not ceilings or not bars:
        return {}
    out: dict[str, Any] = {"bar": {}, "ceiling": {}, "methods": {}}
    for level in ("instance", "semantic"):
        best = max(bars, key=lambda m: mean_recall(bars[m].metrics, level))
        top = max(ceilings, key=lambda m: mean_recall(ceilings[m].metrics, level))
        low, high = mean_recall(bars[best].metrics, level), mean_recall(ceilings[top].metrics, level)
        out["bar"][level] = {"method": best, "mean_recall@10": low}
        out["ceiling"][level] = {"method": top, "mean_recall@10": high}
        for name, res in methods.items():
            # Undefined when the ceiling does not beat the bar (tiny splits, quick runs): reported as nan, not as a ratio.
            gap = (mean_recall(res.metrics, level) - low) / (high - low) if high - low > 1e-12 else float("nan")
            out["methods"].setdefault(name, {})[level] = gap
    return out


def _bytes_per_round(res: MethodResult) -> str:
    if not res.bytes_up:
        return "-"
    per_site = [b for rnd in res.bytes_up for b in rnd.values()]
    return f"{np.mean(per_site) / 1024:.1f} KiB" if per_site else "-"


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.3f}"


def results_markdown(bench: BenchResult, command: str = "") -> str:
    methods = bench.methods
    first = next(iter(methods.values())).metrics
    dirs = directions(first)
    cols = []
    for d in dirs:
        cols += [(d, "recall", f"{d} inst R@1/5/10"), (d, "semantic_recall", f"{d} sem R@1/5/10")]
    pair = "~".join(d for d in dirs[0].split("->")) if dirs else ""
    cka_key = next((k for k in first if k.endswith("/cka")), f"{pair}/cka")
    knn_key = next((k for k in first if k.endswith("/mutual_knn@10")), f"{pair}/mutual_knn@10")
    header = ["method", *(c[2] for c in cols), "CKA", "mutual-kNN@10", "bytes up/site/round", "wall s"]
    lines = [f"# fedanchor bench: {bench.scenario}", ""]
    cfg = bench.config
    lines += [f"Split seed {cfg.data.seed}: {cfg.data.n_anchors} anchors, {cfg.data.n_test} held-out pairs, "
              f"private cap {cfg.data.max_private_per_site}; trunk {cfg.trunk.name}; {cfg.rounds} rounds x "
              f"{cfg.train.local_steps} local steps per site (centralised models: the same total, "
              f"{next(iter(bench.methods.values())).notes.get('steps', 'see notes')} steps). "
              f"Total {bench.seconds:.0f}s.", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(metrics: Mapping[str, float], d: str, level: str, prefix: str = "") -> str:
        return "/".join(_fmt(metrics.get(f"{d}/{prefix}{level}@{k}", float("nan"))) for k in (1, 5, 10))

    lines.append("| chance | " + " | ".join(cell(first, d, level, "chance_") for d, level, _ in cols) + " | | | | |")
    for name, res in methods.items():
        m = res.metrics
        row = [name, *(cell(m, d, level) for d, level, _ in cols), _fmt(m.get(cka_key, float("nan"))),
               _fmt(m.get(knn_key, float("nan"))), _bytes_per_round(res), f"{res.seconds:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    gaps = gap_closed(methods)
    lines += ["", "## Gap closed", ""]
    if gaps:
        lines += ["(method - best anchors-only) / (ceiling - best anchors-only), on mean recall@10 over both directions. "
                  f"Bar: instance = {gaps['bar']['instance']['method']} ({_fmt(gaps['bar']['instance']['mean_recall@10'])}), "
                  f"semantic = {gaps['bar']['semantic']['method']} ({_fmt(gaps['bar']['semantic']['mean_recall@10'])}); "
                  f"Ceiling (best of the paired ceilings): instance = {gaps['ceiling']['instance']['method']} "
                  f"({_fmt(gaps['ceiling']['instance']['mean_recall@10'])}), semantic = {gaps['ceiling']['semantic']['method']} "
                  f"({_fmt(gaps['ceiling']['semantic']['mean_recall@10'])}). "
                  "nan: the ceiling does not beat the bar at that level in this run, so no gap is defined.", "",
                  "| method | mean inst R@10 | mean sem R@10 | gap closed (instance) | gap closed (semantic) |", "|---|---|---|---|---|"]
        for name, res in methods.items():
            g = gaps["methods"][name]
            lines.append(f"| {name} | {_fmt(mean_recall(res.metrics, 'instance'))} | {_fmt(mean_recall(res.metrics, 'semantic'))} | "
                         f"{_fmt(g['instance'])} | {_fmt(g['semantic'])} |")
    else:
        lines.append("needs a ceiling and at least one anchors-only method in the run.")
    lines += ["", "## Notes", ""]
    for name, res in methods.items():
        if res.notes or res.overrides:
            lines.append(f"- {name}: " + "; ".join(f"{k}={v}" for k, v in {**res.overrides, **res.notes}.items()))
    lines += ["", "## Not yet run", ""] + [f"- {name}: {why}" for name, why in NOT_YET_RUN]
    return "\n".join(lines) + "\n"


def plot_bench(bench: BenchResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(bench.methods)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)), 4.5))
    for offset, level in ((-0.2, "semantic"), (0.2, "instance")):
        ax.bar(x + offset, [mean_recall(bench.methods[n].metrics, level) for n in names], 0.4, label=f"{level} R@10 (mean of both directions)")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 1), ylabel="recall@10", title=f"fedanchor bench: {bench.scenario}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_bench(bench: BenchResult, out: Path, command: str = "") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "recall_at_10.png"}
    paths["json"].write_text(json.dumps(bench.as_dict(), indent=2, default=_json_default))
    paths["md"].write_text(results_markdown(bench, command))
    plot_bench(bench, paths["png"])
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)
