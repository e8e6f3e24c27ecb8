"""Grounded question answering over a university's news reports: the public API.

    from rag import Config, build, load_embedder, QA
    config = Config(corpus_dir=Path("corpus"), index_dir=Path("index"))
    build(config, load_embedder(config))
    print(QA.open(config).ask("报告会在哪里举行？").answer)
"""
from .answering import QA, Answer, Citation, ExtractiveAnswerer, LiveQA
from .building import build
from .chunking import Chunk
from .config import Config
from .corpus import Article, load_corpus
from .embedding import load_embedder
from .index import Index, load
from .retrieval import Filters, Hit, Retriever

__all__ = [
    "Answer", "Article", "Chunk", "Citation", "Config", "ExtractiveAnswerer", "Filters", "Hit", "Index",
    "LiveQA", "QA", "Retriever", "build", "load", "load_corpus", "load_embedder",
]
