"""mingpt._C is optional at install: a build that fails leaves the package without it, one warning and
a note saying why, which mingpt.ops.extension quotes; MINGPT_REQUIRE_EXTENSION=1 makes the failure an error.

The failing build is real: setup.py run on a copy of the sources with a C++ compiler that fails
(`false`), which fails at once, before any compiling."""
import os
import pathlib
import shutil
import subprocess
import sys

from mingpt.ops import extension

ROOT = pathlib.Path(__file__).resolve().parent.parent


def failing_build(tmp_path, require: str):
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    (tmp_path / "mingpt").mkdir()
    env = dict(os.environ, CC="false", CXX="false", MINGPT_REQUIRE_EXTENSION=require, MINGPT_FORCE_CUDA="0")
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_failed_build_installs_without_the_extension_and_says_why(tmp_path):
    result = failing_build(tmp_path, require="0")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING: mingpt._C was not built")]
    assert len(warnings) == 1, result.stderr
    assert "every op runs on the reference path" in warnings[0] and "MINGPT_REQUIRE_EXTENSION=1" in warnings[0]
    note = (tmp_path / "mingpt" / "_C_unbuilt.txt").read_text()
    assert note and note in warnings[0]
    assert not list((tmp_path / "mingpt").glob("_C*.so"))


def test_require_extension_turns_a_failed_build_into_an_error(tmp_path):
    result = failing_build(tmp_path, require="1")
    assert result.returncode != 0
    assert "mingpt._C failed to build and MINGPT_REQUIRE_EXTENSION=1" in result.stderr
    assert not (tmp_path / "mingpt" / "_C_unbuilt.txt").exists()


def test_the_reason_reaches_every_command(tmp_path, monkeypatch):
    note = tmp_path / "_C_unbuilt.txt"
    note.write_text("clang++: error: unsupported option '-fopenmp'")
    monkeypatch.setattr(extension, "UNBUILT_NOTE", str(note))
    reason = extension.unavailable_reason(ImportError("No module named 'mingpt._C'"))
    assert reason.startswith("mingpt._C was not built at install (clang++: error: unsupported option '-fopenmp')")
    assert "reference ops serve instead" in reason

