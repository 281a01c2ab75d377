"""Does `query --text ... --hybrid` help where shoppers need an exact term, and does it hurt paraphrases?

Two labelled query sets, each query with the one item it asks for:
- exact terms: a catalog in Kaggle's fashion layout (styles.csv, its productDisplayName titles: brand,
  gender, colour, article type) run through the job, text encoder only, with three kinds of need planted:
  a SKU (QX-48213) among lookalikes whose codes differ in one digit, a brand the model never saw
  (Vaerdal) among items of the same colour and type, and a rare material word (Merino, Cordura) on one
  item of its type. The query is the SKU, "<brand> <colour> <type>" or "<word> <type>".
- paraphrases: the demo's `demo/queries.csv` on the demo table (every encoder, the table's weights).
Each query is answered by the vector search, by our hybrid (reciprocal rank fusion, pipelines.search.query), and by
LanceDB's own hybrid query with its RRFReranker over the same query vector; scored as hit@1 and hit@5.
"""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import yaml

BRANDS = ("Roadster", "Puma", "Nike", "Peter England", "Titan", "Fabindia", "Wrangler", "Lotto", "Fastrack",
          "Spykar", "Turtle", "Jealous 21")
GENDERS = ("Men", "Women", "Boys", "Girls", "Unisex")
COLOURS = ("Navy Blue", "Black", "White", "Grey", "Red", "Green", "Brown", "Beige", "Olive", "Maroon")
STYLES = ("Slim Fit", "Casual", "Printed", "Solid", "Striped", "Sports", "Classic", "Washed")
ARTICLES = {   # articleType -> (masterCategory, subCategory, the word titles use)
    "Shirts": ("Apparel", "Topwear", "Shirt"), "Tshirts": ("Apparel", "Topwear", "T-shirt"),
    "Jackets": ("Apparel", "Topwear", "Jacket"), "Jeans": ("Apparel", "Bottomwear", "Jeans"),
    "Casual Shoes": ("Footwear", "Shoes", "Casual Shoes"), "Sports Shoes": ("Footwear", "Shoes", "Sports Shoes"),
    "Watches": ("Accessories", "Watches", "Watch"), "Backpacks": ("Accessories", "Bags", "Backpack"),
}
NEW_BRANDS = ("Vaerdal", "Kjelsaa", "Myrkdal", "Brennholt", "Tindra", "Solvik", "Hallgrim", "Fjellnes", "Aurlund",
              "Strandby", "Norheim", "Eikeli", "Vangsnes", "Rjukan", "Skaret", "Haugom", "Tysnes", "Orkdal",
              "Sandvar", "Lyngmo")
RARE_WORDS = ("GORE-TEX", "Merino", "Selvedge", "Cordura", "Chambray", "Seersucker", "Jacquard", "Corduroy",
              "Ripstop", "Shearling", "Tweed", "Madras", "Pique", "Herringbone", "Houndstooth", "Poplin", "Oxford",
              "Flannel", "Velvet", "Suede")
ITEMS, LOOKALIKES, KS = 3000, 4, (1, 5)
HEADER = ("id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year", "usage",
          "productDisplayName")


