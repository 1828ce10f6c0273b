#!/usr/bin/env python3
"""Submit a fedanchor job to a provisioned FLARE federation, watch it, download its result, print its metrics.

Runs from an admin startup kit (what `nvflare provision` made for you: a folder holding startup/fed_admin.json,
your certificate and key). The FLARE API connects with mutual TLS as the kit's user; the server's
authorization rules apply to that user's role (a lead may submit; an org_admin may not).

    python admin/fedanchor_admin.py --kit KIT run jobs/xray            # submit, watch, download, print metrics
    python admin/fedanchor_admin.py --kit KIT submit jobs/xray          # prints the job id and the run key
    python admin/fedanchor_admin.py --kit KIT resume jobs/xray --from JOB_ID   # after a crash: continue that run
    python admin/fedanchor_admin.py --kit KIT watch JOB_ID              # a line per status or round change
    python admin/fedanchor_admin.py --kit KIT download JOB_ID [--to DIR]
    python admin/fedanchor_admin.py metrics RESULT_FOLDER               # a downloaded result; no connection needed

Every submitted job gets a run key (--run-key, default: the folder's name and the time): the server and the
sites keep the run's checkpoints and state under it. If the server or a site died while the job ran, restart it
and `resume` the same job folder with the crashed job's id (--from) or its run key (--run-key): the new job
continues from the last checkpoint and ends as the uninterrupted run would (docs/it/crash-recovery.md).

Needs the fedanchor package (and nvflare) installed in the interpreter that runs it. The same operations from
the interactive console (startup/fl_admin.sh) are in admin/CONSOLE.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

try:
    from fedanchor.deploy import admin_api
except ModuleNotFoundError as err:  # run with an interpreter that lacks the package
    sys.exit(f"fedanchor_admin: {err}; run it with the interpreter fedanchor is installed in, e.g. .venv/bin/python")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedanchor_admin.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kit", type=Path, help="your admin startup kit (the folder holding startup/)")
    parser.add_argument("--user", default=None, help="user name (default: the one the kit was provisioned for)")
    parser.add_argument("--timeout", type=float, default=0.0, help="stop watching after this many seconds (0: never)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "submit, watch, download and print metrics"), ("submit", "submit a job folder"),
                            ("resume", "continue a crashed run from its last checkpoint, then as run")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("job", type=Path, help="a FLARE job folder, e.g. jobs/xray (for resume: the one that ran)")
        p.add_argument("--run-key", default=None, help="the run's identity (run/submit default: the folder's name and "
                                                       "the time; resume: the crashed run's key)")
        if name == "resume":
            p.add_argument("--from", dest="from_job", default=None, help="the crashed job's id: its run key is used")
    sub.add_parser("watch", help="follow a job until it ends").add_argument("job_id")
    p = sub.add_parser("download", help="download a finished job's result")
    p.add_argument("job_id")
    p.add_argument("--to", type=Path, default=None, help="destination folder (default: KIT/transfer/)")
    sub.add_parser("metrics", help="print the metrics of a downloaded result").add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command != "metrics" and args.kit is None:
        parser.error(f"{args.command} connects to the server: give your admin kit with --kit")
    if args.command == "resume" and bool(args.run_key) == bool(args.from_job):
        parser.error("resume continues one run: name it with --from JOB_ID (the crashed job) or --run-key KEY, not both")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "metrics":
        admin_api.show_metrics(admin_api.read_result(args.folder))
        return 0
    session = admin_api.open_session(args.kit, args.user)
    try:
        if args.command in ("run", "submit"):
            run_key = args.run_key or admin_api.new_run_key(args.job)
            job_id = admin_api.submit(session, args.job, run_key=run_key, resume=False)
            print(f"submitted {args.job} as job {job_id} (run key {run_key})")
            if args.command == "submit":
                return 0
        elif args.command == "resume":
            run_key = args.run_key or admin_api.run_key_of(session, args.from_job)
            job_id = admin_api.submit(session, args.job, run_key=run_key, resume=True)
            print(f"submitted {args.job} as job {job_id} (resuming run key {run_key})")
            progress = admin_api.resumed_from(session, job_id)
            status = str(session.get_job_meta(job_id).get("status", "")) if progress is None else ""
            if status == admin_api.COMPLETED:
                print(f"run {run_key} had no round left: the job completed at once")
            elif status.startswith(admin_api.TERMINAL_PREFIX):
                print(f"job {job_id} ended {status} before its first round: the server refused to continue "
                      f"run {run_key} (its log.txt says why) or the job failed to start", file=sys.stderr)
                return 1
            elif progress is None:  # slow to start (sites re-registering, a large trunk loading): keep watching
                print(f"job {job_id} is {status or 'not running yet'}; the round it continues from shows once it runs")
            else:
                done, total = progress
                print(f"continuing from round {done}: {done} of {total} rounds were done before the crash" if done < total
                      else f"all {total} rounds of run {run_key} were done before the crash: nothing left to run")
        else:
            job_id = args.job_id
        if args.command in ("run", "watch", "resume"):
            meta = admin_api.watch(session, job_id, timeout=args.timeout)
            if meta.get("status") != admin_api.COMPLETED:
                print(f"job {job_id} ended {meta.get('status')}: {meta.get('job_deploy_detail', '')}", file=sys.stderr)
                return 1
            if args.command == "watch":
                return 0
        folder = admin_api.download(session, job_id, getattr(args, "to", None))
        print(f"result in {folder}")
    finally:
        session.close()
    if args.command in ("run", "resume"):
        print("")
        admin_api.show_metrics(admin_api.read_result(folder))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, TimeoutError, ValueError) as err:
        sys.exit(f"fedanchor_admin: {err}")
    except Exception as err:  # the FLARE API's own errors (AuthorizationError, NoConnection, ...) say what went wrong
        sys.exit(f"fedanchor_admin: {type(err).__name__}: {err}")
