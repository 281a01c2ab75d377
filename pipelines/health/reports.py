"""The catalog health reports as the command line gives them: what `--json` prints, the terminal
table, and the sections of the `--html` contact sheet (items by id, with a score where one applies)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.health import drift, duplicates, outliers
from pipelines.search.query import Table, items_by_id
from transforms.vector_columns import COMBINED, ids_at


@dataclass
class Report:
    title: str
    data: Any                                            # the --json output
    rows: list[dict]                                     # the terminal table
    sections: list[tuple[str, list[tuple[str, float | None]]]] = field(default_factory=list)  # (heading, (id, score))
    numbers: list[dict] = field(default_factory=list)    # a table of numbers above the sections

    def html_sections(self, table: Table) -> list[tuple[str, list[dict]]]:
        found = items_by_id(table, [item for _, items in self.sections for item, _ in items])
        return [(heading, [_card(found.get(item, {"id": item}), score) for item, score in items])
                for heading, items in self.sections]


def duplicates_report(table: Table, column: str | None, threshold: float | None) -> Report:
    found = duplicates.find_duplicates(table, column, threshold)
    groups = found["groups"]
    return Report(
        title=f"{len(groups)} groups of near-duplicates among {found['rows']} items, by {found['column']} "
              f"(cosine >= {found['threshold']})",
        data=[{"ids": g["ids"], "score": g["score"]} for g in groups],
        rows=[{"group": n, "score": g["score"], "items": len(g["ids"]), "ids": ", ".join(g["ids"])}
              for n, g in enumerate(groups, start=1)],
        sections=[(f"group {n}: {len(g['ids'])} items, lowest cosine {g['score']:.4f}", [(i, None) for i in g["ids"]])
                  for n, g in enumerate(groups, start=1)])


def outliers_report(table: Table, between: str | None, k: int, isolated: bool, column: str,
                    neighbours: int) -> Report:
    if isolated:
        found = outliers.isolated_items(table, column, neighbours)
        what = f"farthest from their {neighbours} nearest neighbours by {found['column']} (score 1 - mean cosine)"
    else:
        found = outliers.caption_outliers(table, between)
        what = (f"whose {found['between'][0]} and {found['between'][1]} vectors disagree most "
                "(score: their best matches among other items' cosine - their own cosine)")
    top = found["positions"][:k]
    ids = ids_at(table.handle.to_lance(), top)
    scored: list[tuple[str, float | None]] = [(item, round(float(found["scores"][p]), 6))
                                              for item, p in zip(ids, top, strict=True)]
    fields = items_by_id(table, ids)
    return Report(
        title=f"the {len(scored)} items {what}",
        data=[{"id": item, "score": score} for item, score in scored],
        rows=[_card(fields.get(item, {"id": item}), score) for item, score in scored],
        sections=[("", scored)])


def drift_report(table: Table, uri: str, version_from: str, version_to: str) -> Report:
    before, after = drift.open_version(uri, version_from), drift.open_version(uri, version_to)
    found = drift.drift(before, after)
    numbers = [{"column": name, "score": c["score"], "centroid_shift": c["centroid_shift"], "moved": c["moved"]}
               for name, c in found["columns"].items()]
    most = found["columns"].get(COMBINED, {}).get("most_moved", [])
    sections = [("items that moved most (combined vector; score = 1 - cosine to their old vector)",
                 [(m["id"], m["distance"]) for m in most]),
                (f"added ({len(found['added_examples'])} of {found['added']})",
                 [(item, None) for item in found["added_examples"]])]
    return Report(
        title=f"drift from version {found['from']} ({found['rows_from']} items) to {found['to']} "
              f"({found['rows_to']} items): {found['added']} added, {found['removed']} removed",
        data=found, rows=numbers, numbers=numbers, sections=[s for s in sections if s[1]])


def _card(row: dict, score: float | None) -> dict:
    return {"id": row["id"], **({"score": score} if score is not None else {}),
            **{k: v for k, v in row.items() if k != "id"}}
