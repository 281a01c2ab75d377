"""`make bench`: each module is one part, run as `python -m benchmarks.<part> --out out/bench.json`, and compares
the job with what a user would write or pick instead, side by side in one run (docs/benchmarks.md).

May import anything of ours; nothing imports it.
"""
