"""Catalog health over a table the job wrote: near-duplicate groups (`duplicates`), captions that do not
match their picture and isolated items (`outliers`), how a version moved from another (`drift`), and
`reports`, which shapes each as the command line and the service give it.

May import `transforms`, `pipelines.errors`, `pipelines.search` and this package; never the job
(`pipelines.nightly`, its runners, the command line or the service).
"""
