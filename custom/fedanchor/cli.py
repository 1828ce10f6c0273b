"""The ``fedanchor`` command.

    fedanchor run --scenario xray --rounds 3 [--set alignment.lambda_cka=0 ...] [--out runs/x]
    fedanchor compare --scenario xray --rounds 3 --out runs/compare-xray
    fedanchor simulate jobs/xray [--out runs/xray]      (the FLARE simulator; what `make demo` runs)
    fedanchor export-byoc jobs/xray OUT                  (a copy of a job with the package bundled under custom/)
    fedanchor submit --kit ADMIN_KIT --job xray [--wait]  (a job's recipe to a deployment: FLARE's ProdEnv)

``run`` trains in process (every site and the server in one process, the same
functions the FLARE components call). ``compare`` runs the full objective and the
same run without the alignment terms, on the same split and seeds, and prints
held-out recall@1/5/10 in both directions for each.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import FedAnchorConfig, config_from_dict, with_overrides
from .pack_commands import add_commands as add_pack_commands

NO_ALIGNMENT = {"alignment.lambda_cka": 0.0, "alignment.lambda_cross": 0.0}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: write KEY=VALUE, e.g. --set alignment.lambda_cka=0.5")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _base_config(args: argparse.Namespace) -> FedAnchorConfig:
    values: dict[str, Any] = {}
    if args.config:
        values = json.loads(Path(args.config).read_text())
    config = config_from_dict(values)
    overrides = {"data.scenario": args.scenario, "rounds": args.rounds}
    if args.trunk:
        overrides["trunk.name"] = args.trunk
    overrides.update(_overrides(args.set or []))
    return with_overrides(config, {k: v for k, v in overrides.items() if v is not None})


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if "/recall@" in k or "/semantic_recall@" in k}


def cmd_run(args: argparse.Namespace) -> int:
    from .federation.loop import run_in_process
    from .report import print_recall_table, write_run

    config = _base_config(args)
    result = run_in_process(config)
    print_recall_table({"fedanchor": result.final_eval})
    if args.out:
        write_run(Path(args.out), {"fedanchor": result})
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .federation.loop import make_split, run_in_process
    from .report import print_recall_table, write_run

    config = _base_config(args)
    split = make_split(config)
    runs = {}
    for label, cfg in (("full objective", config), ("without alignment terms", with_overrides(config, NO_ALIGNMENT))):
        print(f"== {label} ==", flush=True)
        runs[label] = run_in_process(cfg, split=split)
    print_recall_table({label: r.final_eval for label, r in runs.items()})
    if args.out:
        write_run(Path(args.out), runs)
        print(f"wrote {args.out}/results.json")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    """Validate a site's data folder against the job's modality before a round ever runs."""
    from .data import load_scenario
    from .data.folder import data_file, load_folder
    from .data.pack import load_pack

    modalities = load_pack(args.pack).modalities if args.pack else load_scenario(args.scenario).modalities
    if args.modality not in modalities:
        raise ValueError(f"--modality {args.modality!r} is not a modality of {args.pack or args.scenario}; "
                         f"choose from {sorted(modalities)}")
    spec = modalities[args.modality]
    data = load_folder(args.folder, spec)
    print(f"ok: {len(data)} {spec.kind} items of modality {spec.name!r} in {data_file(args.folder, spec)}; "
          f"first id {data.sample_ids[0]!r}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A global checkpoint as a PEFT DoRA adapter folder (export.py)."""
    from .export import export_state
    from .federation.loop import make_split
    from .flare.jobs import read_job_config
    from .flare.persistor import load_state

    state = load_state(args.checkpoint)
    config = config_from_dict(read_job_config(Path(args.job)))
    split = make_split(config)
    if state.anchor_fingerprint != split.anchor_fingerprint:
        raise ValueError(f"{args.checkpoint} was trained with anchor set {state.anchor_fingerprint[:12]}, the job "
                         f"{args.job} uses {split.anchor_fingerprint[:12]}; give the job that wrote the checkpoint")
    out = export_state(state, config, {m: d.spec for m, d in split.anchors.items()}, args.out, split.feature_stats)
    print(f"wrote {out} (round {state.round}): load it with PeftModel.from_pretrained(<{config.trunk.name}>, {str(out)!r})")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """A demo job or job folder, as its FedAnchorRecipe, to a deployment through ProdEnv (an admin startup kit)."""
    from nvflare.recipe.prod_env import ProdEnv

    from .deploy.admin_api import COMPLETED, kit_user, read_result, show_metrics
    from .flare.recipe import load_recipe

    kit = Path(args.kit).resolve()
    user = args.user or kit_user(kit)  # a folder that is not an admin kit is named before the recipe is built
    recipe = load_recipe(args.job)
    env = ProdEnv(startup_kit_location=str(kit), username=user, login_timeout=args.login_timeout)
    run = recipe.run(env)
    print(f"submitted {recipe.name} as job {run.get_job_id()}")
    if not args.wait:
        return 0
    result = run.get_result(timeout=args.timeout)  # FLARE prints the job's meta as it changes
    status = run.get_status()
    if status != COMPLETED or not result:
        raise RuntimeError(f"job {run.get_job_id()} ended {status} (result {result}); `list_jobs -d "
                           f"{run.get_job_id()}` in the admin console shows why")
    print(f"result in {result}")
    show_metrics(read_result(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":
        from .simulate import main as simulate_main

        return _guarded(simulate_main, argv[1:])
    if argv and argv[0] == "bench":
        from .bench.cli import main as bench_main

        return _guarded(bench_main, argv[1:])
    if argv and argv[0] == "export-byoc":
        from .flare.jobs import main as export_main

        return _guarded(export_main, argv[1:])
    parser = argparse.ArgumentParser(prog="fedanchor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (("run", cmd_run, "train in process and print held-out recall"),
                                  ("compare", cmd_compare, "full objective vs no alignment terms, same split")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--scenario", choices=("xray", "digits", "motion"), default=None)
        p.add_argument("--rounds", type=int, default=None)
        p.add_argument("--trunk", default=None, help="all-MiniLM-L6-v2 (default), 'tiny', or a local model folder")
        p.add_argument("--config", default=None, help="a JSON file of nested config keys")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key, e.g. train.local_steps=10")
        p.add_argument("--out", default=None, help="folder for results.json")
        p.set_defaults(func=func)
    p = sub.add_parser("export", help="a global checkpoint as a PEFT (DoRA) adapter folder")
    p.add_argument("checkpoint", help="e.g. <server run dir>/checkpoints/best.safetensors")
    p.add_argument("--job", required=True, help="the job folder that wrote the checkpoint (its config builds the model)")
    p.add_argument("--out", required=True, help="folder for the adapter, head, tokenizers and fedanchor_export.json")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("check-data", help="check a site's data folder (see fedanchor.data.folder for the format)")
    p.add_argument("folder", help="the folder named by data.path in the site's fedanchor_site.json")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--scenario", choices=("xray", "digits", "motion"), help="the job's bundled scenario")
    where.add_argument("--pack", help="the job's anchor pack folder")
    p.add_argument("--modality", required=True, help="the site's modality, e.g. report or findings")
    p.set_defaults(func=cmd_check_data)
    p = sub.add_parser("submit", help="submit a job's recipe to a deployment (FLARE ProdEnv, an admin startup kit)")
    p.add_argument("--kit", required=True, help="your admin startup kit (the folder holding startup/fed_admin.json)")
    p.add_argument("--job", required=True, help="a demo job's name (xray, hospitals-motion, ...) or a job folder")
    p.add_argument("--user", default=None, help="user name (default: the one the kit was provisioned for)")
    p.add_argument("--wait", action="store_true", help="wait for the job, download its result, print its metrics")
    p.add_argument("--timeout", type=float, default=0.0, help="with --wait: longest wait in seconds (0: no limit)")
    p.add_argument("--login-timeout", type=float, default=30.0, help="seconds to connect to the server")
    p.set_defaults(func=cmd_submit)
    add_pack_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return _guarded(args.func, args)


def _guarded(func, arg) -> int:
    try:
        return int(func(arg) or 0)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as err:
        print(f"fedanchor: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
