"""Versioned, reversible releases of a model repository on one host (or one shared folder).

A release is a folder ``DIR/<name>/`` holding ``model_repository/`` (a copy of a built repository)
and ``release.json`` (its name, content digest, gate results and source). It is written once,
through a staging folder renamed in one step, and never overwritten: publishing the same content
again does nothing, other content under an existing name is refused. The default name is
content-addressed, ``r-<12 hex>`` of the repository's digest (every file's path and SHA-256).

Only a repository whose served variants passed their accuracy gate is published
(:func:`gate_problems`); a gate stamp (:data:`GATE_STAMP`, a ``sha256sum`` line of the manifest)
is written into the release's repository, so ``deploy/docker/publish.sh`` (the Kubernetes publish
Job, busybox only) can refuse a repository nobody checked: ``sha256sum -c``.

``DIR/current`` is a symlink to the release served, swapped atomically (``os.replace``) by
:func:`promote`; ``DIR/history.json`` is the stack of promotions :func:`rollback` pops. A running
``rankserve serve --releases DIR`` watches ``current`` and switches without dropping requests
(:mod:`rankserve.server.rollout`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from rankserve.errors import RankserveError

MANIFEST = "manifest.json"
REPOSITORY = "model_repository"
RELEASE_FILE = "release.json"
GATE_STAMP = "gate.sha256"
"""In a published repository: ``<sha256 of manifest.json>  manifest.json``, the line ``sha256sum``
writes and ``sha256sum -c`` checks. Written only after :func:`gate_problems` found none."""
CURRENT = "current"
HISTORY = "history.json"
LOCK = ".lock"
_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,39}$")
_RESERVED = {CURRENT, HISTORY, LOCK}
_IGNORED_DIRS = {"__pycache__"}


class ReleaseError(RankserveError):
    """A release cannot be published, promoted or rolled back (the reason says why)."""


def check_name(name: str) -> str:
    """``name`` if it is a valid release name (the rule of ``publish.sh`` and Kubernetes names)."""
    if not _NAME.match(name) or name in _RESERVED:
        raise ReleaseError(f"release name {name!r}: use 1 to 40 lowercase letters, digits, '.' and '-', starting with a "
                           f"letter or digit (not {', '.join(sorted(_RESERVED))})")
    return name


def sha256(path: Path) -> str:
    """The manifest's checksum of a file (the builder's), imported when first needed: the builder is heavy."""
    from rankserve.builder.repository import sha256 as builder_sha256
    return builder_sha256(path)


def repository_entries(repo: Path) -> list[Path]:
    """Every folder and file of ``repo`` that a release carries, sorted (no ``__pycache__``, no gate
    stamp); folders count, empty ones too (an ensemble's version folder is empty)."""
    entries = []
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo)
        if any(part in _IGNORED_DIRS for part in rel.parts) or rel == Path(GATE_STAMP):
            continue
        if path.is_symlink():
            raise ReleaseError(f"{path} is a symbolic link: a release holds plain files only")
        if path.is_file() or path.is_dir():
            entries.append(path)
    return entries


def content_digest(repo: str | Path) -> str:
    """SHA-256 over every carried folder's and file's relative path and file's SHA-256: equal iff the
    content is."""
    repo = Path(repo)
    h = hashlib.sha256()
    for path in repository_entries(repo):
        h.update(f"{path.relative_to(repo).as_posix()}\0{sha256(path) if path.is_file() else '/'}\n".encode())
    return h.hexdigest()


def default_name(digest: str) -> str:
    return f"r-{digest[:12]}"


def gate_problems(manifest: dict) -> list[str]:
    """Why a repository with this manifest must not be published (empty: it may be): every loaded
    variant needs a passed accuracy gate, and the default ``ranker`` the strict one unless the build
    named it (``--default``)."""
    variants = manifest.get("variants") or {}
    default = manifest.get("default_variant")
    loaded = (manifest.get("serving") or {}).get("loaded") or [n for n, v in variants.items() if v.get("loaded")]
    if not default or default not in variants:
        return [f"the manifest names no default variant among {sorted(variants)}"]
    problems = []
    for name in dict.fromkeys([default, *loaded]):
        gate = (variants.get(name) or {}).get("gate")
        if not gate:
            problems.append(f"variant {name}: no accuracy gate record (build with --data so the gate runs)")
        elif not gate.get("passed"):
            problems.append(f"variant {name} failed its accuracy gate (NDCG@10 drop {100 * gate.get('relative_drop', 0):.2f}%, "
                            f"limit {100 * gate.get('max_drop', 0):.2f}%)")
        elif name == default and manifest.get("default_rule") != "named" and not gate.get("strict"):
            problems.append(f"the default variant {name} does not pass the strict gate")
    return problems


def gate_summary(manifest: dict) -> dict:
    variants = manifest.get("variants") or {}
    loaded = (manifest.get("serving") or {}).get("loaded") or []
    return {"default_variant": manifest.get("default_variant"),
            "variants": {n: variants[n].get("gate") for n in loaded if n in variants}}


def read_manifest(repo: Path) -> dict:
    path = repo / MANIFEST
    if not path.is_file():
        from rankserve.builder.repository import build_hint

        raise ReleaseError(f"{repo} has no {MANIFEST}: not a built model repository (build one with {build_hint(repo)})")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ReleaseError(f"{path} is not valid JSON: {exc}") from None


