"""`python -m data ingest | verify | inspect | audit | takedown | manifest | encode` — build, check, question, act
on and encode licensed video datasets."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from conf.errors import ArgumentParser, UserError, at_least, did_you_mean, run_command
from data.storage import location


def _table(title: str, counts, total: int) -> None:
    print(f"\n{title}")
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {name:<32} {count:>7}  {'#' * max(1, round(40 * count / max(total, 1)))}")


def cmd_ingest(args) -> int:
    from data.ingest import (Progress, check_table, ingest_rows, parse_mapping, prepare_output, read_table,
                             rows_from_table, rows_from_video2dataset)

    # Every mistake is found before the output folder is touched.
    mapping = parse_mapping(args.map)
    if bool(args.video2dataset) == bool(args.videos or args.metadata) or (args.videos is None) != (args.metadata is None):
        raise UserError("ingest needs --videos DIR --metadata TABLE, or --video2dataset DIR")
    progress = Progress("ingest", unit="rows")
    if args.video2dataset:
        if not args.video2dataset.is_dir():
            raise UserError(f"--video2dataset {args.video2dataset}: no such folder")
        rows = rows_from_video2dataset(args.video2dataset, mapping, progress)
    else:
        if not args.videos.is_dir():
            raise UserError(f"--videos {args.videos}: no such folder")
        records = read_table(args.metadata)
        check_table(records, mapping, args.metadata)
        rows = rows_from_table(args.videos, records, mapping, progress)
    output = prepare_output(args.out, args.append, args.force)
    report = ingest_rows(rows, output, args.samples_per_shard, args.shard_bytes, progress)
    where = f"a new shard set ({output.prefix}-*.tar) beside its {len(output.earlier_rows)} shards" \
        if output.earlier_rows else args.out
    print(f"ingested {report['accepted']} samples into {where} ({report['manifest']})")
    if report["rejected"]:
        print(f"REJECTED {report['rejected']} rows (details in {report['report']}):")
        for rejection in report["rejections"][:20]:
            print(f"  {rejection['key']}: {'; '.join(rejection['reasons'])}")
    if not report["accepted"]:
        print(f"kino: nothing ingested: every row was rejected (reasons above and in {report['report']})",
              file=sys.stderr)
        return 1
    return 1 if report["rejected"] and args.strict else 0


def cmd_verify(args) -> int:
    from data.inspect import scan
    from data.progress import Progress

    result = scan(args.root, Progress("verify"))
    print(f"{result['samples']} samples checked in {args.root}, {result['good']} good")
    for problem in result["manifest_problems"]:
        print(f"  MANIFEST {problem}")
    for item in result["corrupt"]:
        print(f"  {item['kind']} {item['shard']} {item['key']}: {item['problem']}")
    _table("licenses", result["licenses"], result["samples"])
    bad = len(result["corrupt"]) + len(result["manifest_problems"])
    print(f"\n{'OK' if not bad else f'{bad} problem(s)'}")
    return 1 if bad else 0


def cmd_inspect(args) -> int:
    from data.inspect import scan
    from data.progress import Progress

    result = scan(args.root, Progress("inspect"))
    print(f"{result['samples']} samples in {args.root}, {result['good']} good")
    for item in result["corrupt"]:  # what the tables below leave out, and why
        print(f"  {item['kind']} {item['shard']} {item['key']}: {item['problem']}")
    _table("licenses", result["licenses"], result["samples"])
    _table("resolutions (width x height)", result["resolutions"], result["samples"])
    _table("durations", result["durations"], result["samples"])
    return 0


def cmd_audit(args) -> int:
    from data.inspect import checkpoint_audits, takedown

    if args.rights_holder or args.source:
        hits = takedown(args.run, args.rights_holder, args.source)
        who = args.rights_holder or args.source
        if not hits:
            field = "rights_holders" if args.rights_holder else "sources"
            known = {name for audit in checkpoint_audits(args.run) for counts in audit.get(field, {}).values()
                     for name in counts}
            print(f"no checkpoint of {args.run} trained on samples of {who!r}{did_you_mean(who, known)}",
                  file=sys.stderr)
            return 1
        print(f"checkpoints of {args.run} that trained on samples of {who!r}:")
        for hit in hits:
            shards = ", ".join(f"{s} ({n})" for s, n in sorted(hit["shards"].items()))
            print(f"  {hit['checkpoint']} (step {hit['step']}): {hit['samples']} samples from {shards}")
        return 0
    audits = checkpoint_audits(args.run)
    if not audits:
        print(f"no complete checkpoint with an audit in {args.run}", file=sys.stderr)
        return 1
    latest = [a for a in audits if not a["checkpoint"].startswith("previous")][-1:] or audits[-1:]
    audit = latest[0]
    if args.json:
        print(json.dumps(audit, indent=1))
        return 0
    print(f"{audit['checkpoint']} (step {audit['step']}), policy: {', '.join(audit['policy'])}")
    _table("samples trained per license", audit["license_totals"], sum(audit["license_totals"].values()))
    holders = {}
    for counts in audit["rights_holders"].values():
        for name, count in counts.items():
            holders[name] = holders.get(name, 0) + count
    _table("per rights holder", holders, sum(holders.values()))
    _table("dropped, by reason", audit["dropped"], sum(audit["dropped"].values()) or 1)
    return 0


def cmd_takedown(args) -> int:
    from data.takedown import Criteria, takedown

    keys = None
    if args.keys:
        keys = {line.strip() for line in args.keys.read_text().splitlines() if line.strip()}
    for run in args.run:
        if not (run / "checkpoints").is_dir():
            raise UserError(f"--run {run}: not a run directory (it holds no checkpoints/)")
    try:
        criteria = Criteria(args.rights_holder, args.source, keys)
    except ValueError as error:
        print(f"takedown: {error}", file=sys.stderr)
        return 2
    report = takedown(args.datasets, criteria, args.run, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(report['removed'])} samples ({json.dumps(report['criteria'])}) from "
          f"{len(report['files'])} shard(s):")
    for item in report["files"]:
        after = "deleted (empty)" if item["deleted"] else (item["sha256_after"] or "unchanged (dry run)")
        print(f"  {item['dataset']}/{item['path']}: {item['samples_before']} -> {item['samples_after']} samples, "
              f"sha256 {item['sha256_before'][:16]}... -> {after[:16] if item['sha256_after'] else after}")
    for run, hits in report["checkpoints"].items():
        print(f"checkpoints of {run} that trained on them: "
              + (", ".join(f"{h['checkpoint']} (step {h['step']})" for h in hits) or "none"))
    if not args.dry_run and report["removed"]:
        print(f"report: {args.datasets[0] / 'takedowns'}/takedown-*.json (in every dataset); a run resumed from "
              f"an earlier checkpoint refuses the changed shards unless data.allow_changed_dataset=true")
    return 0


def cmd_encode(args) -> int:
    from conf.schema import ConfigError, load_config
    from data.latent_cache import encode

    # The config alone (validate), not check_data: the caches it names, this one among them, are not read here.
    try:
        cfg = load_config(args.overrides)
    except ConfigError as error:
        print(f"encode: {error}", file=sys.stderr)
        return 2
    names = [s.name for s in cfg.curriculum.stages]
    if args.stage is not None and args.stage not in names:
        print(f"encode: --stage {args.stage!r} is not a stage of the curriculum ({', '.join(names)})", file=sys.stderr)
        return 2
    index = names.index(args.stage) if args.stage is not None else len(names) - 1
    manifest = encode(args.dataset, args.out, cfg, index, args.workers, cfg.data.ray_address)
    cache = manifest["cache"]
    total = sum(s["encoded"] for s in manifest["shards"])
    print(f"encoded {total} samples of {args.dataset} into {args.out} for stage {cache['stage']!r} "
          f"({len(manifest['shards'])} shards; buckets {cache['buckets']})")
    dropped = ", ".join(f"{reason}={count}" for reason, count in sorted(cache["dropped"].items()))
    print(f"dropped: {dropped or 'none'}; train stage {cache['stage']!r} from it with "
          f"curriculum.stages.{index}.latents={args.out} (data.latents={args.out}: every stage of these buckets)")
    return 0


def cmd_manifest(args) -> int:
    """Rewrite a manifest in the other form: a 1M-shard inline manifest is about 170 MB of JSON that every rank would
    parse at start; split, it is a small header and a Parquet table of the shards (data/schema.py)."""
    from data.schema import SPLIT_VERSION, read_manifest, read_manifest_header, write_manifest

    header = read_manifest_header(args.root)
    form = "split (a header and a Parquet shard table)" if header["version"] == SPLIT_VERSION else "inline"
    if not (args.split or args.inline):
        shards = header["num_shards"] if "num_shards" in header else len(header["shards"])
        print(f"{args.root}: manifest version {header['version']}, {form}, {shards} shards")
        return 0
    manifest = read_manifest(args.root)
    write_manifest(args.root, manifest, split_above=0 if args.split else len(manifest["shards"]))
    after = read_manifest_header(args.root)
    print(f"{args.root}: {len(manifest['shards'])} shards, manifest version {header['version']} -> {after['version']}"
          + (f" (shard table {after['shard_table']})" if "shard_table" in after else ""))
    return 0


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m data", description=__doc__.split("\n\n")[0].replace("\n", " "))
    verbs = parser.add_subparsers(dest="verb", required=True)
    ingest = verbs.add_parser("ingest", help="videos + metadata (or video2dataset output) -> shards + manifest")
    ingest.add_argument("--videos", type=Path, help="folder of video files named in the table's `video` column")
    ingest.add_argument("--metadata", type=Path, help="CSV, JSONL or Parquet table: video, caption, license, "
                                                     "source_url, attribution, rights_holder, [clip_span, ...]")
    ingest.add_argument("--video2dataset", type=Path, help="video2dataset output (tars or KEY.mp4/txt/json)")
    ingest.add_argument("--map", action="append", default=[], metavar="FIELD=SOURCE",
                      help="take contract FIELD from SOURCE (a column, or a dotted path in the json)")
    ingest.add_argument("--out", type=location, required=True)
    ingest.add_argument("--samples-per-shard", type=at_least(1, "samples per shard"), default=64)
    ingest.add_argument("--shard-bytes", type=at_least(1, "a shard's bytes"), default=None,
                        help="also close a shard at this size")
    ingest.add_argument("--append", action="store_true",
                        help="--out is a dataset: add these samples to it as a new shard set (one manifest)")
    ingest.add_argument("--force", action="store_true", help="--out is a dataset: replace it")
    ingest.add_argument("--strict", action="store_true", help="exit 1 if any row was rejected")
    ingest.set_defaults(handler=cmd_ingest)
    verify = verbs.add_parser("verify", help="re-read shards, check the manifest, probe every video")
    verify.add_argument("root", type=location)
    verify.set_defaults(handler=cmd_verify)
    inspect = verbs.add_parser("inspect", help="counts per license, resolution and duration histograms")
    inspect.add_argument("root", type=location)
    inspect.set_defaults(handler=cmd_inspect)
    audit = verbs.add_parser("audit", help="what a run trained on; which checkpoints used a rights holder/source")
    audit.add_argument("run", type=Path)
    audit.add_argument("--rights-holder")
    audit.add_argument("--source")
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(handler=cmd_audit)
    takedown = verbs.add_parser("takedown", help="remove a rights holder's (or a source's, or listed) samples from "
                                                 "datasets; report files, hashes and the checkpoints that used them")
    takedown.add_argument("datasets", type=location, nargs="+")
    who = takedown.add_mutually_exclusive_group(required=True)
    who.add_argument("--rights-holder")
    who.add_argument("--source", help="a source URL")
    who.add_argument("--keys", type=Path, help="a file of sample keys, one per line")
    takedown.add_argument("--run", type=Path, action="append", default=[],
                          help="a run directory whose checkpoints to check (repeatable)")
    takedown.add_argument("--dry-run", action="store_true", help="report what would be removed; change nothing")
    takedown.set_defaults(handler=cmd_takedown)
    manifest = verbs.add_parser("manifest", help="say which form a dataset's manifest is in; --split or --inline "
                                                 "rewrites it (datasets above 10,000 shards are written split)")
    manifest.add_argument("root", type=location)
    form = manifest.add_mutually_exclusive_group()
    form.add_argument("--split", action="store_true", help="a header and a Parquet table of the shards")
    form.add_argument("--inline", action="store_true", help="every shard listed in manifest.json")
    manifest.set_defaults(handler=cmd_manifest)

    encode = verbs.add_parser("encode", help="a latent cache: shards -> license gate -> decode -> buckets -> frozen "
                                             "encoders (a Ray Data job) -> latent shards + manifest")
    encode.add_argument("dataset", type=location)
    encode.add_argument("--out", type=location, required=True)
    encode.add_argument("--stage", default=None, help="the curriculum stage whose buckets to fit (default: the last)")
    encode.add_argument("--workers", type=at_least(1, "encoder actors"), default=1, help="encoder actors in the Ray pool")
    encode.add_argument("overrides", nargs="*", help="config overrides, as for python -m train (model encoders, "
                                                     "curriculum, data.fps, data.decoder, ...)")
    encode.set_defaults(handler=cmd_encode)
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.verb != "encode":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.verb == "encode":  # overrides may come after the options too
        args.overrides = list(args.overrides) + unknown
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(run_command("kino", main))
