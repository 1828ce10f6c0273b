"""Summarise bench splits that ran apart: one ``fedanchor bench --seeds N`` process each, side by side or on
several machines, read back as one multi-split bench.

    python -m fedanchor.bench.splits runs/digits-01 runs/digits-23 runs/digits-45 --out runs/digits

Each folder holds seed-N/results.json (a multi-seed run) or results.json (a single
seed). The summary is what one ``--seeds`` run over every split writes: spread.md,
spread.json and summary.json, with each split's folder copied to seed-N/.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Sequence

from ..config import config_to_dict
from .runner import BenchResult, spread, spread_markdown
from .summary import scenario_summary

SEED_KEYS = ("data.seed", "train.seed", "adapter.seed")  # what differs between the splits of one bench


def result_files(folders: Sequence[Path]) -> list[Path]:
    """Every split's results.json under ``folders`` (seed-N/results.json of a multi-seed run, or a single run's)."""
    paths = sorted({p for folder in folders for p in [*Path(folder).glob("seed-*/results.json"), Path(folder) / "results.json"]
                    if p.is_file()})
    if not paths:
        raise FileNotFoundError(f"no results.json or seed-N/results.json under {[str(f) for f in folders]}: pass the --out "
                                "folders of `fedanchor bench` runs")
    return paths


def load_splits(folders: Sequence[Path]) -> list[tuple[Path, BenchResult]]:
    """Every split's bench under ``folders``, by seed; refuses repeated seeds and unlike benches."""
    benches = sorted(((p.parent, _read(p)) for p in result_files(folders)), key=lambda pb: pb[1].config.data.seed)
    seeds = [b.config.data.seed for _, b in benches]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"split seeds {seeds} repeat: give each split once")
    first_folder, first = benches[0]
    expected = _settings(first)
    for folder, bench in benches[1:]:
        differ = sorted(k for k, v in _settings(bench).items() if expected.get(k) != v)
        if differ or list(bench.methods) != list(first.methods):
            raise ValueError(f"{folder} and {first_folder} ran different benches (settings {differ or 'equal'}, methods "
                             f"{list(bench.methods)} vs {list(first.methods)}); summarise like with like")
    return benches


def _read(path: Path) -> BenchResult:
    try:
        return BenchResult.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a results.json that `fedanchor bench` writes ({type(err).__name__}: {err})") from err


def _settings(bench: BenchResult) -> dict[str, object]:
    """The bench's flattened config and scenario, without the split's seeds."""
    flat: dict[str, object] = {"scenario": bench.scenario}
    for section, values in config_to_dict(bench.config).items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            flat[f"{section}.{key}" if key else section] = value
    return {k: v for k, v in flat.items() if k not in SEED_KEYS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedanchor.bench.splits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="--out folders of `fedanchor bench` runs")
    parser.add_argument("--out", type=Path, required=True, help="where spread.md, spread.json, summary.json and seed-N/ go")
    args = parser.parse_args(argv)
    inside = [f for f in args.folders if args.out.resolve().is_relative_to(Path(f).resolve())]
    if inside:
        parser.exit(2, f"{parser.prog}: error: --out {args.out} lies inside the input folder(s) {[str(f) for f in inside]}; "
                       "write the summary elsewhere\n")
    try:
        loaded = load_splits(args.folders)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    for folder, bench in loaded:
        target = args.out / f"seed-{bench.config.data.seed}"
        if folder.resolve() != target.resolve():
            shutil.copytree(folder, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("seed-*", "spread.*", "summary.json"))
    benches = [b for _, b in loaded]
    command = f"python -m fedanchor.bench.splits {' '.join(str(f) for f in args.folders)} --out {args.out}"
    (args.out / "spread.md").write_text(spread_markdown(benches, command))
    (args.out / "spread.json").write_text(json.dumps(spread(benches), indent=2))
    (args.out / "summary.json").write_text(json.dumps(scenario_summary(benches), indent=2))
    print((args.out / "spread.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
