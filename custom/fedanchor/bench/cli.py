"""``fedanchor bench``: every rival and ablation on one split, in one invocation.

    fedanchor bench --scenario motion --trunk tiny --quick --out runs/bench-motion
    fedanchor bench --scenario digits --quick --out runs/bench-digits
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Sequence

from .runner import METHODS, bench_config, run_bench, write_bench


def _parse_set(pairs: Sequence[str]) -> dict:
    import json

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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fedanchor bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("xray", "digits", "motion"), required=True)
    parser.add_argument("--out", required=True, help="folder for results.json, results.md and recall_at_10.png")
    parser.add_argument("--quick", action="store_true", help="few rounds and steps, smaller test and private sets")
    parser.add_argument("--seed", type=int, default=0, help="split, training and adapter seed")
    parser.add_argument("--trunk", default=None, help="all-MiniLM-L6-v2 (default), 'tiny', or a local model folder")
    parser.add_argument("--method", action="append", choices=METHODS, help="run only these methods (repeatable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids oversubscription on a busy small machine)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key for every method")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        config = bench_config(args.scenario, args.quick, args.seed, args.trunk, _parse_set(args.set or []))
        bench = run_bench(config, args.method)
        paths = write_bench(bench, Path(args.out), "fedanchor bench " + shlex.join(argv))
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as err:
        print(f"fedanchor bench: error: {err}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
