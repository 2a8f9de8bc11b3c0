"""The documentation matches the code: the flag reference is the parser's, every cape-ray command in
the README and the docs parses as written, every flag they name exists, the README's MP-100 recipe
runs as written, and pyproject.toml pins what requirements.txt pins."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cape_ray import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "cluster" / "README.md",
         *sorted((ROOT / "bench").glob("*.md"))]
# Other tools' flags that the docs name in passing (pip, pytest, ray, mlflow, hf, kubectl, make-data's own).
OTHER_TOOLS = {"--index-url", "--working-dir", "--backend-store-uri", "--local-dir", "--no-wait", "--pip", "--suffix",
               "--dry-run", "--follow", "--submission-id", "--runtime-env-json", "--head", "--port", "--force",
               "--address", "--profile", "--only", "--reports", "--models", "--steps", "--minutes", "--threads",
               "--repeats", "--synthetic", "--table", "--cpu-seconds", "--out", "--dir", "--scale", "--epochs",
               "--set", "--val-every", "--val-episodes", "--test-episodes", "--save", "--image_size",
               "--batch_size", "--checkpoint_every_steps", "--precision", "--similarity-weight", "--durations",
               "--block", "--disable-usage-stats", "--num-cpus", "--resources", "--verbose", "--", "--upgrade"}


def commands(page: Path) -> list[tuple[int, str]]:
    """(line number, command) of every cape-ray command in the page's fenced shell blocks."""
    found, block, joined, start = [], False, "", 0
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if line.startswith("```"):
            block = line.strip() in ("```bash", "```sh", "```shell")
            continue
        if not block:
            continue
        text = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not joined:
            start = number
        joined += " " + text.rstrip("\\").strip()
        if text.endswith("\\"):
            continue
        command, joined = joined.strip(), ""
        for prefix in ("cape-ray ", "python -m cape_ray ", ".venv/bin/cape-ray ", "python3 -m cape_ray "):
            if command.startswith(prefix):
                found.append((start, command[len(prefix):]))
        if command.startswith("bash scripts/train.sh"):
            found.append((start, "train " + command[len("bash scripts/train.sh"):]))
    return found


def test_the_flag_reference_is_the_parsers():
    assert (ROOT / "docs" / "flags.md").read_text() == cli.flag_reference(cli.build_parser()), \
        "docs/flags.md is out of date: run `cape-ray flags > docs/flags.md`"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_parses(page):
    parser = cli.build_parser()
    for number, command in commands(page):
        argv = shlex.split(re.sub(r"\$\{?\w+\}?", "1", command))  # a loop's $n: its first value
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            if exit_.code != 0:
                pytest.fail(f"{page.name}:{number}: `cape-ray {command}` does not parse")


def test_every_flag_the_docs_name_exists():
    parser = cli.build_parser()
    known = set()
    for sub in parser._subparsers._group_actions[0].choices.values():
        known |= {o for action in sub._actions for o in action.option_strings}
    for page in PAGES:
        for flag in re.findall(r"`(--[a-z][a-z0-9_-]*)", page.read_text()):  # prose naming a flag
            assert flag in known or flag in OTHER_TOOLS, f"{page.name} names {flag}, which no cape-ray command has"


def test_pyproject_pins_what_requirements_pin():
    import tomllib

    requirements = {line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.split("#")[0].strip()}
    dependencies = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert dependencies == requirements


@pytest.mark.slow
def test_the_readme_mp100_recipe_runs_as_written(tmp_path, ray_cluster):
    """The README's MP-100 recipe, every command as written, in a fresh directory with the
    project's examples/ beside it (on the session's Ray instance)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## An MP-100 recipe"):text.index("## A model of your own")]
    block = section[section.index("```bash") + len("```bash"):]
    block = block[:block.index("```")]
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {"RAY_ADDRESS": ray_cluster, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
           "HOME": str(tmp_path), "CAPE_STORAGE_RETRY_WAIT_S": "0.01", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PCK@0.20" in done.stdout
    for report in ("results/demo_1shot.json", "results/demo_5shot.json", "results/demo_mp100.json",
                   "results/demo_mp100.md"):
        assert (tmp_path / report).is_file(), report
