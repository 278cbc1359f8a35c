"""The documentation: the README stays a landing page, and the MkDocs site builds strictly and says what the code says.

The site (``mkdocs.yml``, ``docs/``) is built once per run with ``mkdocs build --strict`` into a temporary
folder: a broken link or anchor in the README or a page fails the build. The CLI reference page is generated
at build time from :func:`cxr.cli.build_parser` (``docs/hooks/cli_reference.py``); the checks below read the
built page against the real parser, and the architecture page's layer table against ``tests/test_layers.py``.
"""

from __future__ import annotations

import argparse
import ast
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cxr.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 200


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built site. Not ``--quiet``: MkDocs 1.6 drops warnings below ERROR then, and ``--strict`` with them."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", "mkdocs.yml", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_the_site_builds_strictly(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "cli" / "index.html").is_file()


def test_the_readme_is_a_landing_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move detail into docs/"


def _link_targets(markdown: str) -> list[str]:
    """Targets of inline links and images, ``<...>`` autolinks and reference definitions, code left out."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    inline = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    auto = re.findall(r"<([a-z][a-z0-9+.-]*:[^>\s]+)>", text)
    reference = re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, flags=re.M)
    return inline + auto + reference


def test_every_relative_link_of_the_readme_points_at_a_file() -> None:
    targets = _link_targets(README.read_text(encoding="utf-8"))
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert relative, "the README links into docs/"
    missing = [t for t in relative if not (ROOT / t.split("#")[0]).exists()]
    assert missing == []


def test_the_link_finder_sees_every_kind_of_link() -> None:
    found = _link_targets('[a](docs/x.md) ![i](img.png "t") <https://e.org> `[n](no.md)`\n[r]: docs/y.md\n')
    assert found == ["docs/x.md", "img.png", "https://e.org", "docs/y.md"]


def test_the_quick_start_is_two_commands_and_ci_runs_the_second_verbatim() -> None:
    readme = README.read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick_start, flags=re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    run, test = commands
    assert run.endswith("dvc repro") and re.search(r"&& pytest( |$)", test), test
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test in ci, ".ci/run must run the README's test command verbatim"


def _sections(page: str) -> dict[str, str]:
    """The page's ``<h2>`` sections by id: each one's HTML up to the next ``<h2``."""
    parts = re.split(r'(?=<h2 id=")', page)
    return {re.match(r'<h2 id="([^"]+)"', p).group(1): p for p in parts if p.startswith("<h2 id=")}


def _text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {
        name: sub
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
    }


def _documented(section: str, action: argparse.Action) -> list[str]:
    """What of ``action`` is missing from ``section``: an option string, or its help text."""
    missing = [opt for opt in action.option_strings if not re.search(f"<code>{re.escape(opt)}[ <]", section)]
    if action.help and action.help != argparse.SUPPRESS:
        words = " ".join(action.help.split("%(")[0].replace("%%", "%").split())
        if words and words not in _text(section):
            missing.append(f"help of {action.option_strings or action.dest}: {words!r}")
    return missing


def test_the_cli_reference_names_every_subcommand_and_option(site: Path) -> None:
    parser = build_parser()
    sections = _sections((site / "cli" / "index.html").read_text(encoding="utf-8"))
    commands = _commands(parser)
    assert commands, "the parser has subcommands"
    missing = [f"cxr: {m}" for a in parser._actions for m in _documented(sections.get("cxr", ""), a)]
    for name, sub in commands.items():
        section = sections.get(f"cxr-{name}")
        if section is None:
            missing.append(f"cxr {name}: no section")
            continue
        missing += [f"cxr {name}: {m}" for a in sub._actions for m in _documented(section, a)]
        if sub.description and _text(sub.description) not in _text(section):
            missing.append(f"cxr {name}: its description")
    assert missing == []


def _ranks() -> list[tuple[str, ...]]:
    """``RANKS`` of ``tests/test_layers.py``, read with ``ast`` (test modules never import each other)."""
    tree = ast.parse((ROOT / "tests" / "test_layers.py").read_text(encoding="utf-8"))
    values: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            values.update({t.id: node.value for t in targets if isinstance(t, ast.Name)})

    def literal(node: ast.expr) -> tuple[str, ...]:
        return ast.literal_eval(values[node.id]) if isinstance(node, ast.Name) else ast.literal_eval(node)

    return [literal(element) for element in values["RANKS"].elts]


def test_the_architecture_page_shows_the_layers_the_guard_test_enforces() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = {int(m.group(1)): m.group(0) for m in re.finditer(r"^\| (\d+) \|.*$", page, flags=re.M)}
    ranks = _ranks()
    assert sorted(rows) == list(range(len(ranks))), "one table row per rank of tests/test_layers.py"
    missing = [f"rank {i}: {unit}" for i, units in enumerate(ranks) for unit in units if f"`{unit}`" not in rows[i]]
    assert missing == []
