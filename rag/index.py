"""One index version: its files, verifying and loading them into an Index; the one place that imports faiss.

A version folder (a folder a person can open; rag/versions.py keeps several, rag/building.py writes them):
    manifest.json           format version, config, model, chunker, libraries, documents, counts, checksums
    chunks.jsonl            one Chunk per line, readable Chinese
    documents.jsonl         one Article per line with its full text (citation offsets point here)
    dense.faiss             inner-product index over normalised embeddings
    embeddings.npy          the same vectors, reused by the next build for unchanged chunks
    chunk_hashes.jsonl      per chunk: search_text hash and BM25 tokens, reused by the next build
    article_terms.jsonl     per article: a hash of the parsed article and its lexicon words, so the next build
                            reuses its chunks (from chunks.jsonl) when it is unchanged
    bm25_*                  BM25 vocabulary, idf and weights; lexicon.txt the added jieba words
    spans.npy               candidate answer spans (chunk row, start, end: sentences, long ones cut)
    span_embeddings.npy     their embeddings (the answerer's sentence cosines); span_hashes.txt a hash of each
                            span's text, so the next build reuses them

Every file's sha256 is in the manifest. Loading verifies them (once per version folder and process, then only
while the files' sizes and mtimes stay the same: inspect_version), so a damaged version never loads.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .chunking import Chunk
from .config import Config
from .errors import RagError
from .files import sha256_file as _file_sha  # under this name so tests can count the files hashed
from .lexical import BM25, ChineseTokenizer, Scored, top_k

FORMAT_VERSION = 2  # 2: spans and their embeddings


class IndexFault(RagError):
    """An index cannot be built or loaded; the message says what to do."""


class StoreUnreachable(IndexFault):
    """The store holding the index (Milvus) does not answer now; it may again later."""


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
    _last_bm25: tuple | None = None  # (tokens, BM25 scores of every chunk): the last question's, asked twice
    _allowed: dict = field(default_factory=dict)  # Filters -> the rows they allow

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
    def vocab(self) -> dict[str, int]:
        """Every BM25 token of the corpus -> its column."""
        return self.bm25.vocab

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def vectors(self, ids: list[int]) -> np.ndarray:
        """The stored embeddings of chunks `ids` (n, dim), memory-mapped from embeddings.npy."""
        if self._vectors is None:
            self._vectors = np.load(self.path / "embeddings.npy", mmap_mode="r")
        return np.asarray(self._vectors[np.asarray(ids)])

    def nearest(self, query_vector: np.ndarray, k: int, filters=None) -> Scored:
        """The k nearest chunks to one query vector (1, dim) among those `filters` allow, best first: faiss
        searches only those (an ID selector), so a rare speaker's chunks are found however many others there are."""
        q = np.ascontiguousarray(query_vector, dtype=np.float32)
        if not filters:
            found = self.search_dense(q, k)
            keep = found.ids[0] >= 0
            return Scored(found.ids[0][keep], found.scores[0][keep])
        allowed = self.allowed(filters)
        if not len(allowed):
            return Scored(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        import faiss

        selector = faiss.IDSelectorBatch(allowed)
        kind = self.manifest.get("dense_index")
        if kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(k, self.dense.hnsw.efSearch))
        elif kind == "ivf_sq8":
            params = faiss.SearchParametersIVF(sel=selector, nprobe=self.dense.nprobe)
        else:
            params = faiss.SearchParameters(sel=selector)
        scores, ids = self.dense.search(q, min(k, len(allowed)), params=params)
        keep = ids[0] >= 0
        return Scored(ids[0][keep], scores[0][keep])

    def lexical(self, tokens: list[str], k: int, filters=None) -> Scored:
        """The k best chunks by BM25 (score > 0) among those `filters` allow, best first."""
        scores = self._bm25_scores(tokens)
        if not filters:
            top = top_k(scores, k)
        else:
            allowed = self.allowed(filters)
            top = allowed[top_k(scores[allowed], k)]
        return Scored(top, scores[top])

    def allowed(self, filters) -> np.ndarray:
        """The rows of the chunks `filters` allow (Filters.allows), kept for the last few filters asked."""
        found = self._allowed.get(filters)
        if found is None:
            found = np.array([i for i, c in enumerate(self.chunks) if filters.allows(c)], dtype=np.int64)
            if len(self._allowed) >= 32:
                self._allowed.clear()
            self._allowed[filters] = found
        return found

    def lexical_scores(self, tokens: list[str], ids: list[int]) -> np.ndarray:
        """BM25 scores of chunks `ids` for the question's tokens (0 where they share none)."""
        return self._bm25_scores(tokens)[np.asarray(ids, dtype=np.int64)]

    def _bm25_scores(self, tokens: list[str]) -> np.ndarray:
        key = tuple(tokens)
        cached = self._last_bm25
        if cached is None or cached[0] != key:
            cached = self._last_bm25 = (key, self.bm25.scores(tokens))  # one assignment: safe across threads
        return cached[1]

    def search_dense(self, query_vectors: np.ndarray, k: int) -> Scored:
        """The k nearest chunks by inner product, one row per query vector (n, k); faiss pads short rows with -1."""
        k = min(k, self.dense.ntotal)
        scores, ids = self.dense.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)
        return Scored(ids, scores)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (faiss's span several), for messages that must stay one line."""
    return " ".join(str(e).split())[:300] or type(e).__name__


def current_target(index_dir: Path) -> Path | None:
    """Where index_dir/`current` points, whether or not that folder exists; None without a `current` link.
    Here rather than in rag/versions.py because load() accepts an index folder and reads its `current`."""
    link = Path(index_dir) / "current"
    if link.is_symlink():
        return (Path(index_dir) / os.readlink(link)).resolve()
    return link.resolve() if link.exists() else None


@dataclass(frozen=True)
class Verdict:
    manifest: dict | None  # None when manifest.json cannot be read as a JSON object
    problem: str | None  # "damaged: ...", "outdated: ...", "missing: ..."; None when the version is intact


# Verified folders: path -> (the folder's stat signature, verdict). Checksumming a version reads every byte of it;
# a stat of each file is enough to know nothing changed since, so the chat can check `current` on every question.
_verified: dict[Path, tuple[tuple, Verdict]] = {}
_verified_lock = threading.Lock()


def _signature(path: Path) -> tuple:
    with os.scandir(path) as entries:
        return tuple(sorted((e.name, s.st_size, s.st_mtime_ns, s.st_ino) for e in entries for s in [e.stat()]))


def inspect_version(path: Path) -> Verdict:
    """The verdict on version folder `path`: manifest readable, format current, every file matching its checksum.
    Cached per folder until one of its files changes (size, mtime or inode)."""
    path = Path(path)
    try:
        signature = _signature(path)
    except FileNotFoundError:
        return Verdict(None, "missing (its folder does not exist)")
    except OSError as e:
        return Verdict(None, f"damaged: its folder cannot be read ({e.strerror or one_line(e)})")
    with _verified_lock:
        cached = _verified.get(path)
    if cached and cached[0] == signature:
        return cached[1]
    verdict = _verify(path)  # signature taken first: a file changed meanwhile is verified again next time
    with _verified_lock:
        _verified[path] = (signature, verdict)
    return verdict


def carry_verdict(old: Path, new: Path) -> None:
    """Version folder `old` was renamed to `new`: a rename keeps every file's size, mtime and inode, so the
    cached verdict holds."""
    with _verified_lock:
        if old in _verified:
            _verified[new] = _verified.pop(old)


def forget_verdict(path: Path) -> None:
    """Version folder `path` was removed."""
    with _verified_lock:
        _verified.pop(path, None)


def _verify(path: Path) -> Verdict:
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Verdict(None, "damaged: manifest.json is missing")
    except (OSError, ValueError) as e:
        return Verdict(None, f"damaged: manifest.json cannot be read ({one_line(e)})")
    needed = ("version", "format_version", "model", "counts", "documents", "config", "checksums")
    if not isinstance(manifest, dict) or any(k not in manifest for k in needed):
        return Verdict(None, "damaged: manifest.json lacks " + ", ".join(
            k for k in needed if not isinstance(manifest, dict) or k not in manifest))
    if not all(isinstance(manifest[k], dict) for k in ("model", "counts", "config", "checksums")):
        return Verdict(None, "damaged: manifest.json is malformed")
    if manifest["format_version"] != FORMAT_VERSION:
        return Verdict(manifest, f"outdated: format version {manifest['format_version']}, "
                                 f"this program reads {FORMAT_VERSION}")
    for name, expected in manifest["checksums"].items():
        try:
            if _file_sha(path / name) != expected:
                return Verdict(manifest, f"damaged: {name} does not match its checksum")
        except FileNotFoundError:
            return Verdict(manifest, f"damaged: {name} is missing")
        except OSError as e:
            return Verdict(manifest, f"damaged: {name} cannot be read ({e.strerror or one_line(e)})")
    return Verdict(manifest, None)


def check_version(path: Path) -> str | None:
    """Why the version folder `path` cannot serve, in one line ("damaged: dense.faiss does not match its
    checksum"); None when it is intact. Cheap after the first call while its files stay as they are."""
    return inspect_version(Path(path)).problem


def checksums(folder: Path) -> dict[str, str]:
    """The manifest's `checksums`: file name -> sha256 of every file in `folder`, by name."""
    return {f.name: _file_sha(f) for f in sorted(folder.iterdir())}


def model_problem(manifest: dict, model_name: str | None) -> str | None:
    """Why a version with this manifest cannot answer with the embedding model `model_name`; None when it can."""
    built_with = manifest["model"].get("name")
    if model_name and built_with != model_name:
        return f"built with the embedding model {built_with!r}, not {model_name!r}"
    return None


def dense_index_kind(config: Config, n: int) -> str:
    """The FAISS index type for n vectors: exact while small, approximate beyond the threshold."""
    kind = config.dense_index
    if kind == "auto":
        # IVF-SQ8 rather than HNSW: at 1M vectors both pass recall@10 >= 0.95 (0.978 vs 0.980), but IVF-SQ8
        # builds in 12 s instead of 18 min (every build writes a whole new index) and takes 0.5 GB, not 1.75.
        kind = "flat" if n <= config.approx_threshold else "ivf_sq8"
    if kind not in ("flat", "hnsw", "ivf_sq8"):
        raise IndexFault(f"unknown dense_index {kind!r}; use flat, hnsw, ivf_sq8 or auto")
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


def validate(path: Path) -> Index:
    """Load a version folder and check it: file checksums, counts, and smoke queries that must find
    a chunk by its own vector and by its own words. Raises IndexFault saying what failed."""
    index = load(path)  # verifies the manifest and every file's checksum
    probe = [0, len(index.chunks) // 2, len(index.chunks) - 1]
    ids = index.search_dense(index.vectors(probe), 10).ids
    if any(p not in row for p, row in zip(probe, ids.tolist())):
        raise IndexFault(f"the dense index at {index.path} does not find chunks by their own vectors; run `rag build`")
    for p in probe:
        found = index.bm25.search(index.tokenizer.tokenize(index.chunks[p].search_text, search=True), 10).ids
        if index.chunks[p].text.strip() and p not in found.tolist() and len(found) < 10:
            raise IndexFault(f"BM25 at {index.path} does not find chunk {p} by its own words; run `rag build`")
    return index


def load(path: Path, model_name: str | None = None) -> Index:
    """Load an index folder (a version folder, or an index dir whose `current` points to one), after verifying
    its manifest and checksums. Strict: a damaged version raises; open_serving() falls back to a good one.

    With `model_name`, refuse an index built with another embedding model. Every failure is an IndexFault
    with one line saying what to do.
    """
    path = Path(path)
    if os.path.lexists(path / "current") or (path / "versions").is_dir():
        target = current_target(path)
        if target is None:
            raise IndexFault(f"{path} has no `current` index version; run `rag index rollback` or `rag build`")
        path = target
    elif not (path / "manifest.json").exists():
        raise IndexFault(f"no index at {path}; build one with `rag build --index {path}`")
    problem = inspect_version(path).problem
    if problem is not None:
        advice = "rebuild it with `rag build`" if problem.startswith("outdated") else \
            "run `rag build` to write a good version, or `rag index rollback` (see `rag index list`)"
        raise IndexFault(f"the index at {path} is {problem}; {advice}")
    manifest = inspect_version(path).manifest
    wrong_model = model_problem(manifest, model_name)
    if wrong_model:
        raise IndexFault(f"the index at {path} was {wrong_model}; rebuild it with `rag build` or use "
                          f"--model {manifest['model'].get('name')}")
    try:
        return _read(path, manifest)
    except IndexFault:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError) as e:  # RuntimeError: faiss
        raise IndexFault(f"the index at {path} cannot be read ({one_line(e)}); run `rag build` to write a good "
                          "version, or `rag index rollback`") from None


def _read(path: Path, manifest: dict) -> Index:
    import faiss

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
        raise IndexFault(f"the index at {path} is inconsistent (counts differ from its manifest); run `rag build`")
    terms = (path / "lexicon.txt").read_text(encoding="utf-8").split()
    speakers: dict[str, str | None] = {}
    for c in chunks:
        if c.speaker and not speakers.get(c.speaker):
            speakers[c.speaker] = c.role
    spans = np.load(path / "spans.npy")
    if len(spans) != counts.get("spans", -1):
        raise IndexFault(f"the index at {path} is inconsistent (spans differ from its manifest); run `rag build`")
    # Mapped now, not on first use: a file removed later stays readable through its mapping.
    vectors = np.load(path / "embeddings.npy", mmap_mode="r")
    span_vectors = np.load(path / "span_embeddings.npy", mmap_mode="r")
    if len(vectors) != len(chunks) or len(span_vectors) != len(spans):
        raise IndexFault(f"the index at {path} is inconsistent (embeddings differ from its chunks); run `rag build`")
    return Index(path, manifest, chunks, documents, dense, BM25.load(path), ChineseTokenizer(terms), speakers, spans,
                 _vectors=vectors, _span_vectors=span_vectors)
