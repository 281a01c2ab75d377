"""The upper floor: the nightly job's Beam graph and what runs it, the command line, and the service.

- `nightly` builds the job's graph top to bottom; `runners` and `scratch` are where it runs and what it
  leaves on the way; `versions` lists and restores table versions.
- `cli` is `catalog-embed`; `serve` is `catalog-embed serve` and its page (`page/`); `report` prints.
- `search/` and `health/` read the tables the job wrote: queries, labels and evaluation; duplicates,
  outliers and drift. They never import the job.

May import `transforms` and libraries. Nothing in `transforms` imports this package (tests/test_layers.py).
"""
