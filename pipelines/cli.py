"""The `catalog-embed` command line.

Exit codes: 0 success; 1 the run failed or was refused (nothing committed); 2 bad usage or bad config
(nothing done); 3 the run committed, but its reject ratio crossed `run.warn_reject_ratio` or its drift from the
previous version `run.warn_drift`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import io
import json
import logging
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path

from pipelines.errors import QueryError
from pipelines.logs import configure_logging
from transforms.config import ConfigError

EXAMPLES = """\
examples:
  catalog-embed run --config configs/demo.yaml
  catalog-embed run --config configs/demo.yaml --dry-run          # what a run would do; writes nothing
  catalog-embed run --config configs/demo.yaml --json             # last stdout line: the run's record
  catalog-embed run --config configs/demo.yaml --direct_num_workers=2 --direct_running_mode=multi_processing
  catalog-embed run --config configs/food101.yaml --rehash        # weekly: read and hash every image
  catalog-embed run --config configs/food101.yaml --runner=DataflowRunner --project=P --region=R \\
      --temp_location=gs://B/tmp --sdk_container_image=IMAGE
  catalog-embed query --uri ./lancedb --table demo --like chelsea -k 5
  catalog-embed query --uri ./lancedb --table demo --text "a cup of coffee" --json
  catalog-embed query --uri ./lancedb --table demo --like chelsea --weights image=0.8,color=0.2
  catalog-embed query --uri ./lancedb --table demo --like chelsea --weights behaviour=1
  catalog-embed query --uri ./lancedb --table demo --user ada --weights behaviour=1   # what ada may buy next
  catalog-embed query --uri ./lancedb --table demo --text "a horse" --weights conse=1 --where "category = 'animals'"
  catalog-embed query --uri ./lancedb --table demo --like chelsea --tag run-20261124T020000Z-3f9a1c
  catalog-embed query --uri ./lancedb --table demo --text "a cat" --weights conse=1 --html out/cat.html
  catalog-embed classify --uri ./lancedb --table demo --labels "cat,dog,coffee,rocket" photo1.jpg photo2.png
  catalog-embed evaluate --config configs/food101.yaml --out food101-evaluation.json
  catalog-embed duplicates --uri ./lancedb --table demo --html out/duplicates.html
  catalog-embed outliers --uri ./lancedb --table demo -k 5               # captions that do not fit their picture
  catalog-embed outliers --uri ./lancedb --table demo --isolated --column image
  catalog-embed drift --uri ./lancedb --table demo --from 2 --to 3 --json
  catalog-embed versions --uri ./lancedb --table demo
  catalog-embed rollback --uri ./lancedb --table demo --to run-20261124T020000Z-3f9a1c

