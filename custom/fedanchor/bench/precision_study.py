"""The precision study: does precision weighting take a bad site's say away, and is the global model better for it?

Per split, with several sites per modality (``STUDY_SITES``), the noisy-site study
(noisy.py) runs with its references: the clean federation under precision and
under uniform weighting, the federation without the bad site ("clean only"), and
each corruption under both weightings. Per corruption, over the splits:

- ``weight_ratio``: the bad site's final weight / the mean final weight of the clean
  sites of its modality, under precision weighting (target <= 0.5);
- ``uniform_hurt_*``: clean only minus uniform (mean R@10): what a bad site costs
  FedAvg; measurably hurt when, at both levels, the mean over splits exceeds twice its
  standard error (at least 2 splits): a case where it does not proves nothing about recovery;
- ``recovery_*``: (precision - uniform) / (clean only - uniform), from the split means
  (target >= 0.75, counted as met only where uniform is measurably hurt).

And the clean check: precision minus uniform on the clean federation, against one
split standard deviation. ``fedanchor bench --precision`` writes precision.json (the
cases in the documented shape) and precision.md, each split's noisy.* under seed-N/ as the split ends.
Splits run apart (one ``--seeds N`` process each, side by side) are summarised together by

    python -m fedanchor.bench.precision_study runs/prec-s0 runs/prec-s1 runs/prec-s2 --out runs/prec
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import AlignmentConfig, FedAnchorConfig, with_overrides
from .noisy import PRECISION, RATIO_TARGET, RECORDS, UNIFORM, NoisyStudy, noisy_site_study, write_noisy
from .runner import finite

RECOVERY_TARGET = 0.75
DEFAULT_READOUT_BLOCKS = AlignmentConfig().readout_blocks
LEVELS = ("instance", "semantic")
# A loss smaller than twice its standard error over splits is the splits' spread, not the bad site's doing.
HURT_STANDARD_ERRORS = 2.0
# Several sites per modality, so that a bad site has clean peers to be weighed against.
STUDY_SITES: dict[str, dict[str, str]] = {
    "digits": {**{f"hospital-p{i}": "pixels" for i in range(1, 5)}, **{f"hospital-z{i}": "zernike" for i in range(1, 5)}},
    "xray": {"hospital-r1": "report", "hospital-r2": "report", "hospital-r3": "report", "hospital-f1": "findings"},
    "motion": {"site-a1": "accel", "site-a2": "accel", "site-a3": "accel", "site-g1": "gyro"},
}


def study_config(config: FedAnchorConfig) -> FedAnchorConfig:
    """``config`` with the study's sites, unless it names its own."""
    if config.data.sites:
        return config
    return with_overrides(config, {"data.sites": STUDY_SITES[config.data.scenario]})


def precision_study(configs: Sequence[FedAnchorConfig], modes: Sequence[str] | None = None,
                    say: Callable[[str], None] = print, anchors_corrupted: bool = False,
                    workers: int = 1, out: Path | None = None) -> list[NoisyStudy]:
    """One noisy-site study with its clean references per split (one config per split seed); ``anchors_corrupted``:
    the bad site's copy of the anchors passes through its corruption too; ``workers``: processes per split's study.
    With ``out``, each split's noisy.* goes to ``out``/seed-N/ as soon as the split ends, and each federation to
    ``out``/seed-N/federations/ as soon as it ends: the same call over the same ``out`` resumes a cut-off study."""
    studies = []
    for config in configs:
        say(f"== precision study, split seed {config.data.seed} ==")
        folder = Path(out) / f"seed-{config.data.seed}" if out is not None else None
        study = noisy_site_study(study_config(config), modes=modes, say=say, clean_only=True,
                                 anchors_corrupted=anchors_corrupted, workers=workers,
                                 records=folder / RECORDS if folder is not None else None)
        if folder is not None:
            write_noisy(study, folder)
        studies.append(study)
    return studies


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def measurably_hurt(per_split: Sequence[float]) -> bool:
    """Whether uniform averaging's losses against clean only, one per split, add up to more than the splits' spread:
    their mean is positive and over HURT_STANDARD_ERRORS standard errors (needs two splits or more)."""
    losses = [x for x in per_split if not math.isnan(x)]
    if len(losses) < 2:
        return False
    mean = float(np.mean(losses))
    return mean > HURT_STANDARD_ERRORS * float(np.std(losses, ddof=1)) / math.sqrt(len(losses))  # so also > 0


