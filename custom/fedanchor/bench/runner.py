"""Run every method of the bench on one split with the same seeds and write results.json, results.md and a PNG."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..alignment.codebook import Codebook, CodebookProjection, choose_anchor_codebooks
from ..alignment.readout_choice import choose_readout, form_score
from ..config import FedAnchorConfig, config_from_dict, config_to_dict, with_overrides
from ..federation.loop import make_split, run_in_process
from ..plots import save_figure
from . import fed_rivals, rivals

# Per scenario: the bench's split sizes (public anchors, held-out pairs); motion has only 80 samples.
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
    # MiniLM on report text dominates a CPU run: fewer anchors and private reports keep --quick within 15 minutes.
    "xray": {"data.n_anchors": 100, "data.n_test": 200, "data.max_private_per_site": 150},
    # digits keeps every private item: the private codebook needs them, and a training step costs the same either way.
    "digits": {"data.n_test": 200},
    "motion": {"train.batch_size": 8, "alignment.anchor_batch": 8},
}
TINY: dict[str, Any] = {"trunk.embed_dim": 32, "adapter.rank": 4}

NO_ALIGNMENT = {"alignment.lambda_cka": 0.0, "alignment.lambda_cross": 0.0}
MODEL_BLOCK_ALONE = {"alignment.readout_blocks": ("model",)}  # the readout over the model's embeddings only
FEDERATED: dict[str, dict[str, Any]] = {
    "fedanchor": {},
    "fedanchor - CKA term": {"alignment.lambda_cka": 0.0},
    "fedanchor - cross term": {"alignment.lambda_cross": 0.0},
    "fedanchor - both anchor terms": NO_ALIGNMENT,
    "fedanchor - private SSL": {"private.weight": 0.0},
    "fedanchor, uniform weights": {"precision.method": "uniform"},
    "fedanchor - CCA readout": {"alignment.readout": "none"},
    "fedanchor - base block": MODEL_BLOCK_ALONE,
    "fedanchor - private codebook": {"alignment.readout_blocks": ("base", "model")},
}
NO_DELTA = "fedanchor - delta_site"
# Rivals that share something else than fedanchor does (bench/fed_rivals.py).
FED_RIVALS: dict[str, Callable[[FedAnchorConfig, Any], fed_rivals.RivalRun]] = {
    "local only": fed_rivals.local_only,
    "FedAvg on PEFT LoRA": fed_rivals.fedavg_lora,
    "FedAvg on PEFT LoRA + anchor term": partial(fed_rivals.fedavg_lora, anchor_term=True),
    "FedProto (class prototypes)": fed_rivals.fedproto,
    "CreamFL (anchor embeddings)": fed_rivals.creamfl,
}
CEILINGS = ("ceiling (all true pairs)", "ceiling CCA (all true pairs)")
FEATURE_RIVALS = ("anchors-only CCA", "anchors-only CCA + anchor codebook", "anchors-only ASIF")
ANCHORS_ONLY = ("anchors-only model", *FEATURE_RIVALS)
METHODS: tuple[str, ...] = (*CEILINGS, *ANCHORS_ONLY, *FED_RIVALS, *FEDERATED, NO_DELTA)
# The recall@k of the headline "gap closed", per level: recall@10 at both levels on xray (semantic: the same code
# set), exact-pair recall@10 with same-class recall@1 on digits and motion (same-class recall@10 is near 1 there).
HEADLINE_K: dict[str, dict[str, int]] = {
    "xray": {"instance": 10, "semantic": 10},
    "digits": {"instance": 10, "semantic": 1},
    "motion": {"instance": 10, "semantic": 1},
}


@dataclass
class MethodResult:
    metrics: dict[str, float]
    seconds: float
    overrides: dict[str, Any] = field(default_factory=dict)
    bytes_up: list[dict[str, int]] | None = None  # per round, per site, serialized
    bytes_down: list[dict[str, int]] | None = None
    site_weights: list[dict[str, float]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MethodResult":
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclass
class BenchResult:
    scenario: str
    config: FedAnchorConfig
    methods: dict[str, MethodResult]
    seconds: float
    full_finetune_bytes: int | None = None  # one site's update if the whole model were fine-tuned

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "config": config_to_dict(self.config), "seconds": self.seconds,
                "methods": {k: v.as_dict() for k, v in self.methods.items()},
                "gap_closed": gap_closed(self.methods, HEADLINE_K[self.scenario]),
                "bytes": bytes_summary(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "BenchResult":
        """The bench ``as_dict`` wrote (results.json; derived figures are recomputed, not read)."""
        return cls(values["scenario"], config_from_dict(values["config"]),
                   {name: MethodResult.from_dict(m) for name, m in values["methods"].items()}, values["seconds"],
                   (values.get("bytes") or {}).get("full_finetune_up"))


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
            # A diagnostic of the model's own capacity: read through its block alone, since a readout over the base
            # features too would show the raw values' CCA wherever the model carries less than they do.
            pairs = rivals.true_pairs(split)
            model = rivals.train_centralised(config, split, pairs, steps, seed)
            out[name] = MethodResult(rivals.score_models({m: model for m in split.test}, split,
                                                         with_overrides(config, MODEL_BLOCK_ALONE)), 0.0,
                                     notes={"pairs": len(next(iter(pairs.values()))), "steps": steps, "readout": "model block alone"})
        elif name == "anchors-only model":
            model = rivals.train_centralised(config, split, split.anchors, steps, seed)
            out[name] = MethodResult(rivals.score_models({m: model for m in split.test}, split, config), 0.0, notes={"pairs": len(next(iter(split.anchors.values()))), "steps": steps})
        elif name in (*FEATURE_RIVALS, "ceiling CCA (all true pairs)"):
            if features is None:
                features = rivals.frozen_features(config, split, seed, rivals.true_pairs(split))
            anchor_f, test_f, source, pair_f = features
            if name.startswith("ceiling"):
                # Thousands of pairs: a lighter search (2 folds, no truncation) keeps the N x N fits affordable.
                metrics, notes = rivals.cca_rival(pair_f, test_f, split, folds=2, seed=config.adapter.seed, truncations=(0,),
                                                  regs=(0.01, 0.1))
                notes["pairs"] = len(next(iter(pair_f.values())))
            elif name == "anchors-only CCA":
                # The fold shuffles of fedanchor's server (adapter.seed): with the model block dropped, the two coincide.
                metrics, notes = rivals.cca_rival(anchor_f, test_f, split, folds=config.alignment.readout_folds,
                                                  seed=config.adapter.seed, repeats=config.alignment.readout_repeats)
            elif name == "anchors-only CCA + anchor codebook":
                metrics, notes = codebook_rival(anchor_f, test_f, split, config)
            else:
                metrics, notes = rivals.asif_rival(anchor_f, test_f, split)
            out[name] = MethodResult(metrics, 0.0, notes={**notes, "features": source})
        elif name in FED_RIVALS:
            torch.manual_seed(seed)
            run = FED_RIVALS[name](config, split)
            out[name] = MethodResult(run.metrics, 0.0, bytes_up=run.bytes_up, bytes_down=run.bytes_down,
                                     notes={k: v for k, v in run.notes.items() if k != "losses"})
        else:
            overrides = FEDERATED.get(name, {})
            cfg = with_overrides(config, overrides) if overrides else config
            torch.manual_seed(seed)
            result = run_in_process(cfg, progress=None, split=split, freeze_delta=name == NO_DELTA, evaluate_each_round=False)
            out[name] = MethodResult(result.final_eval, 0.0, overrides=dict(overrides),
                                     bytes_up=[dict(r.bytes_up) for r in result.rounds],
                                     bytes_down=[dict(r.bytes_down) for r in result.rounds],
                                     site_weights=[dict(r.site_weights) for r in result.rounds],
                                     notes={"rounds": cfg.rounds, "local_steps": cfg.train.local_steps})
        out[name].seconds = time.perf_counter() - t0
        say(f"   {_summary(out[name].metrics, HEADLINE_K[config.data.scenario])} ({out[name].seconds:.1f}s)")
    full = fed_rivals.full_finetune_bytes(config, split)
    return BenchResult(config.data.scenario, config, out, time.perf_counter() - started, full)


def codebook_rival(anchor_f: Mapping[str, np.ndarray], test_f: Mapping[str, np.ndarray], split, config: FedAnchorConfig):
    """The nonlinear anchors-only rival: base features plus a codebook block built from k-means centroids of the
    anchors; the number of centroids and the block's form chosen by cross-validation on the anchors
    (``choose_anchor_codebooks``)."""
    cv = {"folds": config.alignment.readout_folds, "seed": config.adapter.seed, "repeats": config.alignment.readout_repeats}

    def score(books: Mapping[str, Codebook]) -> tuple[float, float]:
        return form_score(choose_readout({m: {"base": x, "codebook": books[m](x)} for m, x in anchor_f.items()}, **cv)[1])
    projections = {m: CodebookProjection.fit(x, config.alignment.codebook_components) for m, x in anchor_f.items()}
    books, chosen = choose_anchor_codebooks(projections, anchor_f, score, config.adapter.seed)
    metrics, notes = rivals.cca_rival(anchor_f, test_f, split, extra_blocks=books, **cv)
    return metrics, {**notes, **chosen}


# -- summaries --------------------------------------------------------------------
def directions(metrics: Mapping[str, float]) -> list[str]:
    return sorted({k.split("/")[0] for k in metrics if "->" in k.split("/")[0]})


def mean_recall(metrics: Mapping[str, float], level: str, k: int = 10) -> float:
    key = "recall" if level == "instance" else "semantic_recall"
    values = [metrics[f"{d}/{key}@{k}"] for d in directions(metrics) if f"{d}/{key}@{k}" in metrics]
    return float(np.mean(values)) if values else float("nan")


def _summary(metrics: Mapping[str, float], headline: Mapping[str, int]) -> str:
    return (f"mean instance R@{headline['instance']} {mean_recall(metrics, 'instance', headline['instance']):.3f}, "
            f"semantic R@{headline['semantic']} {mean_recall(metrics, 'semantic', headline['semantic']):.3f}")


def gap_closed(methods: Mapping[str, MethodResult], headline: Mapping[str, int]) -> dict[str, Any]:
    """(method - best anchors-only) / (ceiling - best anchors-only), on mean recall@k over both directions.

    k per level is ``headline`` (HEADLINE_K of the scenario).
    """
    ceilings = {m: methods[m] for m in CEILINGS if m in methods}
    bars = {m: methods[m] for m in ANCHORS_ONLY if m in methods}
    if not ceilings or not bars:
        return {}
    out: dict[str, Any] = {"k": dict(headline), "bar": {}, "ceiling": {}, "methods": {}}
    for level in ("instance", "semantic"):
        k = headline[level]
        best = max(bars, key=lambda m: mean_recall(bars[m].metrics, level, k))
        top = max(ceilings, key=lambda m: mean_recall(ceilings[m].metrics, level, k))
        low, high = mean_recall(bars[best].metrics, level, k), mean_recall(ceilings[top].metrics, level, k)
        out["bar"][level] = {"method": best, "mean_recall": low}
        out["ceiling"][level] = {"method": top, "mean_recall": high}
        for name, res in methods.items():
            value = mean_recall(res.metrics, level, k)
            # Undefined when the ceiling does not beat the bar (tiny splits, quick runs): reported as nan, not as a ratio.
            gap = (value - low) / (high - low) if high - low > 1e-12 else float("nan")
            out["methods"].setdefault(name, {})[level] = gap
            out["methods"][name][f"{level}_recall"] = value
    return out


def _mean_per_site(rounds: list[dict[str, int]] | None) -> float:
    values = [b for rnd in rounds or [] for b in rnd.values()]
    return float(np.mean(values)) if values else float("nan")


def bytes_summary(bench: BenchResult) -> dict[str, Any]:
    """Mean bytes per site per round, up and down, and fedanchor's ratios to FedAvg on LoRA and to full fine-tuning."""
    per = {name: {"up": _mean_per_site(res.bytes_up), "down": _mean_per_site(res.bytes_down)}
           for name, res in bench.methods.items() if res.bytes_up is not None}
    out: dict[str, Any] = {"per_site_per_round": per, "full_finetune_up": bench.full_finetune_bytes}
    ours = per.get("fedanchor", {}).get("up")
    if ours:
        if "FedAvg on PEFT LoRA" in per:
            out["fedavg_lora_over_fedanchor_up"] = per["FedAvg on PEFT LoRA"]["up"] / ours
        if bench.full_finetune_bytes:
            out["full_finetune_over_fedanchor_up"] = bench.full_finetune_bytes / ours
    return out


