"""The lower floor: what the job's graph is made of, and what both floors share.

- `config`: the typed, validated configuration. It sits below everything and imports no other module here.
- The stages, one module each, in the order data flows: `readers` (and `csv_records`, `http_fetch`,
  `storage`, `images`), `items`, `fingerprint` and `compare`, `budget`, `inference` with `encoders/`,
  `reuse`, `behaviour`, `combine`, `staging` and `lance_sink`, `commit`, `maintain`.
- Shared by both floors: `combine` (the weighting math), `lance_sink` (the table's schema and reads),
  `vector_columns` and `column_drift` (vector columns read in bounded pieces), `run_log`, `derived` (the cache).

May import this package and libraries; never `pipelines` (tests/test_layers.py).
"""

import os

# torch's OpenMP threads spin 300,000 times after each parallel region before they sleep. Beside the decode
# threads on a worker's cores they spun away a quarter of a photo's core time (docs/encoders.md, "Decoding,
# batching and keeping the network busy"). Set here, before any module loads torch (Beam's inference base
# does); the user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