def precision_summary(studies: Sequence[NoisyStudy]) -> dict[str, Any]:
    """The cases (one per corruption, means over splits) and the clean check, as precision.json holds them."""
    if not studies:
        raise ValueError("no study to summarise: run precision_study on at least one split")
    cases = []
    for mode in studies[0].runs:
        figures = [s.figures()[mode] for s in studies]
        recall = {w: {lvl: _mean([f["mean_recall@10"][w][lvl] for f in figures]) for lvl in LEVELS} for w in (PRECISION, UNIFORM)}
        clean = {lvl: _mean([s.clean_only.recall[lvl] for s in studies]) for lvl in LEVELS}
        hurt = {lvl: clean[lvl] - recall[UNIFORM][lvl] for lvl in LEVELS}
        hurt_per_split = {lvl: [s.clean_only.recall[lvl] - f["mean_recall@10"][UNIFORM][lvl]
                                for s, f in zip(studies, figures)] for lvl in LEVELS}
        hurt_measured = all(measurably_hurt(hurt_per_split[lvl]) for lvl in LEVELS)
        recovery = {lvl: (recall[PRECISION][lvl] - recall[UNIFORM][lvl]) / hurt[lvl] if hurt[lvl] > 0 else math.nan
                    for lvl in LEVELS}
        ratio = _mean([f["weight_ratio_final"] for f in figures])
        cases.append({
            "scenario": studies[0].scenario, "corruption": mode, "severity": figures[0]["severity"],
            "bad_site": studies[0].noisy_site, "modality": studies[0].modality,
            "anchors_corrupted": studies[0].anchors_corrupted,
            "readout_blocks": list(studies[0].config.alignment.readout_blocks),
            "weight_ratio": ratio, "weight_ratio_per_split": [f["weight_ratio_final"] for f in figures],
            "recovery_instance": recovery["instance"], "recovery_semantic": recovery["semantic"],
            "uniform_hurt_instance": hurt["instance"], "uniform_hurt_semantic": hurt["semantic"],
            "uniform_hurt_per_split": hurt_per_split,
            "recall_precision": recall[PRECISION], "recall_uniform": recall[UNIFORM], "recall_clean_only": clean,
            "targets_met": {"weight_ratio": bool(ratio <= RATIO_TARGET),
                            "recovery": bool(hurt_measured and all(recovery[lvl] >= RECOVERY_TARGET for lvl in LEVELS)),
                            "uniform_hurt": bool(hurt_measured)},
            "splits": len(studies),
        })
    clean_check = {}
    for lvl in LEVELS:
        precision = [s.reference.recall[lvl] for s in studies]
        uniform = [s.reference_uniform.recall[lvl] for s in studies]
        sd = float(np.std(precision, ddof=1)) if len(precision) > 1 else math.nan
        diff = _mean(precision) - _mean(uniform)
        clean_check[lvl] = {"precision": _mean(precision), "uniform": _mean(uniform), "difference": diff,
                            "split_sd": sd, "within_one_sd": bool(abs(diff) <= sd) if not math.isnan(sd) else None}
    first = studies[0]
    return {"cases": cases, "clean": clean_check, "sites": first.sites, "method": first.reference.method,
            "seeds": [s.config.data.seed for s in studies], "rounds": first.config.rounds,
            "local_steps": first.config.train.local_steps, "trunk": first.config.trunk.name}


def _readout_sentence(cases: Sequence[dict[str, Any]]) -> str:
    blocks = cases[0].get("readout_blocks") if cases else None
    if not blocks or tuple(blocks) == DEFAULT_READOUT_BLOCKS:
        return ""
    return (f" Recall read through the readout over the {' and '.join(blocks)} block{'s' if len(blocks) > 1 else ''} "
            "alone (`alignment.readout_blocks`): without the training-free base features to fall back on, the merged "
            "model's own quality reaches recall.")


