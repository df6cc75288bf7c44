"""`rankserve <command> --help` shows every option's default and, for numbers, its unit (issue 18, item 10)."""

import argparse
import subprocess
import sys

import pytest

from rankserve.cli import parser
from rankserve.cli_help import HelpFormatter, help_problems


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    top = parser()
    return next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_of_every_subcommand_shows_its_default_and_unit():
    problems = [p for name, sub in _subcommands().items() for p in help_problems(sub, name)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_help_text_shows_the_defaults_argparse_holds(command):
    """What --help prints (not only the formatter's logic): each default value is in the text."""
    sub = _subcommands()[command]
    text = "".join(sub.format_help().split())  # argparse wraps lines, also after a hyphen
    for action in sub._actions:
        if action.option_strings and isinstance(action.default, (int, float, str)) and not isinstance(action.default, bool) \
                and action.default not in ("", argparse.SUPPRESS) and "default" not in (action.help or ""):
            assert f"(default:{action.default})".replace(" ", "") in text, (command, action.option_strings, text)


def test_the_check_flags_an_option_without_default_or_unit():
    """The check can fail: a numeric option without help, and one with help but no unit."""
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--size", type=int, help="how big (default 3)")
    p.add_argument("--name", help="a name")
    problems = help_problems(p, "x")
    assert "rankserve x --timeout: --help shows no default" in problems
    assert any(q.startswith("rankserve x --timeout: a number without a unit") for q in problems)
    assert any(q.startswith("rankserve x --size: a number without a unit") for q in problems)
    assert "rankserve x --name: --help shows no default" in problems
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    assert help_problems(p, "x") == []
    assert "seconds to wait (default: 30.0)" in " ".join(p.format_help().split())


def test_serve_help_as_a_user_runs_it():
    out = subprocess.run([sys.executable, "-m", "rankserve", "serve", "--help"], capture_output=True, text=True, check=True)
    text = " ".join(out.stdout.split())
    assert "TCP port of the HTTP (KServe v2) endpoint (default: 8000)" in text
    assert "seconds between checks of the server and its stubs (default: 1.0)" in text