exit codes: 0 done; 1 the run failed or was refused (nothing committed); 2 bad usage, config or input
(nothing done); 3 the run committed, but more rows were rejected than run.warn_reject_ratio, the table
drifted more than run.warn_drift from its previous version, or the upkeep after the commit failed
"""


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, where a scheduler's log shows them whole: what is wrong and where help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def unknown_beam_options(args: list[str]) -> list[str]:
    """The arguments that no Beam PipelineOptions class declares: Beam would drop them with a log line, and a
    mistyped flag would become a real run."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for options in {str(cls): cls for cls in PipelineOptions.__subclasses__()}.values():
        options._add_argparse_args(parser)
    return parser.parse_known_args(args)[1]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="catalog-embed",
        description="Embed a product or image catalog into a versioned LanceDB table, and search it.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    logs = OneLineParser(add_help=False)
    logs.add_argument("-v", "--verbose", action="store_true",
                      help="also show the libraries' logs, warnings and progress bars (quiet by default)")
    logs.add_argument("--log-format", choices=("text", "json"), default="text",
                      help="log lines as text (default) or one JSON object per line, for log collectors")
    add_command = functools.partial(commands.add_parser, parents=[logs])

    run = add_command(
        "run", help="run the embedding job for a config",
        description="Run the nightly job. Arguments it does not know are Beam pipeline options "
                    "(--runner, --direct_num_workers, --temp_location, --project, ...). Without --runner it runs on "
                    "Beam's FnApiRunner, in this process or in --direct_num_workers=N worker processes "
                    "(--direct_running_mode=multi_processing); it never downloads or starts Prism, which "
                    "--runner=PrismRunner asks for. DaskRunner is refused: it loses elements of this pipeline.")
    run.add_argument("--config", required=True, help="the job's YAML config (see configs/)")
    run.add_argument("--run-id", help="a name for this run, unique per table (default: the UTC time and a random "
                                      "suffix); tags the table version run-<run id>")
    run.add_argument("--dry-run", action="store_true",
                     help="read the catalog and compare it with the table, then print what a run would do (new, "
                          "changed per encoder, unchanged, deleted, rejected, encode work) and write nothing")
    run.add_argument("--json", action="store_true",
                     help="print the run's record (as in <table>_runs: status, counts, encoded per encoder, table "
                          "version, seconds), or with --dry-run the plan, as one JSON line: all of stdout")
    run.add_argument("--reembed", action="store_true",
                     help="encode every item again with every encoder, keeping no stored vector (a changed, added or "
                          "removed encoder needs no flag: only its column is filled again)")
    run.add_argument("--max-encode", type=_count, metavar="N",
                     help="a budget: at most N forward passes in all, the rest left for later runs in "
                          "run.backfill_order (overrides run.max_encode; the summary says how many runs are left)")
    run.add_argument("--max-delete-ratio", type=_ratio, metavar="R",
                     help="allow this run to delete up to this share of the table's rows (0 to 1; overrides "
                          "output.max_delete_ratio, 0.1 by default): for a catalog that really lost that many items")
    run.add_argument("--rehash", action="store_true",
                     help="read and hash every image instead of trusting an unchanged size and modification time "
                          "(catches files rewritten in place with the same stat; costs a read of every image)")

    query = add_command("query", help="find similar items in a table",
                                description="Search a table; scores are higher for more similar items.")
    _table_arguments(query)
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--like", metavar="ID", help="items like this stored item, by every encoder it has a vector from")
    what.add_argument("--text", metavar="TEXT",
                      help="items matching these words: their text, and their images through multimodal encoders")
    what.add_argument("--image", metavar="PATH", help="items that look like this picture, by every image encoder")
    what.add_argument("--user", metavar="ID",
                      help="items for this user, like the mean of the items in their rows of the interaction log "
                           "(user_id, or session_id in a log without one), leaving out those items")
    query.add_argument("--interactions", metavar="PATH",
                       help="the interaction log for --user (default: the one the table's item2vec encoder was "
                            "trained on, as its path was given to that run)")
    query.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    query.add_argument("--weights", metavar="NAME=W,...",
                       help="weigh the encoders for this query, e.g. text=0.2,image=0.8 (default: the table's)")
    query.add_argument("--where", metavar="SQL", help="filter items first, e.g. \"category = 'food'\"")
    query.add_argument("--hybrid", action="store_true",
                       help="with --text: fuse the vector ranking with full-text search (BM25 over the items' text) "
                            "by their scores, for words embeddings miss (SKUs, brands, rare terms)")
    _version_arguments(query)
    _report_outputs(query)

    classify = add_command(
        "classify", help="zero-shot labels for images, through the table's multimodal encoder",
        description="Give each image a probability per label, from the cosines between the image and the label "
                    "words (through prompt templates) in a multimodal encoder's space (conse or open-clip).")
    _table_arguments(classify)
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="image files or gs://, s3:// URIs")
    classify.add_argument("--labels", required=True, metavar="A,B,...", help="the candidate labels, comma-separated")
    classify.add_argument("--template", action="append", metavar="TEXT",
                          help="a prompt with {} for the label, repeatable (default: 'a photo of a {}.' and 3 more)")
    classify.add_argument("--encoder", metavar="NAME", help="which multimodal encoder, if the table has several")
    classify.add_argument("--json", action="store_true", help="print JSON instead of a table")

    evaluate = add_command(
        "evaluate", help="retrieval and zero-shot quality of a config's table, from its labels",
        description="Per vector column, leave-one-out retrieval quality with the catalog's labels (recall@1/5/10, "
                    "mAP@10, exact search); per multimodal encoder, zero-shot top-1 accuracy over the set of labels "
                    "and, with --queries, text-to-image recall@1/5.")
    evaluate.add_argument("--config", required=True, help="the job's YAML config; its output table is evaluated")
    evaluate.add_argument("--out", metavar="FILE", help="the JSON report (default: <table>-evaluation.json)")
    evaluate.add_argument("--template", action="append", metavar="TEXT", help="zero-shot prompt with {}, repeatable")
    evaluate.add_argument("--queries", metavar="FILE",
                          help="a CSV or JSONL file of columns query,id: text-to-image recall@1/5 of each "
                               "multimodal encoder, the queries' words against all the table's images")
    evaluate.add_argument("--where", metavar="SQL", help="evaluate only the items this filter picks, e.g. "
                                                         "\"split = 'test'\" for Food-101's protocol")

    duplicates = add_command(
        "duplicates", help="groups of near-duplicate items (re-uploaded photos, repeated listings)",
        description="Group items whose vectors in one column are linked by cosines at or over a threshold (connected "
                    "components of such pairs); a group's score is the lowest cosine between two of its members. "
                    "Exact on small tables, partitioned like an IVF index on large ones.")
    _table_arguments(duplicates)
    duplicates.add_argument("--column", metavar="NAME",
                            help="an encoder's name, or 'vector' for the combined one (default: the first image "
                                 "encoder, else 'vector')")
    duplicates.add_argument("--threshold", type=float, metavar="X",
                            help="the cosine that makes two items duplicates (default per encoder kind, measured: "
                                 "0.75 for cnn; see docs/health.md, 'Catalog health')")
    _version_arguments(duplicates)
    _report_outputs(duplicates)

    outliers = add_command(
        "outliers", help="captions that do not describe their picture, or items far from all others",
        description="Rank items by how much their text and image vectors disagree, in a space both share (a text "
                    "encoder and conse over its model, or CLIP's towers), held against their best matches among "
                    "other items; with --isolated, by 1 - the mean cosine to their nearest neighbours in one column.")
    _table_arguments(outliers)
    outliers.add_argument("--between", metavar="A,B",
                          help="the text and image encoders to compare (default: the table's text encoder and the "
                               "first image encoder in its space)")
    outliers.add_argument("-k", type=int, default=20, help="how many items (default 20)")
    outliers.add_argument("--isolated", action="store_true", help="items farthest from their nearest neighbours")
    outliers.add_argument("--column", default="vector", metavar="NAME",
                          help="with --isolated: an encoder's name or 'vector' (default)")
    outliers.add_argument("--neighbours", type=int, default=5, metavar="M",
                          help="with --isolated: how many nearest neighbours (default 5)")
    _version_arguments(outliers)
    _report_outputs(outliers)

    drift = add_command(
        "drift", help="how the table moved between two versions",
        description="Per vector column, the energy distance between two versions' vectors (0 when they agree, up "
                    "to 2) and how far the mean moved, on a sample of each; the items added and removed, and the "
                    "items whose vectors moved most.")
    _table_arguments(drift)
    drift.add_argument("--from", dest="version_from", metavar="V",
                       help="a version number or tag (default: the version of the run before the one that made --to)")
    drift.add_argument("--to", dest="version_to", metavar="W", help="a version number or tag (default: the latest)")
    _report_outputs(drift)

    versions = add_command("versions", help="list a table's versions, tags and runs")
    _table_arguments(versions)
    versions.add_argument("--json", action="store_true", help="print JSON instead of tables")

    rollback = add_command(
        "rollback", help="restore an earlier version as the table's new latest version",
        description="Restore the content of an earlier version (a number or a tag such as run-ID) as a new "
                    "version. Nothing is lost: the versions after it stay in the history.")
    _table_arguments(rollback)
    rollback.add_argument("--to", required=True, metavar="TAG_OR_VERSION", help="the version number or tag")

    serve = add_command(
        "serve", help="serve a table's search, items, images, versions and health reports, and a page to look",
        description="An HTTP service over one table: POST /api/search (text, an image, like or user; weights, "
                    "filters, k, version or tag), GET /api/items/{id}, /api/items/{id}/image, /api/versions, "
                    "/api/health/{duplicates|outliers|drift}, /healthz, /metrics, the OpenAPI schema at /docs, "
                    "and a page at /. It serves the latest version, and a version a run commits within 5 seconds. "
                    "It answers only Host names it knows and refuses cross-site POSTs; beyond loopback it needs a "
                    "token or --no-auth (docs/search.md, 'Safe by default').")
    _table_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="the address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8080, help="the port (default 8080)")
    serve.add_argument("--allow-sql-filter", action="store_true",
                       help="also take a raw SQL filter (`where`) in searches; without it, only structured "
                            "filters (field, operator, value) on the table's fields")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a Host name the service answers to besides the bound host, localhost, 127.0.0.1 and "
                            "[::1] (any IP address is taken); repeat for more, '*' for any. Others get a 403, "
                            "which stops DNS rebinding")
    serve.add_argument("--token-file", metavar="FILE",
                       help="a file holding the token requests must send ('Authorization: Bearer TOKEN'; the "
                            "page asks for it once); or set CATALOG_EMBED_TOKEN. Needed beyond loopback")
    serve.add_argument("--no-auth", action="store_true",
                       help="serve beyond loopback without a token (behind a proxy that authenticates)")
    return parser


