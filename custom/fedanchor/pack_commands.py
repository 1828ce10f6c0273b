"""``fedanchor pack check|info|export`` and ``fedanchor job new``: a consortium's own federation from files.

    fedanchor pack check my-pack                  # every problem, with the file, the row and the fix
    fedanchor pack info my-pack                   # modalities, counts, fingerprint
    fedanchor pack export --scenario motion --out packs/motion --site-data site-data   # a bundled scenario as a pack
    fedanchor job new --pack my-pack --site hospital-a=ecg --site hospital-b=letter --out jobs/ecg-letters --rounds 5

``job new`` exports a ``FedAnchorRecipe`` (flare/recipe.py): a plain package-only FLARE job (no custom/
folder) that names the pack by path and fingerprint; a site holding another version of the pack refuses it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from .approval_commands import add_commands as add_approval_commands
from .config import config_from_dict, config_to_dict, with_overrides
from .data.pack import MIN_ANCHORS, check_pack, load_pack, write_items, write_pack


def cmd_check(args: argparse.Namespace) -> int:
    problems = check_pack(args.pack, args.min_anchors)
    if problems:
        print(f"{args.pack}: {len(problems)} problem(s)")
        for problem in problems:
            print(f"- {problem}")
        return 1
    pack = load_pack(args.pack, min_anchors=args.min_anchors)
    info = pack.info()
    print(f"ok: pack {pack.name!r}, {info['anchors']} anchors, {info['validation_pairs']} validation pairs, "
          f"modalities {list(pack.modalities)}, fingerprint {pack.fingerprint[:16]}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = load_pack(args.pack).info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"pack {info['name']} at {info['root']}")
    print(f"fingerprint {info['fingerprint']}")
    print(f"{info['anchors']} anchor pairs, {info['validation_pairs']} validation pairs")
    for name, spec in info["modalities"].items():
        print(f"  {name}: {', '.join(f'{k} {v}' for k, v in spec.items())}")
    print(f"licence: {info['licence'] or '(none given)'}")
    print(f"provenance: {info['provenance'] or '(none given)'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A bundled scenario's split as a pack folder, and optionally its sites' private shards as site data folders."""
    from .bench.runner import bench_config
    from .federation.loop import job_pack, site_modality

    config = bench_config(args.scenario, quick=False, seed=args.seed,
                          overrides=_set_values(args.set))
    pack = job_pack(config)
    path = write_pack(args.out, f"{args.scenario}-seed{args.seed}", pack.anchors, pack.validation, pack.licence,
                      pack.provenance, f"the bundled {args.scenario} scenario's anchors and held-out pairs")
    print(f"wrote {path}")
    if args.site_data:
        for site, data in pack.demo_private.items():
            folder = Path(args.site_data) / site
            folder.mkdir(parents=True, exist_ok=True)
            write_items(folder, data)
            print(f"wrote {folder} ({data.spec.name}, {len(data)} private items)")
    print("the scenario's sites, for `fedanchor job new`: "
          + " ".join(f"--site {s}={m}" for s, m in site_modality(config).items()))
    return 0


def cmd_job_new(args: argparse.Namespace) -> int:
    from .flare.recipe import FedAnchorRecipe

    pack = load_pack(args.pack)
    sites = dict(_site_pair(s) for s in args.site)
    unknown = {s: m for s, m in sites.items() if m not in pack.modalities}
    if unknown:
        raise ValueError(f"--site {unknown}: pack {pack.name!r} has modalities {list(pack.modalities)}")
    missing = [m for m in pack.modalities if m not in sites.values()]
    if missing:
        raise ValueError(f"no site holds modality(ies) {missing}; add --site NAME={missing[0]} (every modality of the pack "
                         "needs at least one site)")
    overrides = {**_set_values(args.set), "data.pack": str(pack.root), "data.pack_fingerprint": pack.fingerprint,
                 "data.sites": sites, **({"trunk.name": args.trunk} if args.trunk else {})}
    config = with_overrides(config_from_dict({}), overrides)  # every key checked before anything is written
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"{out} exists and is not empty; choose another --out or pass --force to overwrite it")
    recipe = FedAnchorRecipe(args.name or f"fedanchor-{pack.name}", config_to_dict(config), num_rounds=args.rounds)
    job = recipe.export_folder(out)
    print(f"wrote {job}: pack {pack.name} ({pack.fingerprint[:16]}), sites {sites}, {args.rounds} rounds")
    print(f"try it: fedanchor simulate {job} --site-data <folder holding one data folder per site>")
    return 0


def _set_values(pairs: Sequence[str] | None) -> dict:
    from .cli import _overrides  # the KEY=VALUE parsing of every other command

    return _overrides(pairs or [])


def _site_pair(text: str) -> tuple[str, str]:
    site, sep, modality = text.partition("=")
    if not sep or not site.strip() or not modality.strip():
        raise ValueError(f"--site {text!r}: write NAME=MODALITY, e.g. --site hospital-a=ecg")
    return site.strip(), modality.strip()


def add_commands(sub: argparse._SubParsersAction) -> None:
    pack = sub.add_parser("pack", help="check, describe or export an anchor pack (docs/PACKS.md)")
    verbs = pack.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("check", help="list every problem of a pack, with the file, the row and the fix")
    p.add_argument("pack", help="the pack folder (holds pack.json)")
    p.add_argument("--min-anchors", type=int, default=MIN_ANCHORS, help=f"fewest anchor pairs accepted (default {MIN_ANCHORS})")
    p.set_defaults(func=cmd_check)
    p = verbs.add_parser("info", help="modalities, counts and fingerprint of a pack")
    p.add_argument("pack")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)
    p = verbs.add_parser("export", help="write a bundled scenario's split as a pack (and its site shards as data folders)")
    p.add_argument("--scenario", choices=("xray", "digits", "motion"), required=True)
    p.add_argument("--out", required=True, help="the pack folder to write")
    p.add_argument("--seed", type=int, default=0, help="the split seed (data.seed)")
    p.add_argument("--site-data", default=None, help="also write each site's private shard to <this>/<site>/")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a config key of the split, e.g. data.n_anchors=100")
    p.set_defaults(func=cmd_export)
    job = sub.add_parser("job", help="make a FLARE job for an anchor pack; approve jobs at a site")
    jv = job.add_subparsers(dest="verb", required=True)
    add_approval_commands(jv)
    p = jv.add_parser("new", help="write a package-only FLARE job folder for a pack and its sites")
    p.add_argument("--pack", required=True, help="the pack folder")
    p.add_argument("--site", action="append", required=True, metavar="NAME=MODALITY", help="a site and its modality (repeat)")
    p.add_argument("--out", required=True, help="the job folder to write")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--trunk", default=None, help="all-MiniLM-L6-v2 (default), 'tiny', or a local model folder")
    p.add_argument("--name", default=None, help="the job's name (default fedanchor-<pack name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. train.local_steps=20")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(func=cmd_job_new)


def main(argv: Sequence[str]) -> int:  # for `python -m fedanchor.pack_commands`
    parser = argparse.ArgumentParser(prog="fedanchor", description=__doc__)
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
