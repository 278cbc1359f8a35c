"""MkDocs hook: the CLI reference, generated at build time from the real ``cxr`` argument parser.

``docs/cli.md`` holds the hand-written introduction and the marker ``<!-- cli-reference -->``; this
hook replaces the marker with one section per subcommand (usage, description, every argument and
option with its help text and default, the usage examples), read from :func:`cxr.cli.build_parser`.
Nothing generated is checked in, so the page cannot drift from the parser. A page without the marker
fails the build.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

MARKER = "<!-- cli-reference -->"
PAGE = "cli.md"
USAGE_WIDTH = 80  # fixed, so the page does not depend on the terminal that builds it

_ESCAPED = str.maketrans({c: "\\" + c for c in "\\`*_[]"})


def _md(text: str) -> str:
    """Plain text as inline Markdown: HTML-escaped, Markdown's emphasis and link characters escaped."""
    return html.escape(" ".join(text.split()), quote=False).translate(_ESCAPED)


def _metavar(action: argparse.Action) -> str:
    """What follows an option string in the usage: ``PARAMS``, ``{onnx,savedmodel,litert}``, ``[TARGET]``..."""
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        name = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        name = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        name = action.dest.upper() if action.option_strings else action.dest
    if action.nargs == "?":
        return f"[{name}]"
    if action.nargs == "*":
        return f"[{name} ...]"
    if action.nargs == "+":
        return f"{name} [{name} ...]"
    if isinstance(action.nargs, int):
        return " ".join([name] * action.nargs)
    return name


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help as ``cxr COMMAND --help`` prints it (defaults and ``%(...)s`` expanded)."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return parser.formatter_class(prog=parser.prog)._expand_help(action)


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = parser.formatter_class(prog=parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _entry(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    metavar = _metavar(action)
    if action.option_strings:
        names = ", ".join(f"`{opt} {metavar}`" if metavar else f"`{opt}`" for opt in action.option_strings)
    else:
        names = f"`{metavar}`"
    text = _help(parser, action)
    return f"- {names}" + (f": {_md(text)}" if text else "")


def _epilog(epilog: str | None) -> list[str]:
    if not epilog:
        return []
    head, sep, examples = epilog.partition("example:\n")
    lines: list[str] = []
    if head.strip():
        lines += ["```text", head.strip("\n"), "```", ""]
    if sep and examples.strip():
        body = "\n".join(line[2:] if line.startswith("  ") else line for line in examples.splitlines())
        lines += ["**Examples**", "", "```bash", body.strip("\n"), "```", ""]
    return lines


def _section(parser: argparse.ArgumentParser, title: str, level: str) -> list[str]:
    lines = [f"{level} {title}", ""]
    if parser.description:
        lines += [_md(parser.description), ""]
    lines += ["```text", _usage(parser), "```", ""]
    positionals = [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    optionals = [a for a in parser._actions if a.option_strings]
    for heading, actions in (("Arguments", positionals), ("Options", optionals)):
        if actions:
            lines += [f"**{heading}**", ""] + [_entry(parser, a) for a in actions] + [""]
    return lines + _epilog(parser.epilog)


def reference_markdown(parser: argparse.ArgumentParser) -> str:
    """The reference for ``parser``: the program itself, then one section per subcommand."""
    commands = _subcommands(parser)
    lines = _section(parser, f"`{parser.prog}`", "##")
    lines += ["**Subcommands**: " + ", ".join(f"[`{name}`](#{parser.prog}-{name})" for name in commands), ""]
    for name, sub in commands.items():
        lines += _section(sub, f"`{parser.prog} {name}` {{ #{parser.prog}-{name} }}", "##")
    return "\n".join(lines).rstrip() + "\n"


def _parser() -> argparse.ArgumentParser:
    root = Path(__file__).resolve().parents[2]
    if str(root) not in sys.path:  # an uninstalled checkout builds too
        sys.path.insert(0, str(root))
    from cxr.cli import build_parser

    return build_parser()


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace the marker of ``cli.md`` with the generated reference."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/{PAGE} lost its {MARKER} marker: the CLI reference has nowhere to go")
    return markdown.replace(MARKER, reference_markdown(_parser()))
