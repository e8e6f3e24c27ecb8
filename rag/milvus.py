"""Index versions in Milvus: publishing a built version, opening one to serve, listing, rollback, pruning; the one
place that imports pymilvus (the `milvus` extra).

A version built by rag/building.py (the local folder doubles as the build cache: unchanged chunks keep their
vectors) is published as three collections, written in full and validated before the alias moves:

    <name>_v<version>          one row per chunk: the Chunk (JSON), speaker and day (filters), its embedding (dense,
                               inner product) and its BM25 weights over our own jieba tokens (sparse, inner product)
    <name>_v<version>_spans    one row per candidate answer span: chunk row, offsets, embedding
    <name>_v<version>_meta     the manifest, the BM25 vocabulary, the lexicon and each article's text, as pieces of
                               JSON; a `complete` row, written last, marks the version as whole
    <name>                     an alias: the version that serves; moved in one call, so readers see old or new

rag/milvus_index.py serves one version (searches, vectors, spans, article texts).

BM25 is computed on the client, as with FAISS: a chunk's sparse vector holds its BM25 weight per term (the row of
our BM25 matrix) and a question's holds its token counts, so their inner product is our BM25 score, with our
tokenizer and the corpus's own words. (Milvus's built-in BM25 function would tokenize on the server, with idf per
segment.) Fusion happens in rag/retrieval.py from the two searches' scores, the same code as for FAISS.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import socket
import threading
from pathlib import Path

from .index import IndexFault, StoreUnreachable, load, model_problem, one_line
from .milvus_index import doc_key, literal
from .versions import rollback_target

PIECE_BYTES = 60_000  # a VARCHAR holds at most 65,535 bytes; longer JSON is stored in pieces
BATCH = 1_000  # rows per insert call
TIMEOUT = 30.0  # seconds for one call to the server
_EMPTY_TERM = 2**31  # a term no question holds: a chunk without tokens still needs a non-empty sparse vector


def _milvus_error(uri: str, e: BaseException) -> IndexFault:
    why = one_line(getattr(e, "message", None) or e)  # pymilvus's exceptions keep the server's words in .message
    return StoreUnreachable(f"Milvus at {uri} is unreachable or refused the request ({why}); start it, or point "
                            "--milvus-uri (env RAG_MILVUS_URI) at a running Milvus")


class MilvusStore:
    """The index versions under one name (alias) in one Milvus database."""

    def __init__(self, uri: str, token: str = "", db: str = "", name: str = "rag_news"):
        if not uri:
            raise IndexFault("the milvus backend needs a URI: --milvus-uri (env RAG_MILVUS_URI), e.g. "
                             "http://127.0.0.1:19530")
        if not re.fullmatch(r"(?:https?|tcp)://[^/:\s]+(?::\d+)?/?|unix:\S+|\S*\.db", uri):
            raise IndexFault(f"{uri!r} is not a Milvus URI: give --milvus-uri (env RAG_MILVUS_URI) as "
                             "http://host:19530, https://host:port, or a path ending in .db (embedded milvus-lite)")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,150}", name):
            raise IndexFault(f"Milvus collection name {name!r} must be letters, digits and underscores")
        self.uri, self.token, self.db, self.name = uri, token, db, name
        self._client = None
        self._lock = threading.Lock()
        # Complete versions whose counts were checked -> manifest. A version never changes once complete, so
        # later checks (every chat question) only see that its collections still exist: one call, not eight.
        self._intact: dict[str, dict] = {}

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                try:
                    from pymilvus import MilvusClient
                except ImportError:
                    raise IndexFault("the milvus backend needs the `milvus` extra: scripts/setup milvus "
                                     "(pip install -e '.[milvus]')") from None
                try:
                    self._client = MilvusClient(uri=self.uri, token=self.token, db_name=self.db, timeout=10)
                except Exception as e:  # pymilvus raises its own, grpc's and OS errors alike
                    raise _milvus_error(self.uri, e) from None
            return self._client

    def call(self, method: str, *args, **kwargs):
        """client.method(*args, **kwargs), every failure one IndexFault saying what to do. Made again once: after
        loading a collection found released (Milvus restarted since), or with a new connection (milvus-lite drops
        an idle client's with GOAWAY "too_many_pings", and pymilvus does not recover it)."""
        for attempt in (1, 2):
            try:
                return getattr(self.client, method)(*args, timeout=TIMEOUT, **kwargs)
            except Exception as e:  # pymilvus raises its own, grpc's and OS errors alike
                failure = e
                if attempt == 2:
                    break
                if "load()" in str(getattr(e, "message", e)) and args and isinstance(args[0], str):
                    with contextlib.suppress(Exception):
                        self.client.load_collection(args[0], timeout=TIMEOUT)
                else:
                    self._reconnect()
        raise (failure if isinstance(failure, IndexFault) else _milvus_error(self.uri, failure)) from None

    def _reconnect(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    # -- versions ---------------------------------------------------------------------------------------------

    def collection(self, version: str) -> str:
        return f"{self.name}_v{re.sub(r'[^0-9A-Za-z]', '_', version)}"

    def collections(self) -> list[str]:
        """The chunk collections of this name's versions, oldest first (names hold the build time)."""
        pattern = re.compile(rf"{re.escape(self.name)}_v[0-9A-Za-z_]+")
        names = self.call("list_collections")
        return sorted(n for n in names if pattern.fullmatch(n) and not n.endswith(("_spans", "_meta")))

    def current(self) -> str | None:
        """The collection the alias points at; None when there is no alias yet."""
        if self.name not in self.call("list_aliases").get("aliases", []):
            return None
        return self.call("describe_alias", self.name)["collection_name"]

    def manifest(self, collection: str) -> dict | None:
        """The manifest of a complete version; None when it is incomplete (a build killed or in progress)."""
        if collection in self._intact:
            return self._intact[collection]
        meta = f"{collection}_meta"
        if not self.call("has_collection", meta):
            return None
        self._loaded(meta)
        if not self.call("query", meta, filter='key == "complete"', output_fields=["key"]):
            return None
        return json.loads(self._get(meta, "manifest"))

    def problem(self, collection: str, names: list[str] | None = None) -> str | None:
        """Why a version cannot serve ("missing", "incomplete", counts differ); None when it can."""
        names = self.call("list_collections") if names is None else names
        missing = [c for c in (collection, f"{collection}_spans", f"{collection}_meta") if c not in names]
        if missing:
            self._intact.pop(collection, None)
            return f"missing (collection {missing[0]} does not exist)"
        if collection in self._intact:
            return None
        manifest = self.manifest(collection)
        if manifest is None:
            return "incomplete (its build did not finish)"
        for coll, want in ((collection, manifest["counts"]["chunks"]),
                           (f"{collection}_spans", manifest["counts"]["spans"])):
            self._loaded(coll)
            have = self.call("query", coll, filter="", output_fields=["count(*)"])[0]["count(*)"]
            if have != want:
                return f"damaged: {coll} holds {have} rows, its manifest says {want}"
        self._intact[collection] = manifest
        return None

    def list_versions(self) -> list[dict]:
        """Every version, oldest first, as rag.versions.list_versions describes a folder's."""
        names, target = self.call("list_collections"), self.current()
        out = []
        for coll in self.collections():
            problem = self.problem(coll, names)
            m = (self.manifest(coll) if problem is None or problem.startswith("damaged") else None) or {}
            counts, model = m.get("counts") or {}, m.get("model") or {}
            # An incomplete version has no manifest: its name gives the build time (versions are dashed).
            version = m.get("version") or coll[len(self.name) + 2:].replace("_", "-")
            out.append({"version": version, "built_at": m.get("built_at"),
                        "documents": counts.get("documents"), "chunks": counts.get("chunks"), "model": model.get("name"),
                        "current": coll == target, "path": f"{self.uri} {coll}", "collection": coll,
                        "status": problem or "ok", "problem": problem})
        if target is not None and not any(v["current"] for v in out):
            out.append({"version": target, "built_at": None, "documents": None, "chunks": None, "model": None,
                        "current": True, "path": f"{self.uri} {target}", "collection": target,
                        "status": "missing", "problem": "missing"})
        return out

    def choose(self, model_name: str | None = None, broken: dict[str, str] | None = None) -> tuple[str, list[str]]:
        """The collection to serve: the alias's when it can, else the newest that can, with a line saying why."""
        broken = broken or {}
        target = self.current()
        if target is None and not self.collections():
            raise IndexFault(f"no index named {self.name} in Milvus at {self.uri}; build one with "
                             "`rag build --backend milvus`")
        trouble = f"Milvus at {self.uri} has no alias {self.name}"
        if target is not None:
            problem = broken.get(target) or self.problem(target)
            if problem is None:
                wrong = model_problem(self.manifest(target), model_name)
                if wrong:
                    raise IndexFault(f"the index {target} in Milvus was {wrong}; rebuild it with "
                                     "`rag build --backend milvus`")
                return target, []
            trouble = f"the current index version {target} is {problem}"
        for coll in reversed(self.collections()):
            if coll != target and coll not in broken and self.problem(coll) is None \
                    and model_problem(self.manifest(coll), model_name) is None:
                return coll, [f"{trouble}; serving {coll} instead: run `rag build --backend milvus`, or "
                              f"`rag index rollback`"]
        raise IndexFault(f"{trouble}, and no other version in Milvus at {self.uri} is usable; run "
                         "`rag build --backend milvus`")

    def open(self, collection: str):
        problem = self.problem(collection)
        if problem is not None:
            raise IndexFault(f"the index {collection} in Milvus is {problem}; run `rag build --backend milvus`")
        from .milvus_index import MilvusIndex

        return MilvusIndex(self, collection, self.manifest(collection))

    def point_alias(self, collection: str) -> None:
        if self.current() is None:
            self.call("create_alias", collection, self.name)
        else:
            self.call("alter_alias", collection, self.name)

    def rollback(self, version: str | None = None) -> dict:
        target = rollback_target(self.list_versions(), version, f"Milvus at {self.uri}",
                                 "`rag build --backend milvus`")
        self.point_alias(target["collection"])
        return {**target, "current": True}

    def prune(self, keep: int) -> list[str]:
        """Drop versions beyond the newest `keep` intact ones (never the alias's), and incomplete ones whose build
        has ended; returns the collections dropped."""
        target, names = self.current(), self.call("list_collections")
        all_versions = self.collections()
        intact = [c for c in all_versions if self.problem(c, names) is None]
        kept = set(intact[-keep:]) | {target}
        dropped = []
        for coll in all_versions:
            if coll in kept or (coll not in intact and self._building(coll)):  # a build in progress, anywhere
                continue
            self._drop(coll, names)
            dropped.append(coll)
        return dropped

    def _drop(self, coll: str, names: list[str]) -> None:
        self._intact.pop(coll, None)
        for name in (coll, f"{coll}_spans", f"{coll}_meta"):
            if name in names:
                self.call("drop_collection", name)

    def _building(self, collection: str) -> bool:
        """Whether the build writing an incomplete version may still be running: its process is alive on this
        machine, or it started on another machine less than a day ago."""
        try:
            self._loaded(f"{collection}_meta")
            builder = json.loads(self._get(f"{collection}_meta", "builder"))
        except IndexFault:
            return False
        if builder.get("host") == socket.gethostname():
            try:
                os.kill(int(builder["pid"]), 0)
            except ProcessLookupError:
                return False
            except (PermissionError, ValueError, KeyError):
                return True
            return True
        started = dt.datetime.fromisoformat(builder.get("started", "1970-01-01T00:00:00+00:00"))
        return dt.datetime.now(dt.timezone.utc) - started < dt.timedelta(days=1)

    # -- publishing -------------------------------------------------------------------------------------------

    def publish(self, version_path: Path, keep: int, say=lambda line: None) -> str:
        """Write the local version folder `version_path` as a new version, validate it, move the alias to it and
        prune old versions. Returns the collection. A version already published is only pointed at."""
        index = load(version_path)
        coll = self.collection(index.version)
        if self.call("has_collection", coll) and self.problem(coll) is None:
            self._validate(coll, index)
            if self.current() != coll:
                self.point_alias(coll)
                say(f"Milvus: {coll} was already published; the alias {self.name} points at it now")
            return coll
        self._drop(coll, self.call("list_collections"))  # left by a build of this version that was killed
        kind = "FLAT" if index.manifest.get("dense_index", "flat") == "flat" else "HNSW"
        self._create(coll, index.manifest["model"]["dim"], kind, index.manifest["config"])
        meta = f"{coll}_meta"
        self._put(meta, "builder", json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                               "started": dt.datetime.now(dt.timezone.utc).isoformat()}))
        self._put(meta, "vocab", json.dumps(index.bm25.vocab, ensure_ascii=False))
        self._put(meta, "lexicon", json.dumps(index.tokenizer.terms, ensure_ascii=False))
        for doc_id, doc in index.documents.items():
            self._put(meta, doc_key(doc_id), json.dumps(doc, ensure_ascii=False))
        say(f"Milvus: writing {len(index.chunks)} chunks and {len(index.spans)} spans to {coll}")
        self._insert_chunks(coll, index)
        self._insert_spans(f"{coll}_spans", index)
        manifest = {**index.manifest, "milvus": {"collection": coll, "dense_index": kind, "published_at":
                                                 dt.datetime.now().astimezone().isoformat(timespec="seconds")}}
        self._put(meta, "manifest", json.dumps(manifest, ensure_ascii=False))
        for name in (coll, f"{coll}_spans", meta):
            self.call("flush", name)
        self.call("insert", meta, [{"key": "complete", "value": "1", "vec": [0.0, 0.0]}])  # written last
        self.call("flush", meta)
        try:
            self._validate(coll, index)
        except IndexFault:
            self._drop(coll, self.call("list_collections"))  # never leave a complete-looking version that fails
            raise
        self.point_alias(coll)
        say(f"Milvus: alias {self.name} -> {coll}")
        dropped = self.prune(keep)
        if dropped:
            say(f"Milvus: dropped old versions {', '.join(dropped)}")
        return coll

    def _create(self, coll: str, dim: int, kind: str, config: dict) -> None:
        """The three collections of a version; the chunks' dense index FLAT (exact) or HNSW, as FAISS's would be."""
        from pymilvus import DataType, MilvusClient

        def create(name, fields, vector, kind="FLAT", **params):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            for field, dtype, extra in fields:
                schema.add_field(field, dtype, **extra)
            index_params = self.client.prepare_index_params()
            index_params.add_index(vector, index_type=kind, metric_type="IP", params=params)
            if vector == "dense" and name == coll:
                index_params.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
            self.call("create_collection", name, schema=schema, index_params=index_params)

        create(coll, [("row", DataType.INT64, {"is_primary": True}),
                      ("speaker", DataType.VARCHAR, {"max_length": 512}),
                      ("day", DataType.VARCHAR, {"max_length": 16}),
                      ("chunk", DataType.JSON, {}),
                      ("dense", DataType.FLOAT_VECTOR, {"dim": dim}),
                      ("sparse", DataType.SPARSE_FLOAT_VECTOR, {})], "dense", kind,
               **({"M": config.get("hnsw_m", 32), "efConstruction": config.get("hnsw_ef_construction", 200)}
                  if kind == "HNSW" else {}))
        create(f"{coll}_spans", [("span", DataType.INT64, {"is_primary": True}),
                                 ("chunk_row", DataType.INT64, {}),
                                 ("start", DataType.INT64, {}),
                                 ("end", DataType.INT64, {}),
                                 ("dense", DataType.FLOAT_VECTOR, {"dim": dim})], "dense")
        create(f"{coll}_meta", [("key", DataType.VARCHAR, {"is_primary": True, "max_length": 512}),
                                ("value", DataType.VARCHAR, {"max_length": 65_535}),
                                ("vec", DataType.FLOAT_VECTOR, {"dim": 2})], "vec")

    def _insert_chunks(self, coll: str, index) -> None:
        matrix = index.bm25.matrix.tocsr()
        vectors = index.vectors(list(range(len(index.chunks))))
        for lo in range(0, len(index.chunks), BATCH):
            rows = []
            for i in range(lo, min(lo + BATCH, len(index.chunks))):
                c, row = index.chunks[i], matrix.getrow(i)
                sparse = {int(j): float(w) for j, w in zip(row.indices, row.data) if w > 0} or {_EMPTY_TERM: 1e-9}
                rows.append({"row": i, "speaker": c.speaker or "", "day": (c.date or "")[:10],
                             "chunk": c.to_json(), "dense": vectors[i].tolist(), "sparse": sparse})
            self.call("insert", coll, rows)

    def _insert_spans(self, coll: str, index) -> None:
        for lo in range(0, len(index.spans), BATCH):
            ids = list(range(lo, min(lo + BATCH, len(index.spans))))
            vectors = index.span_vectors(ids)
            self.call("insert", coll, [{"span": i, "chunk_row": int(index.spans[i][0]), "start": int(index.spans[i][1]),
                                        "end": int(index.spans[i][2]), "dense": v.tolist()}
                                       for i, v in zip(ids, vectors)])

    def _validate(self, coll: str, index) -> None:
        """Counts as in the manifest, and smoke queries that find a chunk by its own vector and its own words."""
        problem = self.problem(coll)
        if problem is not None:
            raise IndexFault(f"the new version {coll} in Milvus is {problem}; the alias was not moved")
        probe = sorted({0, len(index.chunks) // 2, len(index.chunks) - 1})
        from .milvus_index import MilvusIndex

        served = MilvusIndex(self, coll, index.manifest)
        for p, vector in zip(probe, index.vectors(probe)):
            if p not in served.nearest(vector[None, :], 10).ids.tolist():
                raise IndexFault(f"the new version {coll} in Milvus does not find chunk {p} by its own vector; "
                                 "the alias was not moved")

    def _loaded(self, name: str) -> None:
        """Collections come back released after a server restart: load before searching or querying."""
        state = self.call("get_load_state", name)
        if "Loaded" not in str(state.get("state")):
            self.call("load_collection", name)

    def _put(self, meta: str, key: str, value: str) -> None:
        pieces = _pieces(value)
        self.call("insert", meta, [{"key": f"{key}#{n:05d}", "value": piece, "vec": [0.0, 0.0]}
                                   for n, piece in enumerate(pieces)])

    def _get(self, meta: str, key: str) -> str:
        rows = self.call("query", meta, filter=f"key like {literal(key + '#%')}", output_fields=["key", "value"])
        if not rows:
            raise IndexFault(f"{meta} in Milvus lacks {key}; run `rag build --backend milvus`")
        return "".join(r["value"] for r in sorted(rows, key=lambda r: r["key"]))


def _pieces(text: str) -> list[str]:
    """`text` cut into pieces of at most PIECE_BYTES bytes of UTF-8, at character boundaries."""
    pieces, start, size = [], 0, 0
    for i, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        if size + n > PIECE_BYTES:
            pieces.append(text[start:i])
            start, size = i, 0
        size += n
    pieces.append(text[start:])
    return pieces