def _version_arguments(parser: argparse.ArgumentParser) -> None:
    at = parser.add_mutually_exclusive_group()
    at.add_argument("--version", type=int, help="the table as it was at this version")
    at.add_argument("--tag", help="the table as it was at this tag (each run tags run-<run id>)")


def _report_outputs(parser: argparse.ArgumentParser) -> None:
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument("--html", metavar="FILE",
                        help="also write a self-contained contact sheet (thumbnails, ids, fields, scores)")


def _table_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uri", required=True, help="the LanceDB folder or gs://, s3:// prefix")
    parser.add_argument("--table", required=True, help="the table name (output.table of the config)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    configure_logging(args.verbose, args.log_format)      # before Beam is imported: it logs as it loads
    unknown = unknown_beam_options(extra) if args.command == "run" else extra
    if unknown:
        known = "catalog-embed's or Beam's pipeline options" if args.command == "run" else "its options"
        print(f"catalog-embed {args.command}: error: unrecognized arguments: {' '.join(unknown)} (not among {known}; "
              f"see catalog-embed {args.command} --help)", file=sys.stderr)
        return 2
    if args.command != "run":       # a run takes them from its options (pipelines/nightly.py)
        _default_filesystem_options()
    try:
        handler = {"run": _run, "query": _query, "versions": _versions, "rollback": _rollback,
                   "classify": _classify, "evaluate": _evaluate, "duplicates": _duplicates, "outliers": _outliers,
                   "drift": _drift, "serve": _serve}[args.command]
        return handler(args, extra)
    except ConfigError as err:
        print(f"catalog-embed: config error: {err}", file=sys.stderr)
        return 2
    except (QueryError, FileNotFoundError) as err:
        print(f"catalog-embed: {err}", file=sys.stderr)
        return 2


def _default_filesystem_options() -> None:
    """Beam's object stores (s3://, gs://) want options outside a pipeline too: the defaults, with which
    they take their settings from the standard environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS)."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    FileSystems.set_options(PipelineOptions([]))


def entry_point() -> None:
    """The `catalog-embed` console script."""
    code = main()
    # Python's exit-time collection walks every object the ML libraries made (4,000 modules after
    # sentence-transformers: 1.4 s of a nightly run); frozen, they go with the process like the rest.
    gc.freeze()
    sys.exit(code)


def _ratio(text: str) -> float:
    """A share from 0 to 1 (argparse's type for ratios)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, not {text!r}")
    return value


def _count(text: str) -> int:
    """A whole number, 0 or more (argparse's type for counts)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, not {text!r}")
    return int(text)


def new_run_id() -> str:
    """The UTC time and a random suffix: runs started in the same second still tag their own versions."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipelines.nightly import run_job
    from pipelines.report import print_plan, print_run_summary, run_json
    from transforms.config import load_config

    config = load_config(args.config)
    if args.max_encode is not None:
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, max_encode=args.max_encode))
    if args.max_delete_ratio is not None:
        config = dataclasses.replace(config, output=dataclasses.replace(config.output,
                                                                         max_delete_ratio=args.max_delete_ratio))
    run_id = args.run_id or new_run_id()
    # With --json, stdout is the one JSON line (a file of runs is JSON lines); the summary is logged.
    summary_to = _logged_lines() if args.json else contextlib.nullcontext()
    if args.dry_run:
        plan = run_job(config, run_id, beam_args, reembed=args.reembed, rehash=args.rehash, dry_run=True)
        with summary_to:
            print_plan(plan)
        if args.json:
            print(json.dumps(plan, sort_keys=True))
        return 0
    try:
        run = run_job(config, run_id, beam_args, reembed=args.reembed, rehash=args.rehash)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the run is reported and exits 1
        logging.getLogger("catalog_embed").exception("run %s failed", run_id)
        print(f"catalog-embed: run {run_id} failed, nothing committed: {type(err).__name__}: {err}", file=sys.stderr)
        run = {"run_id": run_id, "status": "failed", "message": f"{type(err).__name__}: {err}"}
    else:
        with summary_to:
            print_run_summary(run)
        if run["status"] == "failed":
            print(f"catalog-embed: run {run_id} failed, nothing committed: {run['message']}", file=sys.stderr)
    if args.json:
        print(run_json(run))
    if run["status"] == "failed":
        return 1
    warnings = [_warn_rejects(run, config.run.warn_reject_ratio), _warn_drift(run, config.run.warn_drift),
                _warn_upkeep(run), _warn_counts(run)]
    return 3 if any(warnings) else 0


