"""What a command prints on stderr: our own progress and decisions, and the libraries' only when asked.

Quiet by default: Beam, transformers, Lance and Python's warnings say nothing below ERROR, and no
library draws progress bars (a scheduler's log is not a terminal). `-v` lets everything through.
`--log-format json` writes one JSON object per line, for log collectors. This runs before the
libraries are imported: some log at import, and Lance's Rust side and Hugging Face read their
settings from the environment once.
"""

from __future__ import annotations

import json
import logging
import os
import sys

OUR_LOGGERS = ("pipelines", "transforms", "catalog_embed")
QUIET_ENVIRONMENT = {
    "LANCE_LOG": "error",                     # Lance's Rust logger ("No existing dataset ... will be created")
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",      # transformers' "Loading weights" bar goes through the Hub's switch
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",        # its fork warning, once Beam starts worker processes
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(verbose: bool = False, log_format: str = "text") -> None:
    """Our loggers at INFO; the root logger, which the libraries use, at ERROR unless `verbose`."""
    if not verbose:
        for name, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO if verbose else logging.ERROR)
    logging.captureWarnings(True)             # warnings.warn from libraries: logged, hence quiet by default
    for name in OUR_LOGGERS:
        ours = logging.getLogger(name)
        ours.setLevel(logging.INFO)
        ours.handlers = [handler]
        ours.propagate = False
