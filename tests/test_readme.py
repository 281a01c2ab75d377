"""The README's tour runs as written, and every catalog-embed command the README and docs/ show is one the CLI
takes: the docs and `--help` cannot drift apart."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from pipelines.cli import EXAMPLES, build_parser, unknown_beam_options
from tests.servers import free_port, local_server

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}
TOUR = "## A tour of the commands"


def sh_commands(markdown: str) -> list[list[str]]:
    """Each command line of the ```sh blocks, continuation lines joined, as words (comments dropped)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)
            if words:
                commands.append(words)
    return commands


def catalog_embed_args(words: list[str]) -> list[str] | None:
    """The arguments of the catalog-embed command in a shell line (after a cron schedule or a `cd ... &&`), up to
    the first redirection or pipe; None when the line runs another program."""
    start = next((i for i, word in enumerate(words) if Path(word).name == "catalog-embed"
                  and (i == 0 or words[i - 1] in SHELL_OPERATORS)), None)
    if start is None:
        return None
    rest = words[start + 1:]
    end = next((i for i, word in enumerate(rest) if word in SHELL_OPERATORS), len(rest))
    return rest[:end]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every catalog-embed command in the pages and in `catalog-embed --help`'s examples."""
    sources = {page.name: page.read_text(encoding="utf-8") for page in PAGES}
    sources["--help"] = f"```sh\n{EXAMPLES.split('exit codes:')[0]}```"
    return [(name, args) for name, text in sources.items() for words in sh_commands(text)
            if (args := catalog_embed_args(words)) is not None]


def test_every_documented_command_is_one_the_cli_takes():
    parser, commands = build_parser(), documented_commands()
    assert len(commands) >= 30
    for page, args in commands:
        parsed, extra = parser.parse_known_args(args)
        unknown = unknown_beam_options(extra) if parsed.command == "run" else extra
        assert not unknown, f"{page}: catalog-embed {shlex.join(args)}: unknown {unknown}"


def test_the_readme_shows_every_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = {args[0] for words in sh_commands(readme) if (args := catalog_embed_args(words))}
    choices = next(a for a in build_parser()._subparsers._group_actions).choices     # the subcommands
    assert shown == set(choices)


def tour() -> list[tuple[list[list[str]], list[str]]]:
    """The tour's blocks in order: each block's commands, and the outputs the README shows after it (one per
    command, a blank line apart, where the block shows as many)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(TOUR)
    section = readme[start:readme.index("\n## ", start + len(TOUR))]
    blocks = []
    for block, shown in re.findall(r"```sh\n(.*?)```\n(?:```text\n(.*?)```)?", section, flags=re.S):
        commands = sh_commands(f"```sh\n{block}```")
        outputs = shown.strip("\n").split("\n\n") if shown else []
        blocks.append((commands, outputs if len(outputs) == len(commands) else []))
    return blocks


def result_ids(output: str) -> list[str]:
    """The ids of a result table (under a header line that starts with `id`), in order."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("id ")), None)
    return [] if start is None else [line.split()[0] for line in lines[start + 1:] if line.strip()]


def test_the_readme_tour_runs_as_written(tmp_path):
    for folder in ("configs", "demo"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    blocks = tour()
    assert sum(len(commands) for commands, _ in blocks) >= 15
    for commands, outputs in blocks:
        for index, words in enumerate(commands):
            argv = [str(Path(sys.executable).parent / Path(words[0]).name), *words[1:]]
            if words[1] == "serve":
                _serve_answers(argv, tmp_path)
                continue
            done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{shlex.join(words)}\n{done.stderr[-3000:]}"
            if outputs and words[1] == "query" and "--json" not in words:
                assert result_ids(done.stdout) == result_ids(outputs[index]) != [], shlex.join(words)


def _serve_answers(argv: list[str], cwd: Path) -> None:
    port = free_port()
    with local_server([*argv, "--port", str(port)], port, cwd / "serve.log", seconds=120, cwd=cwd) as url, \
            urllib.request.urlopen(f"{url}/healthz", timeout=30) as answer:
        assert json.load(answer)["status"] == "ok"
