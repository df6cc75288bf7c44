"""How ``rankserve <command> --help`` shows options: every default, every unit.

:class:`HelpFormatter` appends ``(default: X)`` to an option whose help does not already say its
default; :func:`help_problems` lists the options of a parser that still show no default or, when
they take a number, no unit (``tests/unit/test_docs_cli_help.py`` runs it on every subcommand).
"""

from __future__ import annotations

import argparse
import re

UNIT_WORDS = (
    "seconds", "second", "ms", "bytes", "KiB", "MiB", "GiB", "requests", "requests/s", "pairs", "pairs/s", "tokens",
    "users", "users/s", "candidates", "queries", "layers", "epochs", "instances", "processes", "restarts", "port",
    "fraction", "ratio", "x", "integer",
)
"""Words that say what a number counts or measures (``x``: a multiple; ``fraction``/``ratio``: dimensionless;
``integer``: an identifier such as a random seed)."""

_UNIT = re.compile(r"(?<![\w/])(" + "|".join(re.escape(w) for w in sorted(UNIT_WORDS, key=len, reverse=True)) + r")(?![\w/])")
_FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction, argparse._HelpAction,
          argparse._VersionAction, argparse._CountAction)


def _shown_default(action: argparse.Action) -> bool:
    """Whether argparse has a default worth printing for ``action`` (not None, not an empty list)."""
    return action.default not in (None, argparse.SUPPRESS) and action.default != []


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to every option with a default its help does not already state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and not isinstance(action, _FLAGS) and _shown_default(action)
                and "default" not in text and "%(default)" not in text):
            text = f"{text} (default: %(default)s)".strip()
        return text


def _numeric(action: argparse.Action) -> bool:
    return action.type in (int, float) or (isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
                                           and not isinstance(action, _FLAGS))


def help_problems(parser: argparse.ArgumentParser, command: str) -> list[str]:
    """The options of ``parser`` whose help, as ``--help`` prints it, shows no default (every option
    that is not a flag or required must say what it is when not given), or no unit for a number."""
    problems = []
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, _FLAGS) or action.help == argparse.SUPPRESS:
            continue
        name = f"rankserve {command} {action.option_strings[-1]}"
        shown = formatter._expand_help(action) if action.help else ""  # argparse prints nothing for an option without help
        if not action.required and "default" not in shown:
            problems.append(f"{name}: --help shows no default")
        if _numeric(action) and not _UNIT.search(shown):
            problems.append(f"{name}: a number without a unit in its help ({' / '.join(UNIT_WORDS[:6])}, ...)")
    return problems
