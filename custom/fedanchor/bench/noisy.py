"""The noisy-site study: one site's private data is corrupted; does precision weighting notice?

For each corruption mode (additive noise, a gain shift, shuffled content; see
``data.corrupt``) the same split is trained twice with one site corrupted, once
with precision weighting as configured and once with ``precision.method=uniform``
(FedAvg by sample mass), plus one clean run under precision weighting as the
reference. Recorded per run: every site's merge weight and uncertainty scalar per
round, the final held-out metrics and the wall seconds.

Two figures per mode, each with its target:

- **weight ratio** = the noisy site's merge weight / the mean weight of the clean
  sites *of the same modality*, per round, under precision weighting (target: at
  most 0.5 in the last round). Only sites of one modality are compared because the
  server weighs sites against each other within a modality (pi_k n_k^gamma Lambda,
  times the checks' factors, each judging a site against its modality's peers), so
  a site alone in its modality is never judged; the study therefore needs a
  modality with several sites.
- **recall** = mean recall@10 over both directions, instance and semantic, under
  precision vs uniform weighting (target: precision >= uniform).

``write_noisy`` writes noisy.json, noisy.md and noisy_weights.png. Given a ``records``
folder, each federation is saved there the moment it finishes, with a fingerprint of
what it ran (config, corruption, weighting, package version); the same study started
again over that folder reads those federations back instead of training them, so a
study cut off by a time limit or a lost machine resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import FedAnchorConfig, config_from_dict, config_to_dict, with_overrides
from ..data.corrupt import CORRUPTIONS
from ..data.scenario import FederatedSplit
from ..plots import save_figure
from ..federation.loop import CHECK_FACTORS, RunResult, make_split, run_in_process
from ..federation.server import LEFT_OUT, VOUCHED
from .runner import json_default, mean_recall

PRECISION = "precision"
UNIFORM = "uniform"
RATIO_TARGET = 0.5  # the noisy site's final weight must be at most half a clean site's
RECORDS = "federations"  # the folder, beside noisy.json, where each finished federation of a study is kept
CHECK_PREFIXES = ("anchor_check/", "data_check/", "information_check/", "typicality_check/", LEFT_OUT, VOUCHED)  # the server's figures behind a site's weight


@dataclass(frozen=True)
class NoisyMode:
    """One corruption of the study: the ``data.corrupt`` mode, its default severity and what that means."""

    corruption: str
    severity: float
    meaning: str


# Severities: noise of 3 per-position standard deviations is the level docs/DECISIONS.md, "Precision", measured (the noisy site got
# 0.12-0.20 of the merge against 0.26-0.40 for clean sites); gain 1.0 doubles every value and adds one std;
# shuffle 1.0 scrambles every item. On text, severities above 1 act as 1 (every word replaced / every report shuffled).
NOISY_MODES: dict[str, NoisyMode] = {
    "noise": NoisyMode("noise", 3.0, "additive N(0, (s*std)^2) per position; text/codes: a share min(1, s) of words/codes replaced"),
    "gain": NoisyMode("gain", 1.0, "x -> (1+s) x + s*std (a gain and offset shift); text/codes: acts as noise"),
    "shuffle": NoisyMode("shuffle", 1.0, "each item's positions permuted with probability min(1, s); text/codes: order "
                                         "and pairing scrambled"),
    "blur": NoisyMode("blur", 2.0, "another acquisition: a box blur of radius s (images, signals, vectors); text: "
                                   "reports truncated to a (1 - s) share, at least 10%"),
    "garbage": NoisyMode("garbage", 1.0, "every item replaced by random values of the right shape (per-position mean "
                                         "and std); text/codes: random words / code sets"),
    "small": NoisyMode("small", 0.95, "a very small site: only the first (1 - s) share of its items (at least 2)"),
}
if not all(m.corruption in CORRUPTIONS for m in NOISY_MODES.values()):
    raise RuntimeError(f"a noisy mode names a corruption outside {sorted(CORRUPTIONS)}")


@dataclass
class NoisyRun:
    """One federated run of the study."""

    mode: str | None  # None: the clean reference
    severity: float
    weighting: str  # PRECISION or UNIFORM
    method: str  # the precision.method it ran with
    site_weights: list[dict[str, float]]  # per round, per site (RoundRecord.site_weights)
    site_uncertainty: list[dict[str, float]]  # per round, per site (RoundRecord.site_uncertainty)
    rejected: list[dict[str, str]]  # per round, site -> reason
    metrics: dict[str, float]  # final held-out metrics (the last round's RoundRecord.eval)
    seconds: float
    # per round, per site: the server's checks behind its weight (anchor_check/*, data_check/* of its site metrics)
    site_checks: list[dict[str, dict[str, float]]] = field(default_factory=list)

    @property
    def recall(self) -> dict[str, float]:
        return {level: mean_recall(self.metrics, level) for level in ("instance", "semantic")}

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "mean_recall@10": self.recall}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "NoisyRun":
        """The run ``as_dict`` wrote (derived figures are recomputed, not read)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclass
class NoisyStudy:
    """Every run of a noisy-site study and the figures derived from them."""

    scenario: str
    config: FedAnchorConfig
    noisy_site: str
    modality: str
    sites: dict[str, str]  # site -> modality
    reference: NoisyRun  # clean, precision weighting
    runs: dict[str, dict[str, NoisyRun]]  # mode -> {PRECISION: run, UNIFORM: run}
    seconds: float = 0.0
    modes: dict[str, NoisyMode] = field(default_factory=dict)
    # The federation without the noisy site (precision weighting), and the clean federation under uniform weighting:
    # what uniform averaging loses to a bad site, and whether precision weighting costs a clean federation anything.
    clean_only: NoisyRun | None = None
    reference_uniform: NoisyRun | None = None
    # The corruption sat in the noisy site's pipeline: its copy of the public anchors passed through it too.
    anchors_corrupted: bool = False

    @property
    def clean_peers(self) -> list[str]:
        """The clean sites the noisy one is compared with: those of its own modality."""
        return [s for s, m in self.sites.items() if m == self.modality and s != self.noisy_site]

    def weight_ratio(self, run: NoisyRun) -> list[float]:
        """Per round: noisy site's weight / mean weight of its modality's clean sites (nan where one is missing)."""
        out = []
        for weights in run.site_weights:
            peers = [weights.get(s, math.nan) for s in self.clean_peers]
            mean_peer = float(np.mean(peers)) if peers else math.nan
            noisy = weights.get(self.noisy_site, math.nan)
            out.append(noisy / mean_peer if mean_peer > 0 else math.nan)
        return out

    def figures(self) -> dict[str, dict[str, Any]]:
        """Per mode: weight ratios per round, recalls under both weightings, and whether each target is met."""
        out: dict[str, dict[str, Any]] = {}
        for mode, pair in self.runs.items():
            ratio = self.weight_ratio(pair[PRECISION])
            final = ratio[-1] if ratio else math.nan
            recall = {w: pair[w].recall for w in pair}
            out[mode] = {
                "severity": pair[PRECISION].severity,
                "weight_ratio": ratio,
                "weight_ratio_uniform": self.weight_ratio(pair[UNIFORM]),
                "weight_ratio_final": final,
                "ratio_target_met": bool(final <= RATIO_TARGET),  # nan compares False: not met
                "mean_recall@10": recall,
                "precision_minus_uniform": {lvl: recall[PRECISION][lvl] - recall[UNIFORM][lvl] for lvl in recall[PRECISION]},
                "recall_target_met": {lvl: bool(recall[PRECISION][lvl] >= recall[UNIFORM][lvl]) for lvl in recall[PRECISION]},
            }
            if self.clean_only is not None:
                clean = self.clean_only.recall
                hurt = {lvl: clean[lvl] - recall[UNIFORM][lvl] for lvl in clean}
                out[mode]["uniform_hurt"] = hurt
                out[mode]["recovery"] = {lvl: (recall[PRECISION][lvl] - recall[UNIFORM][lvl]) / hurt[lvl] if hurt[lvl] > 0
                                         else math.nan for lvl in hurt}
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "config": config_to_dict(self.config), "seconds": self.seconds,
            "noisy_site": self.noisy_site, "modality": self.modality, "sites": dict(self.sites),
            "clean_peers": self.clean_peers, "ratio_target": RATIO_TARGET,
            "modes": {k: v.__dict__ for k, v in self.modes.items()},
            "reference": {**self.reference.as_dict(), "weight_ratio": self.weight_ratio(self.reference)},
            "runs": {mode: {w: run.as_dict() for w, run in pair.items()} for mode, pair in self.runs.items()},
            "clean_only": self.clean_only.as_dict() if self.clean_only else None,
            "reference_uniform": self.reference_uniform.as_dict() if self.reference_uniform else None,
            "anchors_corrupted": self.anchors_corrupted, "figures": self.figures(),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "NoisyStudy":
        """The study ``as_dict`` wrote (noisy.json): splits run apart (one process each) are summarised together."""
        def run(v: Mapping[str, Any] | None) -> NoisyRun | None:
            return NoisyRun.from_dict(v) if v else None
        return cls(scenario=values["scenario"], config=config_from_dict(values["config"]), noisy_site=values["noisy_site"],
                   modality=values["modality"], sites=dict(values["sites"]), reference=run(values["reference"]),
                   runs={mode: {w: run(r) for w, r in pair.items()} for mode, pair in values["runs"].items()},
                   seconds=values["seconds"], modes={k: NoisyMode(**v) for k, v in values["modes"].items()},
                   clean_only=run(values["clean_only"]), reference_uniform=run(values["reference_uniform"]),
                   anchors_corrupted=bool(values.get("anchors_corrupted", False)))

    def markdown(self) -> str:
        cfg = self.config
        ref = self.reference
        ref_ratio = self.weight_ratio(ref)
        lines = ["## Noisy-site study", "",
                 (f"Scenario {self.scenario}, split seed {cfg.data.seed}: {cfg.data.n_anchors} anchors, {cfg.data.n_test} "
                 f"held-out pairs; trunk {cfg.trunk.name}; {cfg.rounds} rounds x {cfg.train.local_steps} local steps. "
                 f"Sites: {', '.join(f'{s}={m}' for s, m in self.sites.items())}. Noisy site **{self.noisy_site}** "
                 f"({self.modality}), compared with {', '.join(self.clean_peers)}"
                 f"{'; its corruption in its pipeline, its copy of the anchors corrupted too' if self.anchors_corrupted else ''}. "
                 "Precision weighting = "
                 f"`precision.method={ref.method}`; uniform = `precision.method=uniform`. Total {self.seconds:.0f}s."), "",
                 (f"Weight ratio = noisy site's merge weight / mean weight of the clean {self.modality} sites, per round, "
                 f"under precision weighting (target <= {RATIO_TARGET} in the last round, **bold**). In the clean "
                 f"reference run the same ratio is {_rounds(ref_ratio)}. Recall = mean R@10 over both directions "
                 "(instance / semantic); target: precision >= uniform."), "",
                 ("| mode | severity | noisy site | weight ratio per round | ratio <= 0.5 | inst R@10 precision / uniform "
                 "| sem R@10 precision / uniform | precision >= uniform (inst / sem) | clean reference inst / sem |"),
                 "|---|---|---|---|---|---|---|---|---|"]
        for mode, fig in self.figures().items():
            rec = fig["mean_recall@10"]
            met = fig["recall_target_met"]
            lines.append(
                f"| {mode} | {fig['severity']:g} | {self.noisy_site} | {_rounds(fig['weight_ratio'])} | "
                f"{'yes' if fig['ratio_target_met'] else 'no'} | "
                f"{_fmt(rec[PRECISION]['instance'])} / {_fmt(rec[UNIFORM]['instance'])} | "
                f"{_fmt(rec[PRECISION]['semantic'])} / {_fmt(rec[UNIFORM]['semantic'])} | "
                f"{'yes' if met['instance'] else 'no'} / {'yes' if met['semantic'] else 'no'} | "
                f"{_fmt(ref.recall['instance'])} / {_fmt(ref.recall['semantic'])} |")
        lines += ["", "### Site weights per round", "",
                  "Share of the merge (all sites of a round sum to 1; the noisy site is marked *).", ""]
        sites = list(self.sites)
        header = ["run", "round", *(f"{s}*" if s == self.noisy_site else s for s in sites), "seconds"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        named = [("clean, precision", ref)] + [(f"{mode}, {w}", run) for mode, pair in self.runs.items() for w, run in pair.items()]
        for label, run in named:
            for r, weights in enumerate(run.site_weights):
                cells = [_fmt(weights.get(s, math.nan)) for s in sites]
                lines.append(f"| {label} | {r + 1} | " + " | ".join(cells) + f" | {run.seconds:.1f} |")
        checked = [(mode, pair[PRECISION]) for mode, pair in self.runs.items()
                   if any(checks.get(self.noisy_site) for checks in pair[PRECISION].site_checks)]
        if checked:
            lines += ["", f"Why, under precision weighting: the server's factors on {self.noisy_site} per round "
                      f"({' / '.join(CHECK_FACTORS.values())}; 1 = all its say, - = not judged).", "",
                      "| mode | " + " | ".join(f"round {r + 1}" for r in range(len(checked[0][1].site_checks))) + " |",
                      "|---|" + "---|" * len(checked[0][1].site_checks)]
            for mode, run in checked:
                lines.append(f"| {mode} | " + " | ".join(_factors(checks.get(self.noisy_site, {})) for checks in run.site_checks) + " |")
        rejected = [(label, r + 1, rej) for label, run in named for r, rej in enumerate(run.rejected) if rej]
        if rejected:
            lines += ["", "Rejected contributions: " + "; ".join(f"{label} round {r}: {rej}" for label, r, rej in rejected)]
        lines += ["", "Modes: " + "; ".join(f"`{k}` ({v.meaning})" for k, v in self.modes.items()) + "."]
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> Path:
        """One panel per mode: every site's weight per round under precision weighting, the noisy site in red."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        modes = list(self.runs)
        fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(max(6.0, 4.6 * len(modes)), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            run = self.runs[mode][PRECISION]
            xs = list(range(1, len(run.site_weights) + 1))
            for site in self.sites:
                ys = [w.get(site, math.nan) for w in run.site_weights]
                if site == self.noisy_site:
                    ax.plot(xs, ys, "--", color="tab:red", lw=2.5, marker="X", ms=8, label=f"{site} (noisy)", zorder=3)
                else:
                    same = self.sites[site] == self.modality
                    ax.plot(xs, ys, "-" if same else ":", marker="o", ms=5, label=f"{site} ({self.sites[site]})")
            ratio = self.weight_ratio(run)
            ax.set(title=f"{mode} (severity {run.severity:g}): ratio {_fmt(ratio[-1] if ratio else math.nan)}",
                   xlabel="round", ylabel="share of the merge", ylim=(0, 1))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"noisy-site study, {self.scenario}: site weights under precision weighting "
                     f"({self.reference.method}), noisy site {self.noisy_site}", fontsize=10)
        return save_figure(fig, path)


def _factors(checks: Mapping[str, float]) -> str:
    shown = " / ".join(f"{checks[k]:.2g}" if k in checks else "-" for k in CHECK_FACTORS)
    return f"{shown} (left out)" if checks.get(LEFT_OUT) else f"{shown} (vouched for)" if checks.get(VOUCHED) else shown


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3f}"


def _rounds(ratios: Sequence[float]) -> str:
    cells = [_fmt(x) for x in ratios]
    if cells:
        cells[-1] = f"**{cells[-1]}**"
    return " → ".join(cells)


def resolve_modes(modes: Sequence[str] | Mapping[str, float] | None) -> dict[str, NoisyMode]:
    """Mode names (default severities) or {name: severity}; checked against NOISY_MODES."""
    if modes is None:
        return dict(NOISY_MODES)
    if isinstance(modes, str):
        raise TypeError(f"modes={modes!r} is a string; pass a list such as [{modes!r}]")
    wanted = dict(modes) if isinstance(modes, Mapping) else {m: None for m in modes}
    if not wanted:
        raise ValueError(f"no corruption mode chosen; pick some of {list(NOISY_MODES)}")
    unknown = [m for m in wanted if m not in NOISY_MODES]
    if unknown:
        raise ValueError(f"unknown noisy-site mode(s) {unknown}; choose from {list(NOISY_MODES)}")
    out = {}
    for name, severity in wanted.items():
        base = NOISY_MODES[name]
        if severity is None:
            out[name] = base
            continue
        severity = float(severity)
        if not math.isfinite(severity) or severity <= 0:
            raise ValueError(f"mode {name!r}: severity={severity} must be a finite number > 0 (0 would be the clean run)")
        out[name] = NoisyMode(base.corruption, severity, base.meaning)
    return out


def pick_noisy_site(sites: Mapping[str, str], site: str | None = None) -> str:
    """The given site, checked, or the first site of the first modality with at least two sites."""
    counts: dict[str, int] = {}
    for modality in sites.values():
        counts[modality] = counts.get(modality, 0) + 1
    example = ", ".join(f'"{m}-{i}": "{m}"' for m in counts for i in (1, 2))
    fix = (f"set data.sites so that some modality has two sites, e.g. data.sites={{{example}}} "
           "(and data.max_private_per_site or a smaller split if private data runs short)")
    if site is not None:
        if site not in sites:
            raise ValueError(f"noisy site {site!r} is not a site of this job; its sites are {list(sites)}")
        if counts[sites[site]] < 2:
            raise ValueError(f"site {site!r} is the only {sites[site]!r} site: weights are compared within a modality, "
                             f"so it cannot be down-weighted against anyone; pick a site whose modality has two, or {fix}")
        return site
    for name, modality in sites.items():
        if counts[modality] >= 2:
            return name
    raise ValueError(f"no modality has two sites ({dict(counts)}): weights are compared within a modality, so a "
                     f"noisy-site study needs one with at least two; {fix}")


def _record(result: RunResult, mode: str | None, severity: float, weighting: str, seconds: float) -> NoisyRun:
    return NoisyRun(mode=mode, severity=severity, weighting=weighting, method=result.config.precision.method,
                    site_weights=[dict(r.site_weights) for r in result.rounds],
                    site_uncertainty=[dict(r.site_uncertainty) for r in result.rounds],
                    rejected=[dict(r.rejected) for r in result.rounds],
                    metrics=dict(result.final_eval), seconds=seconds,
                    site_checks=[{site: {k: v for k, v in m.items() if k.startswith(CHECK_PREFIXES)}
                                  for site, m in r.site_metrics.items()} for r in result.rounds])


@dataclass(frozen=True)
class _StudyRun:
    """One federation of a study: what differs between its runs (corruption, weighting, sites), all picklable so
    that a worker process can run it."""

    config: FedAnchorConfig
    split: FederatedSplit
    mode: str | None  # None: a clean run
    severity: float
    weighting: str
    noisy_site: str
    anchors_corrupted: bool
    label: str
    record: Path | None = None  # where the finished run is saved (and read back from, if it ran before)

    def start_rank(self) -> tuple[bool, bool]:
        """Workers start the bad site's precision runs first, then its uniform ones, then the clean references: a study
        cut off by a machine's time limit keeps the weights it exists to measure."""
        return self.mode is None, self.weighting != PRECISION

    def fingerprint(self) -> str:
        """What decides this run's figures: a saved run counts as this one only if its fingerprint is the same."""
        ran = {"config": config_to_dict(self.config), "mode": self.mode, "severity": self.severity,
               "weighting": self.weighting, "noisy_site": self.noisy_site, "anchors_corrupted": self.anchors_corrupted,
               "fedanchor": __version__}
        return hashlib.sha256(json.dumps(ran, sort_keys=True, default=json_default).encode()).hexdigest()


def record_name(label: str) -> str:
    """A run's file name in the records folder, from its label."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") + ".json"


def _saved_run(job: _StudyRun) -> NoisyRun | None:
    """The run saved at ``job.record`` by an earlier start of the same study, if it ran exactly this federation."""
    if job.record is None or not job.record.is_file():
        return None
    try:
        saved = json.loads(job.record.read_text())
        if saved.get("fingerprint") != job.fingerprint():
            return None
        return NoisyRun.from_dict(saved["run"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):  # a damaged record: the run is done again
        return None


def _save_run(job: _StudyRun, run: NoisyRun) -> None:
    if job.record is None:
        return
    job.record.parent.mkdir(parents=True, exist_ok=True)
    partial = job.record.with_suffix(".partial")
    partial.write_text(json.dumps({"fingerprint": job.fingerprint(), "label": job.label, "run": run.as_dict()},
                                  indent=1, default=json_default))
    os.replace(partial, job.record)  # a run killed mid-write leaves no half file under the record's name


def _run_study_run(job: _StudyRun) -> NoisyRun:
    # Same torch seed for every run (as the bench does), so runs differ only by corruption and weighting.
    torch.manual_seed(job.config.train.seed)
    started = time.perf_counter()
    corruptions = {job.noisy_site: (NOISY_MODES[job.mode].corruption, job.severity)} if job.mode is not None else None
    result = run_in_process(job.config, progress=None, corruptions=corruptions, split=job.split,
                            evaluate_each_round=False, corrupt_anchors=job.anchors_corrupted)
    run = _record(result, job.mode, job.severity, job.weighting, time.perf_counter() - started)
    _save_run(job, run)  # in the worker: a run is kept as soon as it ends, whatever happens to the others
    return run


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_all(jobs: Sequence[_StudyRun], workers: int, say: Callable[[str], None]) -> list[NoisyRun]:
    """Every job's run, in order: read back where its record holds the same run, else trained; with ``workers`` > 1
    that many processes train them side by side (a GPU machine's cores), each with this process's torch thread count."""
    def report(job: _StudyRun, run: NoisyRun, saved: bool = False) -> NoisyRun:
        weights = " ".join(f"{s}:{w:.2f}" for s, w in (run.site_weights[-1] if run.site_weights else {}).items())
        source = f"ran earlier, read from {job.record}" if saved else f"{run.seconds:.1f}s"
        say(f"== {job.label} ==\n   final weights {weights} | mean R@10 inst {_fmt(run.recall['instance'])} sem "
            f"{_fmt(run.recall['semantic'])} ({source})")
        return run

    saved = [_saved_run(job) for job in jobs]
    to_run = [job for job, run in zip(jobs, saved) if run is None]
    if len(to_run) < len(jobs):
        say(f"   {len(jobs) - len(to_run)} of {len(jobs)} federations ran earlier (same fingerprint); "
            f"{len(to_run)} to run")
    def in_order(fresh: Iterator[NoisyRun]) -> list[NoisyRun]:
        return [report(job, run, saved=True) if run is not None else report(job, next(fresh))
                for job, run in zip(jobs, saved)]

    if workers <= 1 or len(to_run) <= 1:
        return in_order(_run_study_run(job) for job in to_run)
    # spawn, not fork: a forked child would inherit this process's CUDA context and thread pools.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                             initargs=(torch.get_num_threads(),)) as pool:
        futures = {id(job): pool.submit(_run_study_run, job) for job in sorted(to_run, key=_StudyRun.start_rank)}
        # The full report follows the study's order, which ends on the runs started last: say each end as it comes.
        label_of = {futures[id(job)]: job.label for job in to_run}
        for ended, future in enumerate(as_completed(label_of), 1):
            took = f" ({future.result().seconds:.0f}s)" if future.exception() is None else ", failed"
            say(f"   [{ended}/{len(to_run)}] ended: {label_of[future]}{took}")
        return in_order(futures[id(job)].result() for job in to_run)


def without_site(config: FedAnchorConfig, rest: FederatedSplit, site: str) -> FedAnchorConfig:
    """``config`` for the federation of ``rest``, the split without ``site``: its sites, and no voucher for a site that
    is not there."""
    return with_overrides(config, {"data.sites": rest.site_modality, "precision.vouched_sites":
                                   [s for s in config.precision.vouched_sites if s != site]})


def noisy_site_study(config: FedAnchorConfig, split: FederatedSplit | None = None, site: str | None = None,
                     modes: Sequence[str] | Mapping[str, float] | None = None,
                     say: Callable[[str], None] = print, clean_only: bool = False,
                     anchors_corrupted: bool = False, workers: int = 1, records: Path | None = None) -> NoisyStudy:
    """Run the clean reference and, per mode, the corrupted split under precision and under uniform weighting.

    ``config.precision.method`` is the precision weighting (it must not be "uniform"); ``split`` defaults to
    ``make_split(config)`` and is shared by every run so only the corruption and the weighting differ; ``site``
    defaults to the first site of a modality with two or more sites; ``modes`` are names of NOISY_MODES (their
    default severities) or {name: severity}. ``clean_only`` adds the federation without the noisy site and the clean
    federation under uniform weighting (the precision study's references). ``anchors_corrupted`` puts the corruption
    in the noisy site's pipeline (a broken loader, a scanner setting), so the site's copy of the public anchors passes
    through it too; a small site's anchors stay whole. ``workers`` > 1 runs the study's federations in that many
    processes side by side; the figures are those of one process. ``records``: a folder where each federation is
    saved when it ends, and from which a run with the same fingerprint is read back instead of trained again.
    """
    if config.precision.method == UNIFORM:
        raise ValueError("config.precision.method is 'uniform', so there is no precision weighting to compare; "
                         "set precision.method to 'iterate_variance' (the default)")
    if config.rounds < 1:
        raise ValueError(f"rounds={config.rounds}: the study needs at least one round")
    if workers < 1:
        raise ValueError(f"workers={workers}: give 1 (one run after another) or more processes")
    chosen = resolve_modes(modes)
    started = time.perf_counter()
    split = split or make_split(config)
    sites = {name: data.spec.name for name, data in split.private.items()}
    noisy = pick_noisy_site(sites, site)
    uniform_config = with_overrides(config, {"precision.method": UNIFORM})

    def job(cfg: FedAnchorConfig, mode: str | None, weighting: str, label: str,
            run_split: FederatedSplit | None = None) -> _StudyRun:
        severity = chosen[mode].severity if mode is not None else 0.0
        record = Path(records) / record_name(label) if records is not None else None
        return _StudyRun(cfg, run_split or split, mode, severity, weighting, noisy, anchors_corrupted, label, record)

    say(f"== noisy-site study ({config.precision.method}); noisy site will be {noisy} ({sites[noisy]}) ==")
    jobs = [job(config, None, PRECISION, "clean reference")]
    if clean_only:
        rest = split.without(noisy)
        jobs += [job(uniform_config, None, UNIFORM, "clean, uniform weighting"),
                 job(without_site(config, rest, noisy), None, PRECISION, f"clean only: the federation without {noisy}",
                     rest)]
    jobs += [job(cfg, mode, weighting, f"{mode} (severity {spec.severity:g}) on {noisy}, {weighting} weighting")
             for mode, spec in chosen.items() for weighting, cfg in ((PRECISION, config), (UNIFORM, uniform_config))]
    done = iter(_run_all(jobs, workers, say))
    reference = next(done)
    reference_uniform, without = (next(done), next(done)) if clean_only else (None, None)
    runs = {mode: {PRECISION: next(done), UNIFORM: next(done)} for mode in chosen}
    study = NoisyStudy(scenario=config.data.scenario, config=config, noisy_site=noisy, modality=sites[noisy], sites=sites,
                       reference=reference, runs=runs, seconds=time.perf_counter() - started, modes=chosen,
                       clean_only=without, reference_uniform=reference_uniform, anchors_corrupted=anchors_corrupted)
    for mode, fig in study.figures().items():
        say(f"{mode}: weight ratio {' -> '.join(_fmt(x) for x in fig['weight_ratio'])} "
            f"(target <= {RATIO_TARGET}: {'met' if fig['ratio_target_met'] else 'not met'}); mean R@10 precision/uniform "
            f"inst {_fmt(fig['mean_recall@10'][PRECISION]['instance'])}/{_fmt(fig['mean_recall@10'][UNIFORM]['instance'])}, "
            f"sem {_fmt(fig['mean_recall@10'][PRECISION]['semantic'])}/{_fmt(fig['mean_recall@10'][UNIFORM]['semantic'])}")
    return study


def write_noisy(study: NoisyStudy, out: Path) -> dict[str, Path]:
    """Write noisy.json (every run and figure), noisy.md (the section) and noisy_weights.png into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "noisy.json", "md": out / "noisy.md", "png": out / "noisy_weights.png"}
    paths["json"].write_text(json.dumps(study.as_dict(), indent=2, default=json_default))
    paths["md"].write_text(study.markdown())
    study.plot(paths["png"])
    return paths
