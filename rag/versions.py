"""The folder of index versions: which one is current, which one serves, listing, rollback, pruning, the build lock.

    index/current -> versions/<id>       symlink, replaced atomically when a build is complete (point_current)
    index/versions/<id>/                 one version each, named by its build time (rag/index.py reads one)
    index/versions/.<id>.tmp-<pid>/      a build in progress; removed when that process is gone (prune)
    index/.build.lock                    held by a build or a rollback (build_lock)

A damaged `current` is reported and the newest intact version serves instead (open_serving), builds start from
that version, and list_versions shows each version's status. Verifying a version is rag/index.py's job.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import NamedTuple

from .index import (Index, IndexFault, current_target, forget_verdict, inspect_version, load, model_problem,
                    one_line)

KEEP_VERSIONS = 3  # old versions kept for rollback


def current_path(index_dir: Path) -> Path | None:
    link = index_dir / "current"
    return link.resolve() if link.exists() else None


def folders(index_dir: Path) -> list[Path]:
    """The version folders under index_dir/versions, oldest first (names are build times)."""
    versions = Path(index_dir) / "versions"
    try:
        return sorted(p for p in versions.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # no versions yet, or not readable
        return []


class Served(NamedTuple):
    """The index version to answer from, and one line for each problem met choosing it ([] when it is current)."""

    index: Index
    problems: list[str]


def choose_version(index_dir: Path, model_name: str | None = None, broken: dict[Path, str] | None = None
                   ) -> tuple[Path, list[str]]:
    """The version folder to serve: `current` when it is intact, else the newest intact version, with a line
    saying why. Only checks (cached checksums), loads nothing. `broken`: folders known not to load, and why.

    Raises IndexFault when there is no index, when `current` was built with another model or format (a
    rebuild, not damage), or when no version is intact.
    """
    index_dir, broken = Path(index_dir), broken or {}
    target, found = current_target(index_dir), folders(index_dir)
    if target is None and not found:
        raise IndexFault(f"no index at {index_dir}; build one with `rag build --index {index_dir}`")
    if target is None:
        trouble = f"{index_dir} has no `current` version"
    else:
        verdict = inspect_version(target)
        problem = broken.get(target) or verdict.problem
        if problem is None:
            wrong_model = model_problem(verdict.manifest, model_name)
            if wrong_model:
                raise IndexFault(f"the index at {target} was {wrong_model}; rebuild it with `rag build` or use "
                                  f"--model {verdict.manifest['model'].get('name')}")
            return target, []
        if problem.startswith("outdated"):
            raise IndexFault(f"the index at {target} is {problem}; rebuild it with `rag build`")
        trouble = f"the current index version {target.name} is {problem}"
    for folder in reversed(found):
        if folder.resolve() == target or folder.resolve() in broken:
            continue
        verdict = inspect_version(folder)
        if verdict.problem is None and model_problem(verdict.manifest, model_name) is None:
            return folder, [f"{trouble}; serving {folder.name} instead: run `rag build` to write a good version, "
                            f"or `rag index rollback {folder.name}`"]
    raise IndexFault(f"{trouble}, and no other version in {index_dir} is usable; run `rag build`")


def open_serving(index_dir: Path, model_name: str | None = None) -> Served:
    """Load the version to answer from: `current`, or when it is damaged or missing the newest intact version,
    with one line per problem for the caller to show (the chat and the CLI alike).

    Raises IndexFault (one line, saying what to do) when no version can serve.
    """
    broken: dict[Path, str] = {}
    while True:
        path, problems = choose_version(index_dir, model_name, broken)
        try:
            return Served(load(path, model_name), problems)
        except IndexFault as e:  # intact files that still do not load: try the next version
            broken[path.resolve()] = f"damaged: {e}"


def point_current(index_dir: Path, target: Path) -> None:
    """Point index_dir/current at version folder `target`, atomically."""
    tmp_link = index_dir / f".current.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp_link.unlink()
    tmp_link.symlink_to(target.relative_to(index_dir))
    os.replace(tmp_link, index_dir / "current")  # rename(2) is atomic: readers see old or new, never neither


def prune(versions: Path, keep: int) -> None:
    """Keep `current`, the newest `keep` intact versions, and damaged ones newer than those (for a look): a
    damaged version never pushes a good one out."""
    current = current_path(versions.parent)
    done = folders(versions.parent)
    kept = [p for p in done if inspect_version(p).problem is None][-keep:]
    for old in done if len(kept) == keep else []:
        if old.resolve() != current and old not in kept and old < kept[0]:
            shutil.rmtree(old, ignore_errors=True)
            forget_verdict(old)
    for stale in versions.glob(".*.tmp-*"):  # left by a build that was killed
        with contextlib.suppress(ValueError):
            if not _pid_alive(int(stale.name.rsplit("-", 1)[1])):
                shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_versions(index_dir: Path) -> list[dict]:
    """Every version folder, oldest first, whatever its state: version, built_at, documents, chunks, model (None
    where the manifest cannot tell), whether it is current, and its `status`: "ok", or the problem in one line
    ("damaged: dense.faiss does not match its checksum"), also in `problem` (None when ok). A `current` link to
    a missing folder is listed too, as "missing".
    """
    index_dir = Path(index_dir)
    target = current_target(index_dir)
    out = []
    for folder in folders(index_dir):
        verdict = inspect_version(folder)
        m = verdict.manifest or {}
        counts, model = m.get("counts") or {}, m.get("model") or {}
        out.append({"version": folder.name, "built_at": m.get("built_at"), "documents": counts.get("documents"),
                    "chunks": counts.get("chunks"), "model": model.get("name"), "current": folder.resolve() == target,
                    "path": str(folder), "status": verdict.problem or "ok", "problem": verdict.problem})
    if target is not None and not any(v["current"] for v in out):
        problem = inspect_version(target).problem or "not under versions/"
        out.append({"version": target.name, "built_at": None, "documents": None, "chunks": None, "model": None,
                    "current": True, "path": str(target), "status": problem, "problem": problem})
        out.sort(key=lambda v: v["version"])
    return out


def rollback(index_dir: Path, version: str | None = None) -> dict:
    """Point `current` at `version`, or at the newest intact version before the current one.

    Works whatever state the versions are in; refuses a damaged target, saying which ones are good.
    """
    index_dir = Path(index_dir)
    with build_lock(index_dir):
        target = rollback_target(list_versions(index_dir), version, str(index_dir), "`rag build`")
        load(Path(target["path"]))  # never point `current` at a version that does not load
        try:
            point_current(index_dir, Path(target["path"]))
        except OSError as e:
            raise IndexFault(f"cannot point {index_dir / 'current'} at {target['version']} "
                              f"({e.strerror or one_line(e)}); the index folder must be writable") from None
        return {**target, "current": True}


def rollback_target(versions: list[dict], version: str | None, where: str, build: str) -> dict:
    """Of `versions` (list_versions records, oldest first), the one to roll back to: `version` (by name, or by
    Milvus collection), or the newest intact one before the current. IndexFault when it is missing or damaged,
    saying which are good; `where` names the store and `build` its build command in that message."""
    current = next((v for v in versions if v["current"]), None)
    good = [v for v in versions if v["problem"] is None and not v["current"]]
    if version is None:
        earlier = [v for v in good if current is None or v["version"] < current["version"]]
        if not earlier:
            raise IndexFault(f"no earlier intact index version in {where} to roll back to "
                             f"(see `rag index list`); run {build}")
        return earlier[-1]
    target = next((v for v in versions if version in (v["version"], v.get("collection"))), None)
    if target is None:
        raise IndexFault(f"no index version {version!r} in {where}; `rag index list` shows them")
    if target["problem"] is not None:
        others = ", ".join(v["version"] for v in good) or f"none; run {build}"
        raise IndexFault(f"index version {version} is {target['problem']}; roll back to an intact one ({others})")
    return target


@contextlib.contextmanager
def build_lock(index_dir: Path):
    """Held by a build or a rollback; IndexFault when another holds it or the folder cannot be written."""
    index_dir = Path(index_dir)
    if index_dir.exists() and not index_dir.is_dir():
        raise IndexFault(f"{index_dir} is a file, not an index folder; choose another --index")
    try:
        index_dir.mkdir(parents=True, exist_ok=True)
        fh = open(index_dir / ".build.lock", "a")
    except OSError as e:
        raise IndexFault(f"cannot write to {index_dir} ({e.strerror or one_line(e)}); building or rolling back "
                          "needs a writable index folder") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexFault(f"another build of {index_dir} is running; wait for it to finish and try again")
        yield
