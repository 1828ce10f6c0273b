"""``fedanchor job approve|approvals|revoke``: what a hospital's admin runs to admit a job (flare/approval.py).

    fedanchor job approve jobs/xray --kit /opt/flare/hospital-a --by it@hospital-a [--note "trial 3"]
    fedanchor job approvals --kit /opt/flare/hospital-a          # what this site runs, with digests
    fedanchor job revoke 1a2b3c4d --kit /opt/flare/hospital-a     # by digest prefix
    fedanchor job digest jobs/xray --site hospital-a              # the digest alone, nothing written (to compare)

Each command works on the kit's local/approved_jobs.json; the site reads it at every deployment.
"""
from __future__ import annotations

import argparse

SHOWN_SETTINGS = ("rounds", "train.lr", "train.local_steps", "data.scenario", "data.pack_fingerprint", "privacy.dp",
                  "scope", "custom code files")


def cmd_approve(args: argparse.Namespace) -> int:
    from .flare.approval import approvals_file, approve  # FLARE loads only when a job command runs

    approval = approve(args.job, args.kit, approved_by=args.by, note=args.note or "", site=args.site)
    print(f"approved {approval.job!r} (digest {approval.digest[:12]}) in {approvals_file(args.kit)}")
    print("  " + ", ".join(f"{k}={approval.settings[k]}" for k in SHOWN_SETTINGS if k in approval.settings))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .flare.approval import approvals_file, read_approvals

    approvals = read_approvals(approvals_file(args.kit))
    if not approvals:
        print(f"no approved jobs in {approvals_file(args.kit)}: this site refuses every job")
    for a in approvals:
        shown = ", ".join(f"{k}={a.settings[k]}" for k in SHOWN_SETTINGS if k in a.settings)
        print(f"{a.digest[:12]}  {a.job}  approved {a.approved_at} by {a.approved_by}  {shown}"
              + (f"  ({a.note})" if a.note else ""))
    return 0


def cmd_digest(args: argparse.Namespace) -> int:
    from .flare.approval import job_digest

    name, digest, settings = job_digest(args.job, args.site)
    print(f"{digest}  {name} (the app it deploys to {args.site})")
    print("  " + ", ".join(f"{k}={settings[k]}" for k in SHOWN_SETTINGS if k in settings))
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from .flare.approval import revoke

    for a in revoke(args.kit, args.digest):
        print(f"revoked {a.job!r} (digest {a.digest[:12]}); the site refuses it from its next deployment on")
    return 0


def add_commands(job_verbs: argparse._SubParsersAction) -> None:
    """Add approve, approvals and revoke under ``fedanchor job``."""
    p = job_verbs.add_parser("approve", help="let this site run a job folder exactly as it is")
    p.add_argument("job", help="the job folder (holds meta.json)")
    p.add_argument("--kit", required=True, help="this site's startup kit (the folder holding startup/ and local/)")
    p.add_argument("--by", required=True, help="who approves, e.g. it@hospital-a (recorded with the approval)")
    p.add_argument("--note", default=None, help="why, e.g. a ticket or ethics reference")
    p.add_argument("--site", default=None, help="the site's name (default: the one the kit was provisioned for)")
    p.set_defaults(func=cmd_approve)
    p = job_verbs.add_parser("approvals", help="list the jobs this site has approved")
    p.add_argument("--kit", required=True, help="this site's startup kit")
    p.set_defaults(func=cmd_list)
    p = job_verbs.add_parser("digest", help="print a job's digest for a site, writing nothing (compare it with a site's)")
    p.add_argument("job", help="the job folder (holds meta.json)")
    p.add_argument("--site", required=True, help="the site whose app to digest, e.g. hospital-a")
    p.set_defaults(func=cmd_digest)
    p = job_verbs.add_parser("revoke", help="withdraw an approval by digest prefix")
    p.add_argument("digest", help="the first 8 or more characters of the digest (fedanchor job approvals shows them)")
    p.add_argument("--kit", required=True, help="this site's startup kit")
    p.set_defaults(func=cmd_revoke)
