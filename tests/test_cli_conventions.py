"""Every tool builds its parser with dig_common.cli.tool_parser (docs/cli.md): no prefix matching, so a renamed
flag is refused instead of silently taken as the new one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dig_common.cli import tool_parser

REPO = Path(__file__).resolve().parents[1]
TOOL_PARTS = ("data_prep", "eval", "recipes")


def calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def tool_modules() -> list[Path]:
    """Modules with a command line: those whose main is wrapped with cli_main."""
    return [
        path
        for part in TOOL_PARTS
        for path in sorted((REPO / part).rglob("*.py"))
        if any(called_name(call) == "cli_main" for call in calls(path))
    ]


def test_tool_parser_refuses_a_prefix_and_takes_the_first_paragraph(capsys):
    parser = tool_parser("python -m x", "Does one thing.\n\nMore words.")
    parser.add_argument("--out-dir", required=True)
    assert parser.description == "Does one thing."
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--out", "d"])
    assert exit_.value.code == 2 and "the following arguments are required: --out-dir" in capsys.readouterr().err


def test_every_tool_builds_its_parsers_with_tool_parser():
    modules = tool_modules()
    names = {path.relative_to(REPO).as_posix() for path in modules}
    assert {"data_prep/render/generate.py", "data_prep/build.py", "eval/dig.py", "recipes/dig/launch.py"} <= names
    for path in modules:
        found = calls(path)
        assert any(called_name(call) == "tool_parser" for call in found), path
        assert not [call.lineno for call in found if called_name(call) == "ArgumentParser"], path
        for call in found:  # subcommands (eval.harness run / collect): no prefix matching either
            if called_name(call) == "add_parser":
                keywords = {kw.arg: kw.value for kw in call.keywords}
                assert isinstance(keywords.get("allow_abbrev"), ast.Constant), (path, call.lineno)
                assert keywords["allow_abbrev"].value is False, (path, call.lineno)


def test_a_renamed_flag_is_refused_not_taken(tmp_path, capsys):
    from eval import visualize

    samples = tmp_path / "results.samples.jsonl"
    samples.write_text("")
    with pytest.raises(SystemExit) as exit_:
        visualize.main(["--samples", str(samples), "--out", str(tmp_path / "gallery")])  # --out-dir since renamed
    assert exit_.value.code == 2
    assert "the following arguments are required: --out-dir" in capsys.readouterr().err
    assert not (tmp_path / "gallery").exists()


def test_ctrl_c_is_one_line_saying_what_was_kept(capsys, monkeypatch):
    """KeyboardInterrupt: no traceback, status 130, the tool's own resume hint (or the atomic-writes default)."""
    from dig_common.cli import INTERRUPT_EXIT, NOTHING_HALF_WRITTEN, cli_main

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.delenv("DIG_DEBUG", raising=False)
    assert cli_main("python -m tool")(interrupted)([]) == INTERRUPT_EXIT == 130
    err = capsys.readouterr().err
    assert err.strip() == f"python -m tool: interrupted: {NOTHING_HALF_WRITTEN}" and "Traceback" not in err
    hint = "rerun the same command to resume; finished pairs are kept"
    assert cli_main("python -m gen", on_interrupt=hint)(interrupted)([]) == 130
    assert capsys.readouterr().err.strip() == f"python -m gen: interrupted: {hint}"
    monkeypatch.setenv("DIG_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        cli_main("python -m tool")(interrupted)([])
