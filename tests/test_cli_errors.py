"""Bad input to any command is one line on stderr and exit 2, never a traceback, and nothing is done."""

from __future__ import annotations

import pytest

from pipelines.cli import main
from tests.conftest import photo

TABLE = ["--uri", "{uri}", "--table", "demo"]
LIKE = ["query", *TABLE, "--like", "chelsea"]
CASES = {
    "unknown command": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "run without a config": (["run"], "the following arguments are required: --config"),
    "run with a config that is not there": (["run", "--config", "/nowhere/job.yaml"], "config file not found"),
    "run with a mistyped Beam option": (["run", "--config", "{config}", "--direct_num_worker=2"],
                                        "unrecognized arguments: --direct_num_worker=2"),
    "run with an option nobody knows": (["run", "--config", "{config}", "--frobnicate"],
                                        "unrecognized arguments: --frobnicate"),
    "query with an unknown option": ([*LIKE, "--bogus"], "unrecognized arguments: --bogus"),
    "query with nothing to look for": (["query", *TABLE],
                                       "one of the arguments --like --text --image --user is required"),
    "query of a table that is not there": (["query", "--uri", "{uri}", "--table", "nosuch", "--like", "x"],
                                           "no table 'nosuch'"),
    "query like an unknown item": (["query", *TABLE, "--like", "nosuch"], "no item with id 'nosuch'"),
    "query with a filter on an unknown column": ([*LIKE, "--where", "nosuchcol = 'x'"],
                                                 "No field named nosuchcol"),
    "query with a filter that does not parse": ([*LIKE, "--where", "category ="], "is not a valid filter"),
    "query with k of 0": ([*LIKE, "-k", "0"], "-k must be at least 1"),
    "query with k that is not a number": ([*LIKE, "-k", "many"], "invalid int value: 'many'"),
    "query weighing an unknown encoder": ([*LIKE, "--weights", "nosuch=1"], "--weights names 'nosuch'"),
    "query at a version that is not there": ([*LIKE, "--version", "999"], "has no version or tag 999"),
    "query with a picture that is not there": (["query", *TABLE, "--image", "/nowhere.jpg"], "cannot use image"),
    "versions of a table that is not there": (["versions", "--uri", "{uri}", "--table", "nosuch"], "no table"),
    "rollback to a tag that is not there": (["rollback", *TABLE, "--to", "run-nosuch"], "has no version or tag"),
    "classify with one label": (["classify", *TABLE, "--labels", "cat", "{photo}"], "at least two different labels"),
    "classify a picture that is not there": (["classify", *TABLE, "--labels", "cat,dog", "/nowhere.jpg"],
                                             "cannot use image"),
    "duplicates by an unknown column": (["duplicates", *TABLE, "--column", "nosuch"], "has no encoder 'nosuch'"),
    "duplicates with a threshold that is no cosine": (["duplicates", *TABLE, "--threshold", "3"],
                                                      "--threshold is a cosine"),
    "outliers between encoders of two spaces": (["outliers", *TABLE, "--between", "text,image"],
                                                "do not embed into one space"),
    "outliers between one encoder": (["outliers", *TABLE, "--between", "text"], "--between takes two"),
    "outliers with k of 0": (["outliers", *TABLE, "-k", "0"], "must be at least 1"),
    "drift from a version that is not there": (["drift", *TABLE, "--from", "999"], "has no version or tag '999'"),
    "drift with no run before": (["drift", *TABLE], "give --from"),
    "evaluate without its config": (["evaluate", "--config", "/nowhere/job.yaml"], "config file not found"),
}


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as done:               # argparse's usage errors
        return done.code


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, multimodal_demo, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(f"catalog: {{format: manifest, path: {tmp_path}}}\nencoders: {{color: {{kind: color}}}}\n"
                      f"output: {{uri: {tmp_path / 'db'}, table: t}}\n")
    argv, message = CASES[case]
    values = {"uri": multimodal_demo.output.uri, "config": str(config), "photo": str(photo("chelsea.png"))}
    assert exit_code([part.format(**values) for part in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "db").exists()                                # nothing was done