def check_gate(repo: Path) -> dict:
    """The manifest of ``repo``, verified (every listed file present with its checksum) and gated."""
    from rankserve.builder.repository import verify_repository

    manifest = read_manifest(repo)
    problems = gate_problems(manifest)
    if problems:
        raise ReleaseError(f"{repo} cannot be published: " + "; ".join(problems))
    verify_repository(repo)
    return manifest


def gate_stamp_line(repo: Path) -> str:
    return f"{sha256(repo / MANIFEST)}  {MANIFEST}\n"


def write_gate_stamp(repo: str | Path) -> Path:
    """Check ``repo``'s gate and write its stamp (for the models image: ``publish.sh`` checks it)."""
    repo = Path(repo)
    check_gate(repo)
    path = repo / GATE_STAMP
    tmp = path.with_name(f".{GATE_STAMP}.{os.getpid()}")
    tmp.write_text(gate_stamp_line(repo))
    os.replace(tmp, path)
    return path


def release_info(releases: str | Path, name: str) -> dict:
    path = Path(releases) / check_name(name) / RELEASE_FILE
    if not path.is_file():
        raise ReleaseError(f"no release {name} in {releases} (no {path})")
    return json.loads(path.read_text())


def release_repository(releases: str | Path, name: str) -> Path:
    return Path(releases) / check_name(name) / REPOSITORY


def list_releases(releases: str | Path) -> list[str]:
    root = Path(releases)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink() and _NAME.match(p.name)
                  and (p / RELEASE_FILE).is_file())


def publish(repo: str | Path, releases: str | Path, name: str | None = None) -> tuple[str, bool]:
    """Publish ``repo`` as ``releases/<name>``; (name, whether it was new). Refuses a repository whose
    gate failed, and other content under an existing name; the same content again is a no-op."""
    repo, root = Path(repo), Path(releases)
    manifest = check_gate(repo)
    digest = content_digest(repo)
    name = check_name(name or default_name(digest))
    dest = root / name
    if dest.exists():
        existing = release_info(root, name)
        if existing.get("digest") == digest:
            return name, False
        raise ReleaseError(f"release {name} already exists in {root} with other content (digest {existing.get('digest', '?')[:12]}, "
                           f"this repository {digest[:12]}): releases are never overwritten; publish under a new name")
    root.mkdir(parents=True, exist_ok=True)
    stage = root / f".staging-{name}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        target = stage / REPOSITORY
        target.mkdir(parents=True)
        for src in repository_entries(repo):
            dst = target / src.relative_to(repo)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        if content_digest(target) != digest:
            raise ReleaseError(f"the copy in {stage} differs from {repo} (changed while copying, or disk full?)")
        (target / GATE_STAMP).write_text(gate_stamp_line(target))
        info = {"name": name, "digest": digest, "source": str(repo.resolve()),
                "published_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "manifest_sha256": sha256(target / MANIFEST), "gate": gate_summary(manifest)}
        (stage / RELEASE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        for path in [stage, *stage.rglob("*")]:  # read-only for everyone: a release is never edited in place
            path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            os.rename(stage, dest)  # fails if dest appeared meanwhile (a non-empty directory): never over it
        except OSError:
            raise ReleaseError(f"{dest} appeared while publishing (another publisher?): left as it is") from None
    finally:
        if stage.exists():
            for path in [stage, *stage.rglob("*")]:
                if path.is_dir():
                    path.chmod(0o755)
            shutil.rmtree(stage, ignore_errors=True)
    return name, True


# -- the pointer and its history --------------------------------------------------------------------

@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with (root / LOCK).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def current(releases: str | Path) -> str | None:
    """The release ``current`` points at, or None."""
    try:
        return os.readlink(Path(releases) / CURRENT)
    except (FileNotFoundError, OSError):
        return None


def history(releases: str | Path) -> list[str]:
    path = Path(releases) / HISTORY
    return json.loads(path.read_text()) if path.is_file() else []


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _point(root: Path, name: str) -> None:
    link = root / f".{CURRENT}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(name)  # relative: the folder may be mounted elsewhere
    os.replace(link, root / CURRENT)


def check_release(releases: str | Path, name: str) -> Path:
    """The repository of release ``name``, checked: present, gate stamp valid, every file intact."""
    from rankserve.builder.repository import verify_repository

    repo = release_repository(releases, name)
    release_info(releases, name)
    stamp = repo / GATE_STAMP
    if not stamp.is_file() or stamp.read_text() != gate_stamp_line(repo):
        raise ReleaseError(f"release {name}: {stamp} is missing or does not match its manifest (not published by "
                           "`rankserve publish`, or changed since)")
    verify_repository(repo)
    return repo


def promote(releases: str | Path, name: str) -> str | None:
    """Point ``current`` at release ``name`` (checked first) and push it on the history; the release
    served before (None if none)."""
    root = Path(releases)
    check_release(root, name)
    with _locked(root):
        before = current(root)
        if before == name:
            return before
        stack = history(root)
        if not stack and before:
            stack = [before]
        stack.append(name)
        _point(root, name)
        _write_atomic(root / HISTORY, json.dumps(stack, indent=1) + "\n")
        return before


def rollback(releases: str | Path) -> str:
    """Point ``current`` back at the release promoted before it; that release's name."""
    root = Path(releases)
    with _locked(root):
        stack = history(root)
        if len(stack) < 2:
            raise ReleaseError(f"nothing to roll back to in {root}: history {stack}")
        previous = stack[-2]
        check_release(root, previous)
        _point(root, previous)
        _write_atomic(root / HISTORY, json.dumps(stack[:-1], indent=1) + "\n")
        return previous
