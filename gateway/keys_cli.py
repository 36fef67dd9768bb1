"""``igw-keys``: issue, revoke and list API keys; set tenant limits.

    igw-keys issue  --file keys.yaml --tenant acme [--model M ...] [--rpm N] [--tpm N] [--concurrent N]
    igw-keys revoke --file keys.yaml KEY_ID
    igw-keys list   --file keys.yaml
    igw-keys tenant --file keys.yaml acme [--rpm N] [--tpm N] [--concurrent N] [--spend-per-day X] [--spend-per-month X]

`issue` prints the new key once, on stdout; the file keeps only its SHA-256.
Changes are serialized by a lock file beside the key file (``.<name>.lock``),
so concurrent runs never lose each other's edits.
Running gateways pick changes up within `gateway.auth.reload_interval_s`
(or at once on SIGHUP).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.core.keys import (
    KeyEntry,
    TenantEntry,
    hash_key,
    key_file_lock,
    new_key,
    now_iso,
    read_key_file,
    write_key_file,
)
from gateway.vocabulary import INTERACTIVE, PRIORITIES
from igw_common.config import QuotaLimits


def _limits(args, base: QuotaLimits | None = None) -> QuotaLimits:
    base = base or QuotaLimits()
    return QuotaLimits(
        requests_per_minute=args.rpm if args.rpm is not None else base.requests_per_minute,
        tokens_per_minute=args.tpm if args.tpm is not None else base.tokens_per_minute,
        concurrent_streams=args.concurrent if args.concurrent is not None else base.concurrent_streams,
        spend_per_day=args.spend_per_day if args.spend_per_day is not None else base.spend_per_day,
        spend_per_month=args.spend_per_month if args.spend_per_month is not None else base.spend_per_month,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="igw-keys", description="manage the gateway's API key file")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_limits(sp):
        sp.add_argument("--rpm", type=int, help="requests per minute (0 = unlimited)")
        sp.add_argument("--tpm", type=int, help="tokens per minute (0 = unlimited)")
        sp.add_argument("--concurrent", type=int, help="concurrent streams (0 = unlimited)")
        sp.add_argument(
            "--spend-per-day", type=float, help="spend budget per UTC day, in gateway.pricing.currency (0 = none)"
        )
        sp.add_argument("--spend-per-month", type=float, help="spend budget per UTC month (0 = none)")

    issue = sub.add_parser("issue", help="create a key and print it once")
    issue.add_argument("--tenant", required=True)
    issue.add_argument("--model", action="append", default=[], help="allowed model (repeatable; none = all)")
    issue.add_argument("--priority-max", choices=PRIORITIES, default=INTERACTIVE)
    issue.add_argument("--note", default="", help="free text, e.g. who holds the key")
    with_limits(issue)
    revoke = sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    sub.add_parser("list", help="list keys (ids, tenants, state; never secrets)")
    tenant = sub.add_parser("tenant", help="set a tenant's limits")
    tenant.add_argument("name")
    with_limits(tenant)
    for sp in sub.choices.values():
        sp.add_argument("--file", required=True, type=Path, help="the key file (gateway.auth.key_file)")
    args = p.parse_args(argv)

    try:
        if args.cmd == "list":
            return _run(args)
        # Read-modify-write under an exclusive lock: two igw-keys at once must not
        # both read the old file and the second write lose the first one's change.
        with key_file_lock(args.file):
            return _run(args)
    except OSError as err:  # unreadable file, unwritable directory, ...
        print(f"igw-keys: {err.filename or args.file}: {err.strerror or err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    try:
        kf = read_key_file(args.file)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if args.cmd == "issue":
        key_id, key = new_key()
        kf.keys[key_id] = KeyEntry(
            sha256=hash_key(key),
            tenant=args.tenant,
            models=args.model,
            priority_max=args.priority_max,
            limits=_limits(args),
            created=now_iso(),
            note=args.note,
        )
        write_key_file(args.file, kf)
        print(f"issued key {key_id} for tenant {args.tenant}; it is shown only now:", file=sys.stderr)
        print(key)
    elif args.cmd == "revoke":
        if args.key_id not in kf.keys:
            print(f"no key {args.key_id} in {args.file}", file=sys.stderr)
            return 1
        kf.keys[args.key_id] = kf.keys[args.key_id].model_copy(update={"revoked": True})
        write_key_file(args.file, kf)
        print(f"revoked key {args.key_id}", file=sys.stderr)
    elif args.cmd == "tenant":
        old = kf.tenants.get(args.name)
        kf.tenants[args.name] = TenantEntry(limits=_limits(args, old.limits if old else None))
        write_key_file(args.file, kf)
    else:
        for key_id, e in sorted(kf.keys.items()):
            lim = e.limits
            print(
                f"{key_id}  tenant={e.tenant}  {'REVOKED' if e.revoked else 'active'}  "
                f"models={','.join(e.models) or '*'}  rpm={lim.requests_per_minute} tpm={lim.tokens_per_minute} "
                f"concurrent={lim.concurrent_streams}  created={e.created}  {e.note}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
