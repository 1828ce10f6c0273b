"""``fedanchor bench``: every rival and ablation on one split, in one invocation.

    fedanchor bench --scenario motion --trunk tiny --quick --out runs/bench-motion
    fedanchor bench --scenario digits --quick --out runs/bench-digits
    fedanchor bench --scenario digits --seeds 0 1 2 --noisy --out runs/bench-digits-full
    fedanchor bench --scenario digits --quick --anchors 25 50 100 200 400 --out runs/anchors-digits
    fedanchor bench --scenario digits --precision --seeds 0 1 2 --out runs/precision-digits
    fedanchor bench --server-memory --rounds 60 --gc-rounds 0,1,10 --out runs/server-memory

With several --seeds every split gets its own folder (seed-N/) and spread.md gives
mean and standard deviation over splits. --noisy adds the noisy-site study
(noisy.md, noisy.json, noisy_weights.png) on the first split.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .noisy import NOISY_MODES, RECORDS, noisy_site_study, write_noisy
from .runner import METHODS, bench_config, finite, run_bench, spread, spread_markdown, write_bench
from .summary import scenario_summary


def _parse_set(pairs: Sequence[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: write KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _study(out: Path, name: str, run: Callable[[], Any], markdown: Callable[[Any], str]) -> int:
    """One of the single studies (--scale, --refresh, --speed, --anchors): <out>/<name>.json and .md, the table printed."""
    try:
        result = run()
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as err:
        print(f"fedanchor bench: error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(finite(result), indent=2))
    table = markdown(result)
    (out / f"{name}.md").write_text(table)
    print(table)
    return 0


def _server_memory(args: argparse.Namespace, out: Path, command: str) -> int:
    """--server-memory: its own deployment and output files, so not _study's one json + md."""
    from .server_memory import parse_gc_rounds, server_memory_study, write_study

    try:
        study = server_memory_study(args.rounds, parse_gc_rounds(args.gc_rounds))
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"fedanchor bench: error: {err}", file=sys.stderr)
        return 2
    paths = write_study(study, out, command)
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {study['wall_s']:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fedanchor bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("xray", "digits", "motion"),
                        help="the data scenario (needed by every mode but --server-memory)")
    parser.add_argument("--out", required=True, help="folder for results.json, results.md and recall_at_10.png")
    parser.add_argument("--quick", action="store_true", help="few rounds and steps, smaller test and private sets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                        help="split, training and adapter seed; several give the split-to-split spread")
    parser.add_argument("--noisy", action="store_true", help="also run the noisy-site study on the first split")
    parser.add_argument("--precision", action="store_true",
                        help="only the precision study on every split: several sites per modality, each corruption under "
                             "precision and uniform weighting, and the federation without the bad site (precision.json); "
                             "each federation is kept as it ends, so the same command over the same --out resumes")
    parser.add_argument("--scale", action="store_true",
                        help="only the scale figures: server peak memory for 0/2/4/8/16 sites, and FLARE's cost (scale.md)")
    parser.add_argument("--job", default="jobs/motion", help="with --scale: the job run in the simulator and in process")
    parser.add_argument("--speed", action="store_true",
                        help="only time a local step: fedanchor against a plain Hugging Face + peft LoRA step (speed.md)")
    parser.add_argument("--refresh", action="store_true",
                        help="only compare fixed and refreshed GeoLoRA bases at equal bytes (refresh.md); "
                             "give enough rounds, e.g. --set rounds=6")
    parser.add_argument("--anchors", type=int, nargs="+", metavar="N",
                        help="only the anchor budget: the anchors-only CCA and fedanchor at each anchor count, and "
                             "fedanchor's effective anchors (anchors.md, anchors.png)")
    parser.add_argument("--server-memory", action="store_true",
                        help="only the FLARE server's memory over a long job on the provisioned loopback federation, "
                             "once per --gc-rounds setting (results.json, results.md, rss_vs_round.png)")
    parser.add_argument("--rounds", type=int, default=60, help="with --server-memory: rounds of the job (at least 12)")
    parser.add_argument("--gc-rounds", default="0,1,10",
                        help="with --server-memory: ScatterAndGather memory_gc_rounds values, run one after another")
    parser.add_argument("--refresh-every", type=int, default=3, help="with --refresh: T, rounds between basis refreshes")
    parser.add_argument("--noisy-mode", action="append", choices=sorted(NOISY_MODES),
                        help="corruptions of the noisy-site study (repeatable; default all)")
    parser.add_argument("--noisy-anchors", action="store_true",
                        help="put the bad site's corruption in its pipeline: its copy of the public anchors is corrupted "
                             "too (a broken loader or scanner setting rather than bad records)")
    parser.add_argument("--trunk", default=None, help="all-MiniLM-L6-v2 (default), 'tiny', or a local model folder")
    parser.add_argument("--method", action="append", choices=METHODS, help="run only these methods (repeatable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids oversubscription on a busy small machine)")
    parser.add_argument("--workers", type=int, default=1,
                        help="with --noisy or --precision: run the study's federations in this many processes side by "
                             "side (a GPU machine's cores; each uses --threads torch threads)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key for every method")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = "fedanchor bench " + shlex.join(argv)
    out = Path(args.out)
    if args.server_memory:
        return _server_memory(args, out, command)
    if args.scenario is None:
        parser.error("--scenario is required (all modes but --server-memory)")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds {args.seeds} repeats a seed; give each split once")

    def config_of():  # the first split's config, for the single studies
        return bench_config(args.scenario, args.quick, args.seeds[0], args.trunk, _parse_set(args.set or []))

    if args.scale:
        from .scale import bytes_vs_anchors, flare_cost, scale_markdown, server_memory

        def scale() -> dict:
            config = config_of()
            return {"server_memory": server_memory(config), "bytes_vs_anchors": bytes_vs_anchors(config),
                    "flare_cost": flare_cost(Path(args.job).resolve(), out)}

        return _study(out, "scale", scale,
                      lambda r: scale_markdown(r["server_memory"], r["flare_cost"], r["bytes_vs_anchors"]))
    if args.refresh:
        from .refresh import refresh_markdown, refresh_study

        return _study(out, "refresh", lambda: refresh_study(config_of(), every=args.refresh_every), refresh_markdown)
    if args.anchors:
        from .anchors import anchor_budget, anchors_markdown, plot_anchor_budget

        def budget() -> dict:
            study = anchor_budget(config_of(), args.anchors)
            out.mkdir(parents=True, exist_ok=True)
            plot_anchor_budget(study, out / "anchors.png")
            return study
        return _study(out, "anchors", budget, anchors_markdown)
    if args.precision:
        from .precision_study import precision_markdown, precision_study, precision_summary

        def study() -> dict:
            configs = [bench_config(args.scenario, args.quick, seed, args.trunk, _parse_set(args.set or [])) for seed in args.seeds]
            studies = precision_study(configs, modes=args.noisy_mode, anchors_corrupted=args.noisy_anchors,
                                      workers=args.workers, out=out)
            return precision_summary(studies)
        return _study(out, "precision", study, lambda summary: precision_markdown(summary, command))
    if args.speed:
        from .speed import speed_markdown, step_speed

        return _study(out, "speed", lambda: step_speed(config_of()), speed_markdown)
    try:
        benches = []
        for seed in args.seeds:
            config = bench_config(args.scenario, args.quick, seed, args.trunk, _parse_set(args.set or []))
            print(f"== split seed {seed} ==")
            bench = run_bench(config, args.method)
            folder = out if len(args.seeds) == 1 else out / f"seed-{seed}"
            paths = write_bench(bench, folder, command)
            benches.append(bench)
            print(paths["md"].read_text())
            print(f"wrote {', '.join(str(p) for p in paths.values())}")
        if len(benches) > 1:
            (out / "spread.md").write_text(spread_markdown(benches, command))
            (out / "spread.json").write_text(json.dumps(spread(benches), indent=2))
            (out / "summary.json").write_text(json.dumps(scenario_summary(benches), indent=2))
            print((out / "spread.md").read_text())
        if args.noisy:
            config = bench_config(args.scenario, args.quick, args.seeds[0], args.trunk, _parse_set(args.set or []))
            study = noisy_site_study(config, modes=args.noisy_mode, anchors_corrupted=args.noisy_anchors,
                                     workers=args.workers, records=out / RECORDS)
            paths = write_noisy(study, out)
            print(paths["md"].read_text())
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as err:
        print(f"fedanchor bench: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
