"""The lower floor: what the job's graph is made of, and what both floors share.

- `config`: the typed, validated configuration. It sits below everything and imports no other module here.
- The stages, one module each, in the order data flows: `readers` (and `csv_records`, `http_fetch`,
  `storage`, `images`), `items`, `fingerprint` and `compare`, `budget`, `inference` with `encoders/`,
  `reuse`, `behaviour`, `combine`, `staging` and `lance_sink`, `commit`, `maintain`.
- Shared by both floors: `combine` (the weighting math), `lance_sink` (the table's schema and reads),
  `vector_columns` and `column_drift` (vector columns read in bounded pieces), `run_log`, `derived` (the cache).

May import this package and libraries; never `pipelines` (tests/test_layers.py).
"""
