"""The commit-msg hook scripts/setup installs: subjects of at most 72 characters."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

HOOK = pathlib.Path(__file__).resolve().parent.parent / ".githooks" / "commit-msg"

pytestmark = pytest.mark.timeout(30)


def _hook(tmp_path: pathlib.Path, message: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "COMMIT_EDITMSG"
    path.write_text(message)
    return subprocess.run([str(HOOK), str(path)], capture_output=True, text=True, check=False)


@pytest.mark.parametrize(("length", "accepted"), [(1, True), (72, True), (73, False), (120, False)])
def test_the_subject_s_length_decides(tmp_path: pathlib.Path, length: int, accepted: bool) -> None:
    done = _hook(tmp_path, "s" * length + "\n\nA body line may be as long as it needs to be, " + "b" * 100 + "\n")
    assert (done.returncode == 0) is accepted, done
    if not accepted:
        assert f"{length} characters" in done.stderr


def test_git_s_comment_lines_are_not_the_subject(tmp_path: pathlib.Path) -> None:
    comment = "# Please enter the commit message for your changes. Lines starting with '#' are ignored."
    assert _hook(tmp_path, f"{comment}\nshort subject\n").returncode == 0