@contextlib.contextmanager
def _logged_lines():
    """What the block prints, as log lines on stderr instead (in the log format asked for)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        yield
    for line in printed.getvalue().splitlines():
        logging.getLogger("catalog_embed").info(line)


def _warn_rejects(run: dict, warn_ratio: float) -> bool:
    if run.get("read") is None:           # a run settled from the table after it failed: its counts were lost
        return False
    failed = run["rejected"] + (run.get("kept") or 0)
    ratio = failed / run["read"] if run["read"] else 0.0
    if ratio <= warn_ratio:
        return False
    print(f"catalog-embed: run {run['run_id']} committed with {failed} of {run['read']} rows rejected "
          f"({ratio:.1%}; the table kept its rows for {run.get('kept') or 0} of them), over run.warn_reject_ratio "
          f"{warn_ratio:.1%}; see the rejects table", file=sys.stderr)
    return True


def _warn_counts(run: dict) -> bool:
    """A committed run whose counts do not add up (docs/safety.md): for whoever watches the scheduler to look at."""
    if "the counts do not add up" not in (run.get("message") or ""):
        return False
    print(f"catalog-embed: run {run['run_id']} committed version {run['table_version']}, but {run['message']}",
          file=sys.stderr)
    return True


def _warn_upkeep(run: dict) -> bool:
    if run.get("upkeep") in (None, "done"):
        return False
    print(f"catalog-embed: run {run['run_id']} committed version {run['table_version']}, but its upkeep is not done "
          f"({run['upkeep']}); the next run does it", file=sys.stderr)
    return True


def _warn_drift(run: dict, warn_score: float) -> bool:
    # A column that a backfill fills moves by design, and the combined vector with it.
    filling = set((run.get("backfill") or {}).get("encoders", {}))
    expected = filling | ({"vector"} if filling else set())
    over = {name: score for name, score in (run.get("drift") or {}).items()
            if score > warn_score and name not in expected}
    if not over:
        return False
    print(f"catalog-embed: run {run['run_id']} committed version {run['table_version']}, which drifted from the "
          f"previous one over run.warn_drift {warn_score}: " + ", ".join(f"{k} {v:.4f}" for k, v in over.items())
          + "; see catalog-embed drift", file=sys.stderr)
    return True


def _query(args: argparse.Namespace, _extra: list[str]) -> int:
    from pipelines.report import print_results
    from pipelines.search import query as q

    if args.k < 1:
        print("catalog-embed: -k must be at least 1", file=sys.stderr)
        return 2
    if args.interactions and args.user is None:
        print("catalog-embed: --interactions is for --user", file=sys.stderr)
        return 2
    if args.hybrid and args.text is None:
        print("catalog-embed: --hybrid is for --text", file=sys.stderr)
        return 2
    table = _open_at(args)
    image = q.query_bytes(args.image) if args.image is not None else None
    found = q.answer(table, q.Asked(args.k, args.text, args.like, args.user, image, args.image or "",
                                    q.parse_weights(args.weights, table), args.where, args.hybrid, args.interactions))
    results = found.results
    if args.user is not None:
        owned = found.owned
        print(f"user {args.user}: {len(owned)} items in the log ({', '.join(owned[:10])}"
              f"{', ...' if len(owned) > 10 else ''}), left out of the results",
              file=sys.stderr if args.json else sys.stdout)   # stdout stays one JSON line
    if args.json:
        print(json.dumps(results, default=str))
        return 0
    print_results(results)
    if args.html:
        from pipelines.search import contact_sheet

        contact_sheet.write(args.html, [("", results)], f"{args.table}: {len(results)} results", _describe_query(args))
        print(f"contact sheet: {args.html}")
    return 0


def _describe_query(args: argparse.Namespace) -> str:
    what = {"like": args.like, "text": args.text, "image": args.image, "user": args.user}
    parts = [f"--{k} {v!r}" for k, v in what.items() if v is not None]
    parts += [f"--{k} {getattr(args, k)}" for k in ("weights", "where", "version", "tag") if getattr(args, k)]
    parts += ["--hybrid"] if args.hybrid else []
    return " ".join(parts + [f"-k {args.k}"])


def _classify(args: argparse.Namespace, _extra: list[str]) -> int:
    from pipelines.report import print_labels
    from pipelines.search.query import open_table
    from pipelines.search.zero_shot import DEFAULT_TEMPLATES, classify

    table = open_table(args.uri, args.table)
    results = classify(table, args.images, args.labels.split(","), args.template or DEFAULT_TEMPLATES, args.encoder)
    if args.json:
        print(json.dumps(results))
    else:
        print_labels(results)
    return 0


def _evaluate(args: argparse.Namespace, _extra: list[str]) -> int:
    from pipelines.report import print_evaluation
    from pipelines.search.evaluate import evaluate, read_queries
    from pipelines.search.query import open_table
    from pipelines.search.zero_shot import DEFAULT_TEMPLATES
    from transforms.config import load_config

    config = load_config(args.config)
    queries = read_queries(args.queries) if args.queries else ()
    report = evaluate(open_table(config.output.uri, config.output.table), args.template or DEFAULT_TEMPLATES, queries,
                      args.where)
    out = args.out or f"{config.output.table}-evaluation.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print_evaluation(report)
    print(f"report: {out}")
    return 0


def _duplicates(args: argparse.Namespace, _extra: list[str]) -> int:
    from pipelines.health.reports import duplicates_report

    table = _open_at(args)
    return _print_report(args, table, duplicates_report(table, args.column, args.threshold))


def _outliers(args: argparse.Namespace, _extra: list[str]) -> int:
    from pipelines.health.reports import outliers_report

    if args.k < 1 or args.neighbours < 1:
        print("catalog-embed: -k and --neighbours must be at least 1", file=sys.stderr)
        return 2
    table = _open_at(args)
    report = outliers_report(table, args.between, args.k, args.isolated, args.column, args.neighbours)
    return _print_report(args, table, report)


def _drift(args: argparse.Namespace, _extra: list[str]) -> int:
    from pipelines.health.drift import previous_run_version
    from pipelines.health.reports import drift_report
    from pipelines.search.query import open_table
    from transforms.lance_sink import dataset_uri

    at = int(args.version_to) if args.version_to and args.version_to.isdigit() else args.version_to
    table = open_table(args.uri, args.table, at)
    to = args.version_to or str(table.handle.version)
    before = args.version_from or str(previous_run_version(args.uri, args.table, table.handle.version))
    return _print_report(args, table, drift_report(table, dataset_uri(args.uri, args.table), before, to))


def _open_at(args: argparse.Namespace):
    """The table of --uri/--table, at --version or --tag when given."""
    from pipelines.search.query import open_table

    return open_table(args.uri, args.table, args.version if args.version is not None else args.tag)


def _print_report(args: argparse.Namespace, table, report) -> int:
    from pipelines.report import print_results
    from pipelines.search import contact_sheet

    if args.json:
        print(json.dumps(report.data))
        return 0
    print(report.title)
    print_results(report.rows)
    if args.html:
        contact_sheet.write(args.html, report.html_sections(table), f"{args.table}: {args.command}", report.title,
                            report.numbers)
        print(f"contact sheet: {args.html}")
    return 0


def _versions(args: argparse.Namespace, _extra: list[str]) -> int:
    from pipelines.report import print_history
    from pipelines.versions import history

    found = history(args.uri, args.table)
    if args.json:
        print(json.dumps(found, default=str))
    else:
        print_history(found)
    return 0


def _serve(args: argparse.Namespace, _extra: list[str]) -> int:
    from pipelines.serve import serve
    from pipelines.serve.access import LOOPBACK, access_for

    try:
        access = access_for(args.host, args.allowed_host, args.token_file, args.no_auth)
    except (OSError, ValueError) as err:
        print(f"catalog-embed: {err}", file=sys.stderr)
        return 2
    if args.no_auth and args.host.strip("[]") not in LOOPBACK:
        print(f"catalog-embed: serving on {args.host} without a token (--no-auth): anyone who can reach the port "
              "can read the table", file=sys.stderr)
    if "*" in args.allowed_host and access.token is None:
        print("catalog-embed: --allowed-host '*' without a token: a web page can read the table through a visitor's "
              "browser (DNS rebinding)", file=sys.stderr)
    serve(args.uri, args.table, args.host, args.port, args.allow_sql_filter, access)
    return 0


def _rollback(args: argparse.Namespace, _extra: list[str]) -> int:
    from pipelines.versions import rollback

    version = rollback(args.uri, args.table, args.to)
    print(f"restored {args.table} to {args.to}: now version {version}")
    return 0


if __name__ == "__main__":
    entry_point()
