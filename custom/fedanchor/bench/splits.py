"""Summarise bench splits that ran apart: one ``fedanchor bench --seeds N`` process each, side by side or on
several machines, read back as one multi-split bench.

    python -m fedanchor.bench.splits runs/digits-01 runs/digits-23 runs/digits-45 --out runs/digits

Each folder holds seed-N/results.json (a multi-seed run) or results.json (a single
seed). The summary is what one ``--seeds`` run over every split writes: spread.md,
spread.json and summary.json, with each split's folder copied to seed-N/.

Runs of one split with other methods (a rival added later, ``--method`` by
``--method`` on several machines) are merged into that split, provided they ran the
same settings and no method twice; the merged split's results are written afresh
to seed-N/.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Sequence

from ..config import config_to_dict
from .runner import METHODS, BenchResult, spread, spread_markdown, write_bench
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


def load_splits(folders: Sequence[Path]) -> list[tuple[Path | None, BenchResult]]:
    """Every split's bench under ``folders``, by seed (None for the folder of a split merged from several runs);
    refuses a method run twice on one split and unlike benches."""
    by_seed: dict[int, list[tuple[Path, BenchResult]]] = {}
    for path in result_files(folders):
        bench = _read(path)
        by_seed.setdefault(bench.config.data.seed, []).append((path.parent, bench))
    benches = [runs[0] if len(runs) == 1 else (None, merge_runs(runs)) for _, runs in sorted(by_seed.items())]
    first_folder, first = benches[0]
    expected = _settings(first)
    for folder, bench in benches[1:]:
        differ = sorted(k for k, v in _settings(bench).items() if expected.get(k) != v)
        if differ or list(bench.methods) != list(first.methods):
            raise ValueError(f"{folder} and {first_folder} ran different benches (settings {differ or 'equal'}, methods "
                             f"{list(bench.methods)} vs {list(first.methods)}); summarise like with like")
    return benches


def merge_runs(runs: Sequence[tuple[Path, BenchResult]]) -> BenchResult:
    """One split's runs with other methods, as one bench: the methods in the bench's order, the seconds added up."""
    (first_folder, first), seed = runs[0], runs[0][1].config.data.seed
    expected = _settings(first, with_seeds=True)
    methods: dict[str, tuple[Path, object]] = {}
    for folder, bench in runs:
        differ = sorted(k for k, v in _settings(bench, with_seeds=True).items() if expected.get(k) != v)
        if differ:
            raise ValueError(f"{folder} and {first_folder} both ran split seed {seed} with other settings ({differ}); "
                             "only runs of the same split and settings can be merged")
        for name, result in bench.methods.items():
            if name in methods:
                raise ValueError(f"split seed {seed} ran method {name!r} twice, in {methods[name][0]} and {folder}; "
                                 "give each split's method once")
            methods[name] = (folder, result)
    order = {name: i for i, name in enumerate(METHODS)}
    merged = {name: methods[name][1] for name in sorted(methods, key=lambda n: order.get(n, len(order)))}
    return BenchResult(first.scenario, first.config, merged, sum(b.seconds for _, b in runs),
                       next((b.full_finetune_bytes for _, b in runs if b.full_finetune_bytes is not None), None))


def _read(path: Path) -> BenchResult:
    try:
        return BenchResult.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a results.json that `fedanchor bench` writes ({type(err).__name__}: {err})") from err


def _settings(bench: BenchResult, with_seeds: bool = False) -> dict[str, object]:
    """The bench's flattened config and scenario, without the split's seeds unless asked."""
    flat: dict[str, object] = {"scenario": bench.scenario}
    for section, values in config_to_dict(bench.config).items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            flat[f"{section}.{key}" if key else section] = value
    return {k: v for k, v in flat.items() if with_seeds or k not in SEED_KEYS}


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
        if folder is None:
            write_bench(bench, target, f"merged by python -m fedanchor.bench.splits from runs of split seed "
                                       f"{bench.config.data.seed} with other methods")
        elif folder.resolve() != target.resolve():
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