def _kib(x: float) -> str:
    return "-" if x != x else f"{x / 1024:.1f} KiB"


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
    header = ["method", *(c[2] for c in cols), "CKA", "mutual-kNN@10", "up/site/round", "down/site/round", "wall s"]
    lines = [f"# fedanchor bench: {bench.scenario}", ""]
    cfg = bench.config
    steps = next((r.notes["steps"] for r in methods.values() if "steps" in r.notes), "see notes")
    lines += [f"Split seed {cfg.data.seed}: {cfg.data.n_anchors} anchors, {cfg.data.n_test} held-out pairs, "
              f"private cap {cfg.data.max_private_per_site}; trunk {cfg.trunk.name}; {cfg.rounds} rounds x "
              f"{cfg.train.local_steps} local steps per site (centralised models: the same total, {steps} steps). "
              f"Learned methods are scored in the anchor CCA readout of their own embeddings "
              f"(alignment.readout={cfg.alignment.readout}). Total {bench.seconds:.0f}s.", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(metrics: Mapping[str, float], d: str, level: str, prefix: str = "") -> str:
        return "/".join(_fmt(metrics.get(f"{d}/{prefix}{level}@{k}", float("nan"))) for k in (1, 5, 10))

    lines.append("| chance | " + " | ".join(cell(first, d, level, "chance_") for d, level, _ in cols) + " | | | | | |")
    for name, res in methods.items():
        m = res.metrics
        row = [name, *(cell(m, d, level) for d, level, _ in cols), _fmt(m.get(cka_key, float("nan"))),
               _fmt(m.get(knn_key, float("nan"))), _kib(_mean_per_site(res.bytes_up)) if res.bytes_up else "-",
               _kib(_mean_per_site(res.bytes_down)) if res.bytes_down else "-", f"{res.seconds:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    gaps = gap_closed(methods, HEADLINE_K[bench.scenario])
    lines += ["", "## Gap closed", ""]
    if gaps:
        ki, ks = gaps["k"]["instance"], gaps["k"]["semantic"]
        lines += [f"(method - best anchors-only) / (ceiling - best anchors-only), on mean instance recall@{ki} and mean "
                  f"semantic recall@{ks} over both directions. "
                  f"Bar: instance = {gaps['bar']['instance']['method']} ({_fmt(gaps['bar']['instance']['mean_recall'])}), "
                  f"semantic = {gaps['bar']['semantic']['method']} ({_fmt(gaps['bar']['semantic']['mean_recall'])}); "
                  f"ceiling (best of the paired ceilings): instance = {gaps['ceiling']['instance']['method']} "
                  f"({_fmt(gaps['ceiling']['instance']['mean_recall'])}), semantic = {gaps['ceiling']['semantic']['method']} "
                  f"({_fmt(gaps['ceiling']['semantic']['mean_recall'])}). "
                  "nan: the ceiling does not beat the bar at that level in this run, so no gap is defined.", "",
                  f"| method | mean inst R@{ki} | mean sem R@{ks} | gap closed (instance) | gap closed (semantic) |",
                  "|---|---|---|---|---|"]
        for name in methods:
            g = gaps["methods"][name]
            lines.append(f"| {name} | {_fmt(g['instance_recall'])} | {_fmt(g['semantic_recall'])} | "
                         f"{_fmt(g['instance'])} | {_fmt(g['semantic'])} |")
    else:
        lines.append("needs a ceiling and at least one anchors-only method in the run.")
    sizes = bytes_summary(bench)
    lines += ["", "## Bytes per site per round", "",
              "Measured on the serialized messages (`messages.tensor_nbytes`: the arrays a FLARE DXO carries). "
              f"Full fine-tuning (whole trunk, head and projector of one site, as FedAvg would ship it): "
              f"{_kib(float(bench.full_finetune_bytes or float('nan')))} up."]
    if "fedavg_lora_over_fedanchor_up" in sizes:
        lines.append(f"FedAvg on LoRA factors of the same rank on the same layers sends {sizes['fedavg_lora_over_fedanchor_up']:.1f}x "
                     "fedanchor's bytes up.")
    if "full_finetune_over_fedanchor_up" in sizes:
        lines.append(f"Full fine-tuning sends {sizes['full_finetune_over_fedanchor_up']:.0f}x fedanchor's bytes up.")
    lines += ["", "## Notes", ""]
    for name, res in methods.items():
        if res.notes or res.overrides:
            lines.append(f"- {name}: " + "; ".join(f"{k}={v}" for k, v in {**res.overrides, **res.notes}.items()))
    return "\n".join(lines) + "\n"


def plot_bench(bench: BenchResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(bench.methods)
    headline = HEADLINE_K[bench.scenario]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(8, 0.8 * len(names)), 4.8))
    for offset, level in ((-0.2, "semantic"), (0.2, "instance")):
        k = headline[level]
        ax.bar(x + offset, [mean_recall(bench.methods[n].metrics, level, k) for n in names], 0.4,
               label=f"{level} R@{k} (mean of both directions)")
    gaps = gap_closed(bench.methods, headline)
    for level, style in (("semantic", "--"), ("instance", ":")):
        if gaps:
            ax.axhline(gaps["bar"][level]["mean_recall"], color="grey", linestyle=style, linewidth=1,
                       label=f"best anchors-only, {level}")
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=7)
    ax.set(ylim=(0, 1), ylabel="recall", title=f"fedanchor bench: {bench.scenario}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_bench(bench: BenchResult, out: Path, command: str = "") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "recall.png"}
    paths["json"].write_text(json.dumps(bench.as_dict(), indent=2, default=json_default))
    paths["md"].write_text(results_markdown(bench, command))
    plot_bench(bench, paths["png"])
    return paths


def spread(benches: Sequence[BenchResult]) -> dict[str, dict[str, dict[str, float]]]:
    """Per method and level: mean and standard deviation over splits of the headline recall and the gap closed."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for bench in benches:
        gaps = gap_closed(bench.methods, HEADLINE_K[bench.scenario])
        for name, g in gaps.get("methods", {}).items():
            for level in ("instance", "semantic"):
                out.setdefault(name, {}).setdefault(level, []).append(g[f"{level}_recall"])  # type: ignore[arg-type]
                out[name].setdefault(f"{level}_gap", []).append(g[level])  # type: ignore[arg-type]
    return {name: {key: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), "n": len(v)}
                   for key, v in levels.items()} for name, levels in out.items()}


def spread_markdown(benches: Sequence[BenchResult], command: str = "") -> str:
    """Mean +- sd over splits: the split-to-split spread that a difference between methods must exceed."""
    first = benches[0]
    headline = HEADLINE_K[first.scenario]
    seeds = [b.config.data.seed for b in benches]
    lines = [f"# fedanchor bench: {first.scenario}, {len(benches)} splits (seeds {seeds})", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"| method | inst R@{headline['instance']} | sem R@{headline['semantic']} | gap closed (instance) | gap closed (semantic) |",
              "|---|---|---|---|---|"]

    def pm(d: Mapping[str, float]) -> str:
        return f"{_fmt(d['mean'])} ± {_fmt(d['sd'])}"
    for name, d in spread(benches).items():
        lines.append(f"| {name} | {pm(d['instance'])} | {pm(d['semantic'])} | {pm(d['instance_gap'])} | {pm(d['semantic_gap'])} |")
    return "\n".join(lines) + "\n"


def finite(value: Any) -> Any:
    """NaN and Inf as null: strict JSON readers refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_default(value: Any) -> Any:
    """JSON for what the bench's results hold besides plain types (numpy scalars, tuples); the noisy study uses it too."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)