def fashion_catalog(root: Path, seed: int = 0) -> list[tuple[str, str, str]]:
    """Writes `root/styles.csv`; returns the labelled queries as (need, query, id)."""
    rng = random.Random(seed)
    rows, queries = [], []

    def add(title_parts: dict, extra: str = "", brand: str | None = None) -> str:
        item = str(10_000 + len(rows))
        article = title_parts["article"]
        name = " ".join(part for part in (brand or title_parts["brand"], title_parts["gender"], title_parts["style"],
                                          extra, title_parts["colour"], ARTICLES[article][2]) if part)
        rows.append((item, title_parts["gender"], *ARTICLES[article][:2], article, title_parts["colour"],
                     rng.choice(("Summer", "Fall", "Winter")), str(rng.randrange(2010, 2018)), "Casual", name))
        return item

    def parts() -> dict:
        return {"brand": rng.choice(BRANDS), "gender": rng.choice(GENDERS), "style": rng.choice(STYLES),
                "colour": rng.choice(COLOURS), "article": rng.choice(list(ARTICLES))}

    for _ in range(ITEMS):
        add(parts())
    for brand, word in zip(NEW_BRANDS, RARE_WORDS, strict=True):
        sku = rng.randrange(10_000, 100_000)
        title = parts()
        queries.append(("sku", f"QX-{sku}", add(title, f"QX-{sku}")))
        for digit in rng.sample(range(5), LOOKALIKES):
            code = str(sku)
            add(title, f"QX-{code[:digit]}{(int(code[digit]) + rng.randrange(1, 10)) % 10}{code[digit + 1:]}")
        title = parts()
        queries.append(("brand", f"{brand} {title['colour']} {ARTICLES[title['article']][2]}".lower(),
                        add(title, brand=brand)))
        title = parts()
        queries.append(("rare word", f"{word} {ARTICLES[title['article']][2]}".lower(), add(title, word)))
    root.mkdir(parents=True, exist_ok=True)
    with (root / "styles.csv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([HEADER, *rows])
    return queries


def fashion_table(root: Path) -> tuple[Path, list[tuple[str, str, str]]]:
    """The planted catalog embedded by the job, as a user runs it."""
    queries = fashion_catalog(root / "fashion")
    config = {"catalog": {"format": "fashion", "path": str(root / "fashion")},
              "encoders": {"text": {"kind": "sentence-transformers", "model": "all-MiniLM-L6-v2"}},
              "output": {"uri": str(root / "db"), "table": "fashion"}}
    (root / "fashion.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([str(Path(sys.executable).with_name("catalog-embed")), "run", "--config",
                    str(root / "fashion.yaml")], check=True, capture_output=True)
    return root / "db", queries


def demo_queries() -> list[tuple[str, str, str]]:
    with (Path(__file__).resolve().parent.parent / "demo" / "queries.csv").open(newline="") as handle:
        return [("paraphrase", row["query"], row["id"]) for row in csv.DictReader(handle)]


def answers(db: Path, table_name: str, text: str, k: int) -> dict[str, list[str]]:
    from lancedb.rerankers import RRFReranker

    from pipelines.search.query import hybrid_search, open_table, search, text_queries
    from transforms.combine import reweighted_query
    from transforms.lance_sink import TEXT_COLUMN

    table = open_table(str(db), table_name)
    queries = text_queries(table, text)
    weights = {name: w for name, w in table.stored_weights.items() if name in queries}
    vector = reweighted_query(queries, table.stored_weights, weights, list(table.stored_weights), table.dims)
    native = (table.handle.search(query_type="hybrid", vector_column_name="vector", fts_columns=TEXT_COLUMN)
              .vector(vector).text(text).rerank(RRFReranker()).limit(k).to_arrow())
    return {"vector": [r["id"] for r in search(table, queries, k)],
            "hybrid (ours)": [r["id"] for r in hybrid_search(table, text, queries, k)],
            "hybrid (LanceDB, RRFReranker)": native["id"].to_pylist()}


def hit_rates(db: Path, table_name: str, labelled: list[tuple[str, str, str]]) -> dict:
    """hit@k of each side, per need and over all of them."""
    hits: dict[str, dict[str, list[int]]] = {}
    for need, text, wanted in labelled:
        for side, found in answers(db, table_name, text, max(KS)).items():
            for group in (need, "all"):
                hits.setdefault(group, {}).setdefault(side, []).append(found.index(wanted) if wanted in found
                                                                        else max(KS))
    return {group: {side: {f"hit@{k}": round(sum(rank < k for rank in ranks) / len(ranks), 3) for k in KS}
                    for side, ranks in sides.items()} | {"queries": len(next(iter(sides.values())))}
            for group, sides in hits.items()}


def measure(root: Path, demo_db: Path) -> dict:
    db, labelled = fashion_table(root)
    return {"exact terms (Kaggle fashion layout)": hit_rates(db, "fashion", labelled),
            "paraphrases (demo/queries.csv, demo table)": hit_rates(demo_db, "demo", demo_queries())}
