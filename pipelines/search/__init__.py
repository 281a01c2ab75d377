"""Reading a table the job wrote: similarity search (`query`), every item's nearest neighbours
(`neighbours`), zero-shot labels (`zero_shot`), retrieval and zero-shot quality (`evaluate`), and HTML
contact sheets of results (`contact_sheet`).

May import `transforms`, `pipelines.errors` and this package; never the job (`pipelines.nightly`, its
runners, the command line or the service) nor `pipelines.health`.
"""
