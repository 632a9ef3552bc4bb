"""The README's promises: two Quickstart commands, .ci/run runs the test command verbatim, and the pooled cache's
example runs as it is and prints what its comments say."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.S)


def test_quickstart_has_exactly_two_commands():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert "kvref.plots" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = quickstart_commands()[1]
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci_lines == [test_command]


def test_pooled_example_runs_as_written(capsys):
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)\n```", text, flags=re.S) if "kvref.PooledCache(" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md (pooled example)", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[0 1] [0 2] 1"  # the child copied the shared partial block; the parent kept the original
    assert "'kv_indptr': array([0, 2, 4], dtype=int32)" in lines[1]
    assert "'kv_indices': array([0, 1, 0, 2], dtype=int32)" in lines[1]
    assert "'kv_last_page_len': array([5, 5], dtype=int32)" in lines[1]


def test_golden_section_commands_run_as_written(capsys, monkeypatch):
    """The "Check your kernel against kvref" commands (after the pip install) run from the repository root and the
    check prints the table the section shows, with exit status 0."""
    import shlex

    from kvref.golden.__main__ import main

    section = (ROOT / "README.md").read_text().split("## Check your kernel against kvref", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("python3 -m kvref.golden")]
    assert [shlex.split(c)[3] for c in commands] == ["list", "show", "check"]
    monkeypatch.chdir(ROOT)
    for command in commands:
        assert main(shlex.split(command)[3:]) == 0, command
    out = capsys.readouterr().out
    assert "attention_window" in out and "34 cases: 8 ok, 0 FAIL, 26 skipped" in out
