"""version.py: which code made a result. The version alone has named every commit, so from a git checkout the
commit is added, read from the checkout's files (no git needed): a branch's loose ref, packed refs, a detached
HEAD, and a worktree whose ``.git`` is a file; no checkout (an installed wheel) gives the version alone."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from CTtoMRISynthesisLib import __version__
from CTtoMRISynthesisLib.version import git_commit, software, version_string

A = "1a2b3c4d" * 5
B = "0f" * 20


def _checkout(root: Path, head: str) -> Path:
    (root / ".git" / "refs" / "heads").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text(head + "\n")
    return root / ".git"


def test_a_branch_a_packed_ref_and_a_detached_head(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    (_checkout(loose, "ref: refs/heads/main") / "refs" / "heads" / "main").write_text(A + "\n")
    assert git_commit(loose) == A
    assert version_string(loose) == f"{__version__}+g1a2b3c4"
    assert software(loose) == {"ctmri": f"{__version__}+g1a2b3c4", "git_commit": A}

    packed = tmp_path / "packed"
    (_checkout(packed, "ref: refs/heads/topic") / "packed-refs").write_text(
        f"# pack-refs with: peeled fully-peeled sorted\n{B} refs/heads/main\n{A} refs/heads/topic\n")
    assert git_commit(packed) == A

    detached = tmp_path / "detached"
    _checkout(detached, B)
    assert git_commit(detached) == B


def test_a_worktree_reads_its_head_and_the_common_refs(tmp_path: Path) -> None:
    main = tmp_path / "main"
    git = _checkout(main, "ref: refs/heads/main")
    (git / "refs" / "heads" / "main").write_text(B + "\n")
    (git / "refs" / "heads" / "work").write_text(A + "\n")
    worktree_git = git / "worktrees" / "w"
    worktree_git.mkdir(parents=True)
    (worktree_git / "HEAD").write_text("ref: refs/heads/work\n")
    (worktree_git / "commondir").write_text("../..\n")
    tree = tmp_path / "w"
    tree.mkdir()
    (tree / ".git").write_text(f"gitdir: {worktree_git}\n")
    assert git_commit(tree) == A


def test_no_checkout_or_one_these_files_do_not_explain_gives_the_version_alone(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None and version_string(tmp_path) == __version__
    assert software(tmp_path) == {"ctmri": __version__, "git_commit": None}
    odd = tmp_path / "odd"
    _checkout(odd, "ref: refs/heads/gone")  # a branch with no commit yet
    assert git_commit(odd) is None
    (odd / ".git" / "HEAD").write_text("not a commit\n")
    assert git_commit(odd) is None


def test_this_checkout_gives_what_git_says() -> None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not run from a git checkout")
    said = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert said.returncode == 0 and git_commit() == said.stdout.strip()
