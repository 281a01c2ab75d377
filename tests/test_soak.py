"""A short soak (tests/soak.py) on a local disk and on moto's S3 behind a fault-injecting proxy: a few nights of
random changes, one killed and one raced, checked after each; `make soak` runs 30 nights per store."""

from __future__ import annotations

import pytest

from tests.soak import soak


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_few_nights_of_kills_races_and_faults_lose_nothing(tmp_path, store):
    report = soak(store, nights=4, seed=3, folder=tmp_path, fault_rate=0.05, events=("kill", "race", "plain"))
    assert report.problems == [] and report.rows_lost == 0, report.line()
    assert sum(report.kills.values()) == 1 and report.races == 1
    if store == "s3":
        assert sum(report.faults.values()) > 0, report.line()
