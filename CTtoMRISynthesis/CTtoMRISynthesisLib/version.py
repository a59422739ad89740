"""Which code made a result: the package version and, when it runs from a git checkout, the commit.

``ctmri --version``, ``metrics.json`` (``software``) and the DICOM series' SoftwareVersions carry it. The version
number alone has named every commit since the first; the commit is what tells two results' code apart. It is read
from the checkout's files (``.git/HEAD`` and the ref it names), without running git, which a user may not have;
an installed wheel has no checkout and gives the version alone. A checkout with uncommitted changes is not told
apart from its commit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from . import __version__

_SHA = re.compile(r"^[0-9a-f]{40}$")


def _git_dir(root: Path) -> Optional[Path]:
    """The git directory of a checkout rooted at ``root``: ``.git`` itself, or where a ``.git`` file points (a
    worktree or a submodule)."""
    dot_git = root / ".git"
    if dot_git.is_dir():
        return dot_git
    if dot_git.is_file():
        text = dot_git.read_text(encoding="utf-8", errors="replace").strip()
        if text.startswith("gitdir:"):
            target = Path(text[len("gitdir:"):].strip())
            return target if target.is_absolute() else (root / target).resolve()
    return None


def _resolve_ref(git_dir: Path, ref: str) -> Optional[str]:
    """The commit a ref names: its loose file, else packed-refs; a worktree's refs live in the common directory."""
    places = [git_dir]
    common = git_dir / "commondir"
    if common.is_file():
        places.append((git_dir / common.read_text(encoding="utf-8").strip()).resolve())
    for place in places:
        loose = place / ref
        if loose.is_file():
            sha = loose.read_text(encoding="utf-8").strip()
            return sha if _SHA.match(sha) else None
        packed = place / "packed-refs"
        if packed.is_file():
            for line in packed.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref and _SHA.match(parts[0]):
                    return parts[0]
    return None


def git_commit(root: Optional[Path] = None) -> Optional[str]:
    """The commit checked out at ``root`` (default: the checkout this package lies in), or None: no checkout, or
    one these files do not explain."""
    root = Path(__file__).resolve().parents[2] if root is None else Path(root)
    try:
        git_dir = _git_dir(root)
        if git_dir is None or not (git_dir / "HEAD").is_file():
            return None
        head = (git_dir / "HEAD").read_text(encoding="utf-8").strip()
        if head.startswith("ref:"):
            return _resolve_ref(git_dir, head[len("ref:"):].strip())
        return head if _SHA.match(head) else None
    except OSError:  # unreadable files say nothing about the code; the version alone is still true
        return None


def _with_commit(commit: Optional[str]) -> str:
    return f"{__version__}+g{commit[:7]}" if commit else __version__


def version_string(root: Optional[Path] = None) -> str:
    """``0.1.0``, or ``0.1.0+g1a2b3c4`` from a git checkout (PEP 440's local version, as setuptools-scm writes it)."""
    return _with_commit(git_commit(root))


def software(root: Optional[Path] = None) -> dict:
    """What ``metrics.json`` records: ``{"ctmri": version_string(), "git_commit": the full commit or None}``."""
    commit = git_commit(root)
    return {"ctmri": _with_commit(commit), "git_commit": commit}
