"""Where the serving index versions live, chosen by Config.backend: the index folder (FAISS, rag/versions.py) or
Milvus (rag/milvus.py). Building, choosing, opening, listing and rolling back go through here, so QA, the chat and
the CLI do not know which store they talk to.

Both backends build the same way: rag/building.py writes a version folder (with Milvus it is also the build cache:
unchanged chunks keep their vectors), and the milvus backend then publishes that version to Milvus, where every
chat process serves it from.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

from .building import BuildReport, build as build_folder
from .config import Config
from .versions import KEEP_VERSIONS, Served


@functools.lru_cache(maxsize=8)
def _store(uri: str, token: str, db: str, name: str):
    from .milvus import MilvusStore

    return MilvusStore(uri, token, db, name)


def milvus_store(config: Config):
    """The MilvusStore config names (one client per process and store)."""
    return _store(config.milvus_uri, config.milvus_token, config.milvus_db, config.milvus_collection)


def build(config: Config, embedder, progress: Callable[[str], None] | None = None, strict: bool = False) -> BuildReport:
    """Build a new version (rag/building.py) and, with the milvus backend, publish it: written in full and
    validated before the alias moves, so a build stopped at any moment leaves the served version as it was."""
    report = build_folder(config, embedder, progress=progress, strict=strict)
    if config.backend == "milvus":
        report.published = milvus_store(config).publish(report.path, KEEP_VERSIONS, progress or (lambda line: None))
    return report


def choose(config: Config, broken: dict | None = None) -> tuple[object, list[str]]:
    """What identifies the version to serve (a folder, or a Milvus collection) and a line per problem met."""
    if config.backend == "milvus":
        return milvus_store(config).choose(config.model, broken)
    from .versions import choose_version

    return choose_version(Path(config.index_dir), config.model, broken)


def open_serving(config: Config, any_model: bool = False) -> Served:
    """Load the version to answer from: the current one, or the newest intact one with a line saying why.
    `any_model`: whatever embedding model built it (to read articles, not to answer)."""
    model = None if any_model else config.model
    if config.backend != "milvus":
        from .versions import open_serving as open_folder

        return open_folder(Path(config.index_dir), model)
    from .index import IndexFault, StoreUnreachable

    store, broken = milvus_store(config), {}
    while True:
        collection, problems = store.choose(model, broken)
        try:
            return Served(store.open(collection), problems)
        except StoreUnreachable:
            raise
        except IndexFault as e:
            broken[collection] = f"damaged: {e}"


def list_versions(config: Config) -> list[dict]:
    if config.backend == "milvus":
        return milvus_store(config).list_versions()
    from .versions import list_versions as list_folder

    return list_folder(Path(config.index_dir))


def rollback(config: Config, version: str | None = None) -> dict:
    if config.backend == "milvus":
        return milvus_store(config).rollback(version)
    from .versions import rollback as rollback_folder

    return rollback_folder(Path(config.index_dir), version)


def where(config: Config) -> str:
    """Where the versions are, for messages: the index folder, or the Milvus URI and alias."""
    if config.backend == "milvus":
        return f"Milvus at {config.milvus_uri} ({config.milvus_collection})"
    return str(config.index_dir)
