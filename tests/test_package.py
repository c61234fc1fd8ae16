"""The layout the project promises: importable kernels, no top-level `kernels`, READMEs, CLI help."""
import argparse
import importlib.metadata
import subprocess
import sys

import pytest

from megatron_sz.cli import build_parser, main
from megatron_sz.paths import RESOURCES, resource_dir

TOP_LEVEL = ["megatron_sz", "kernels", "recipes", "slurm", "seeds", "tests", "docs"]


def test_kernels_importable_and_no_top_level_kernels_installed(tmp_path):
    code = ("import importlib.util, megatron_sz, megatron_sz.kernels\n"
            "assert importlib.util.find_spec('kernels') is None, 'a top-level kernels module is importable'\n"
            "print(megatron_sz.kernels.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "megatron_sz.kernels"
    dist = importlib.metadata.distribution("megatron-sz")
    top = (dist.read_text("top_level.txt") or "").split()
    assert "kernels" not in top


@pytest.mark.parametrize("folder", TOP_LEVEL)
def test_every_top_level_folder_has_a_readme(repo_root, folder):
    readme = repo_root / folder / "README.md"
    assert readme.is_file(), f"{folder}/README.md is missing"
    assert len(readme.read_text().split()) > 30, f"{folder}/README.md says too little"


@pytest.mark.parametrize("name", RESOURCES)
def test_resources_are_found(name):
    assert (resource_dir(name) / "README.md").is_file()


def _walk(parser: argparse.ArgumentParser, path: str):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


def test_every_flag_of_every_subcommand_has_help():
    missing = []
    for path, parser in _walk(build_parser(), "megatron-sz"):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "flags without help text: " + ", ".join(missing)


def test_cli_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "megatron-sz" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
