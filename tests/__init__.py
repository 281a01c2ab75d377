"""The test suite (`make test`): small catalogs built by the tests in their real layouts, with the local S3 and
GCS servers of `servers` and a worker started as a container starts one (`isolated_worker`).

May import anything of ours; nothing imports it.
"""
