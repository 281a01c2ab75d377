"""What the command line prints: run summaries and result tables for a terminal."""

from __future__ import annotations

import json
from collections.abc import Sequence

REWROTE = {"vector": "new weights: the `vector` column of every row written again (one column, from stored vectors)",
           "table": "a new schema: every row written into a new table (from the stored vectors of unchanged encoders)"}


def print_run_summary(run: dict) -> None:
    seconds = (run["ended_at"] - run["started_at"]).total_seconds()
    rate = (run.get("read") or 0) / seconds if seconds > 0 else 0.0
    print(f"run {run['run_id']}: {run['status']}, table version {run['table_version']}, "
          f"{seconds:.1f}s ({rate:.1f} items/s)")
    if run.get("read") is None:           # settled from the table after a failure: its counts were lost
        print(f"  {run['message']}")
        return
    kept = f" + kept {run['kept']}" if run.get("kept") else ""
    deferred = f" + deferred {run['deferred']}" if run.get("deferred") else ""
    print(f"  read {run['read']} = written {run['written']} + unchanged {run['unchanged']}{kept} "
          f"+ rejected {run['rejected']}{deferred};  deleted {run['deleted']}")
    if run.get("rows_after") is not None and run.get("status") != "failed":
        absent = f" ({run['absent']} ids the catalog no longer lists are kept)" if run.get("absent") else ""
        print(f"  table rows: {run['rows_before']} - deleted {run['deleted']} + added {run.get('added') or 0} "
              f"= {run['rows_after']}{absent}")
    if run.get("rewrote") in REWROTE:
        print(f"  {REWROTE[run['rewrote']]}")
    if run["encoded"]:
        rates = run.get("encode_rate") or {}
        print("  encoded (forward passes): " + ", ".join(
            f"{k} {v}" + (f" ({rates[k]:,.0f}/s)" if k in rates else "") for k, v in sorted(run["encoded"].items())))
    if run.get("backfill"):
        print(f"  backfill: {describe_backfill(run['backfill'])}")
    if run.get("interactions"):
        log = run["interactions"]
        trained = ", ".join(f"{name} {items} items" for name, items in log["trained"].items())
        if not log.get("needed"):
            print("  interactions: not read, as no item needs a behaviour vector")
        else:
            print(f"  interactions: read {log['read']}, rejected {log['rejected']}; "
                  + (f"trained on {log['sessions']} sessions: {trained}" if log["sessions"] else "nothing to train"))
    if run.get("drift"):
        print("  drift from the previous version: " + ", ".join(f"{k} {v:.4f}" for k, v in run["drift"].items()))
    for key, count in run["rejects_by"].items():
        print(f"  rejected at {key}: {count}")
    if run["message"]:
        print(f"  {run['message']}")


def print_plan(plan: dict) -> None:
    print(f"dry run {plan['run_id']}: against table version {plan['table_version']}, nothing written")
    print(f"  read {plan['read']}: new {plan['new']}, changed {plan['changed']}, unchanged {plan['unchanged']}, "
          f"rejected so far {plan['rejected']}, deferred {plan['deferred']};  deleted {plan['deleted']}")
    if plan["changed_by_encoder"]:
        print("  changed, by encoder: " + ", ".join(f"{k} {v}" for k, v in sorted(plan["changed_by_encoder"].items())))
    if plan["encode"]:
        print("  would encode (distinct inputs): " + ", ".join(f"{k} {v}" for k, v in sorted(plan["encode"].items())))
    if plan["backfill"]:
        print(f"  backfill after it: {describe_backfill(plan['backfill'])}")


def run_json(run: dict) -> str:
    """The run's record as in `<table>_runs`, with its seconds, as one JSON line for schedulers."""
    record = dict(run)
    if record.get("started_at") and record.get("ended_at"):
        record["seconds"] = round((record["ended_at"] - record["started_at"]).total_seconds(), 3)
    return json.dumps(record, default=lambda value: value.isoformat(), sort_keys=True)


def print_results(results: Sequence[dict], truncate: bool = True) -> None:
    """A table for a terminal; with `truncate`, long cells are cut to 48 characters."""
    if not results:
        print("no results")
        return
    columns = [c for c in results[0] if c != "image_uri"] + (["image_uri"] if "image_uri" in results[0] else [])
    cells = [[_cell(row.get(c), truncate) for c in columns] for row in results]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _cell(value, truncate: bool = True) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return text if len(text) <= 48 or not truncate else text[:45] + "..."


def print_history(found: dict) -> None:
    print(f"latest version: {found['latest']}")
    print_results([{"version": v["version"], "timestamp": str(v["timestamp"])[:19], "rows": v["rows"],
                    "tags": ", ".join(v["tags"]), "kept": v["kept"]} for v in found["versions"]], truncate=False)
    if found["runs"]:
        print()
        print_results([{"run_id": r["run_id"], "status": r["status"], "version": r["table_version"],
                        "read": r["read"], "written": r["written"], "unchanged": r["unchanged"],
                        "deleted": r["deleted"], "rejected": r["rejected"], "kept": r.get("kept") or 0,
                        "backfill": _backfill_cell(r.get("backfill")),
                        "started": str(r["started_at"])[:19]} for r in found["runs"]])


def _backfill_cell(backfill: dict | None) -> str:
    """"clip 75%": per budgeted encoder, the share of the items with its input that hold its vector."""
    if not backfill:
        return ""
    return ", ".join(f"{name} {n['done'] / n['of']:.0%}" for name, n in backfill["encoders"].items() if n["of"])


def print_evaluation(report: dict) -> None:
    print(f"{report['table']} version {report['version']}: {report['items']} labelled items, "
          f"{report['labels']} labels, {report['queries']} retrieval queries (items whose label another has)")
    if report["retrieval"]:
        print_results([{"vectors": name, **quality} for name, quality in report["retrieval"].items()])
    if report["zero_shot"]:
        print()
        print_results([{"zero-shot": name, "labels": report["labels"], **quality}
                       for name, quality in report["zero_shot"].items()])
    if report.get("text_to_image"):
        print()
        print_results([{"text-to-image": name, **quality} for name, quality in report["text_to_image"].items()])


def print_labels(results: Sequence[dict], top: int = 5) -> None:
    """Zero-shot results: each image's label and its `top` most likely labels with their probabilities."""
    print_results([{"image": r["image"], "label": r["label"], "probabilities": "  ".join(
        f"{label} {p:.3f}" for label, p in list(r["probabilities"].items())[:top])} for r in results], truncate=False)


def describe_backfill(backfill: dict) -> str:
    """"image 40,000 of 100,000 done, about 3 more runs at this budget"."""
    done = ", ".join(f"{name} {n['done']:,} of {n['of']:,} done" for name, n in backfill["encoders"].items())
    runs = backfill["runs_left"]
    if runs == 0:
        return f"{done}, complete"
    if runs is None:
        return f"{done}; a budget of 0 encodes nothing"
    return f"{done}, about {runs} more run{'s' if runs != 1 else ''} at this budget"
