"""The demo catalog from photos that ship in packages (`build_catalog`, `photos`, `reuploads`), ConSE's
development set, a tiny random CLIP for the open-clip path (`tiny_clip`), and a local stand-in for an image CDN
(`image_server`). Used by `make demo`, the tests and the benchmarks.

May import `transforms` and libraries; never `pipelines`.
"""
