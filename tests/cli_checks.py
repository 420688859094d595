"""Assertions shared by the CLI tests: a command succeeded, or failed the way users should see."""

from __future__ import annotations

from typing import Any


def ok(result: Any) -> Any:
    """Assert a ``CliRunner`` result succeeded and return it."""
    assert result.exception is None, result.output
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result: Any) -> str:
    """Assert the shape of every user-facing failure and return the message line."""
    assert result.exit_code != 0
    # Anything but SystemExit means an exception escaped the command (a traceback for users).
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]