def precision_markdown(summary: dict[str, Any], command: str = "") -> str:
    def f(x: float) -> str:
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    lines = ["# Precision study", "", f"Command: `{command}`" if command else "", "",
             (f"Sites {', '.join(f'{s}={m}' for s, m in summary['sites'].items())}; precision weighting "
              f"`precision.method={summary['method']}` against uniform; {summary['rounds']} rounds x "
              f"{summary['local_steps']} local steps, trunk {summary['trunk']}; splits {summary['seeds']}. Recall: mean R@10 "
              f"over both directions. Targets: weight ratio <= {RATIO_TARGET}, recovery >= {RECOVERY_TARGET}, and "
              f"uniform averaging measurably hurt (its mean loss over {HURT_STANDARD_ERRORS:g} standard errors over "
              "splits at both levels; else the case proves nothing)."
              + (" The bad site's corruption sat in its pipeline: its copy of the public anchors was corrupted too."
                 if any(c.get("anchors_corrupted") for c in summary["cases"]) else "")
              + _readout_sentence(summary["cases"])), "",
             "| corruption | bad site | weight ratio | uniform hurt (inst / sem) | recovery (inst / sem) | clean only / uniform / precision, inst | targets (ratio, recovery, hurt) |",
             "|---|---|---|---|---|---|---|"]
    for c in summary["cases"]:
        t = c["targets_met"]
        lines.append(f"| {c['corruption']} (s={c['severity']:g}) | {c['bad_site']} | {f(c['weight_ratio'])} | "
                     f"{f(c['uniform_hurt_instance'])} / {f(c['uniform_hurt_semantic'])} | "
                     f"{f(c['recovery_instance'])} / {f(c['recovery_semantic'])} | "
                     f"{f(c['recall_clean_only']['instance'])} / {f(c['recall_uniform']['instance'])} / "
                     f"{f(c['recall_precision']['instance'])} | "
                     f"{'yes' if t['weight_ratio'] else 'no'}, {'yes' if t['recovery'] else 'no'}, {'yes' if t['uniform_hurt'] else 'no'} |")
    lines += ["", "Clean federation, precision vs uniform: " + "; ".join(
        f"{lvl} {f(v['precision'])} vs {f(v['uniform'])} (difference {f(v['difference'])}, split sd {f(v['split_sd'])})"
        for lvl, v in summary["clean"].items())]
    return "\n".join(lines) + "\n"


def load_splits(folders: Sequence[Path]) -> list[NoisyStudy]:
    """Every split's study under ``folders`` (each holds seed-N/noisy.json, as ``precision_study`` left it), by seed."""
    paths = sorted({p for folder in folders for p in Path(folder).glob("seed-*/noisy.json")})
    if not paths:
        raise FileNotFoundError(f"no seed-N/noisy.json under {[str(f) for f in folders]}: pass the --out folders of "
                                "`fedanchor bench --precision` runs")
    studies = sorted((NoisyStudy.from_dict(json.loads(p.read_text())) for p in paths), key=lambda s: s.config.data.seed)
    seeds = [s.config.data.seed for s in studies]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"split seeds {seeds} repeat: summarise each split once")
    if len({(s.scenario, s.noisy_site, tuple(s.runs), s.anchors_corrupted, s.config.alignment.readout_blocks)
            for s in studies}) != 1:
        raise ValueError("the splits ran different studies (scenario, bad site, corruptions, whether the anchors were "
                         "corrupted or the readout's blocks differ); summarise like with like")
    return studies


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedanchor.bench.precision_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="--out folders of `fedanchor bench --precision` runs")
    parser.add_argument("--out", type=Path, required=True, help="where precision.json, precision.md and seed-N/ go")
    args = parser.parse_args(argv)
    studies = load_splits(args.folders)
    args.out.mkdir(parents=True, exist_ok=True)
    for study in studies:
        folder = next(f for f in args.folders if (f / f"seed-{study.config.data.seed}" / "noisy.json").exists())
        if folder.resolve() != args.out.resolve():
            shutil.copytree(folder / f"seed-{study.config.data.seed}", args.out / f"seed-{study.config.data.seed}",
                            dirs_exist_ok=True, ignore=shutil.ignore_patterns(RECORDS))
    summary = precision_summary(studies)
    (args.out / "precision.json").write_text(json.dumps(finite(summary), indent=2))
    command = "python -m fedanchor.bench.precision_study " + " ".join(str(f) for f in args.folders) + f" --out {args.out}"
    (args.out / "precision.md").write_text(precision_markdown(summary, command))
    print((args.out / "precision.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
