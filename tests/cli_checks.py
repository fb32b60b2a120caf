"""What every CLI failure must look like, for the tests of any command (import from a test as
`from cli_checks import assert_one_line_error`: pytest puts tests/ on sys.path)."""
from __future__ import annotations


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 2 and exactly one line on stderr, `q4k-engine: error: ...`, holding every fragment."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("q4k-engine: error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
