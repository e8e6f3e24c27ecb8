import json

import numpy as np
import pytest

from rag.building import build
from rag.config import Config
from rag.index import FORMAT_VERSION, IndexFault, load
from rag.lexical import Scored
from rag.retrieval import Retriever, convex, rrf
from rag.versions import build_lock

from .conftest import ROOT, SEED_ID


@pytest.fixture
def built(tmp_path, seed_corpus, fake_embedder):
    config = Config(corpus_dir=seed_corpus, index_dir=tmp_path / "index")
    report = build(config, fake_embedder)
    return config, report


def test_index_folder_is_readable_and_versioned(built):
    config, report = built
    folder = config.index_dir / "current"
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["model"] == {"name": "fake-bigrams", "dim": 64, "fingerprint": "fake-bigrams-v1"}
    assert manifest["counts"]["documents"] == 1 and manifest["counts"]["chunks"] > 10
    assert manifest["documents"][0]["doc_id"] == SEED_ID and len(manifest["documents"][0]["content_hash"]) == 64
    assert {"faiss-cpu", "jieba", "numpy"} <= set(manifest["libraries"])
    assert manifest["chunker_version"] and manifest["built_at"] and manifest["config"]["chunk_size"]
    chunks_text = (folder / "chunks.jsonl").read_text(encoding="utf-8")
    assert "王继元" in chunks_text  # readable Chinese, not \\u escapes
    lexicon = (folder / "lexicon.txt").read_text(encoding="utf-8").split()
    assert {"王继元", "慎行楼乐之厅", "识变与求变"} <= set(lexicon)


def test_round_trip_gives_same_hits(built, fake_embedder):
    config, report = built
    a = load(config.index_dir)
    b = load(report.path)
    for q in ["王继元讲了什么", "报告会在哪里举行", "照片是谁拍的"]:
        ha = Retriever(a, fake_embedder, config).search(q)
        hb = Retriever(b, fake_embedder, config).search(q)
        assert [h.chunk.chunk_id for h in ha] == [h.chunk.chunk_id for h in hb]
        assert len(ha) >= 5


def test_faiss_search_equals_numpy_brute_force(built, fake_embedder):
    config, _ = built
    index = load(config.index_dir)
    vectors = np.load(index.path / "embeddings.npy")
    queries = fake_embedder.encode_queries(["后勤工作理念", "综合考核", "图书馆转型", "学工品牌"])
    nearest = index.search_dense(queries, 10)
    assert isinstance(nearest, Scored)
    ids, scores = nearest  # the order BM25.search returns too
    brute = queries @ vectors.T
    for row in range(len(queries)):
        np.testing.assert_allclose(scores[row], np.sort(brute[row])[::-1][:10], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(brute[row][ids[row]], scores[row], rtol=1e-5, atol=1e-6)


def add_article(config, name: str, text: str = "读书日活动\n图书馆举办读书日活动。馆长作了讲话。") -> None:
    (config.corpus_dir / f"{name}.txt").write_text(text, encoding="utf-8")


def test_rebuild_reuses_vectors_of_unchanged_chunks(built, fake_embedder):
    config, first = built
    assert first.embedded == first.manifest["counts"]["chunks"] and first.reused == 0 and not first.unchanged
    add_article(config, "new")
    second = build(config, fake_embedder)
    assert second.reused == first.embedded and 0 < second.embedded < first.embedded
    assert second.path != first.path and load(config.index_dir).version == second.manifest["version"]


def test_loading_with_another_model_or_format_says_what_to_do(built):
    config, report = built
    with pytest.raises(IndexFault, match="rag build"):
        load(config.index_dir, model_name="some-other-model")
    manifest = json.loads((report.path / "manifest.json").read_text(encoding="utf-8"))
    manifest["format_version"] = 999
    (report.path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(IndexFault, match="rebuild"):
        load(config.index_dir)


def test_missing_index_and_empty_corpus_are_clear_errors(tmp_path, fake_embedder):
    with pytest.raises(IndexFault, match="rag build"):
        load(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IndexFault, match="no articles"):
        build(Config(corpus_dir=empty, index_dir=tmp_path / "idx"), fake_embedder)
    assert not (tmp_path / "idx" / "current").exists()


def test_a_failed_build_leaves_the_current_index(built, fake_embedder, tmp_path):
    config, report = built
    for f in config.corpus_dir.iterdir():
        f.unlink()
    with pytest.raises(IndexFault):
        build(config, fake_embedder)
    assert load(config.index_dir).version == report.manifest["version"]


def test_two_builds_at_once_refuse(built, fake_embedder):
    config, _ = built
    with build_lock(config.index_dir):
        with pytest.raises(IndexFault, match="another build"):
            build(config, fake_embedder)


def test_rrf_fuses_rankings():
    fused = rrf([[7, 3], [3]], [1.0, 1.0], k=60)
    assert fused[3] == pytest.approx(1 / 62 + 1 / 61) and fused[7] == pytest.approx(1 / 61)
    assert max(fused, key=fused.get) == 3
    weighted = rrf([[7, 3], [3]], [2.0, 0.01], k=60)
    assert max(weighted, key=weighted.get) == 7


def test_convex_fusion_weighs_normalised_scores():
    cos = {1: 0.90, 2: 0.80, 3: 0.85}
    bm = {1: 0.0, 2: 8.0, 3: 2.0}
    fused = convex(cos, bm, [0.8, 0.2])
    assert fused == pytest.approx({1: 0.8, 2: 0.2, 3: 0.8 * 0.5 + 0.2 * 0.25})
    # Only the ratio of the weights matters, and a retriever whose scores are all equal adds nothing.
    assert convex(cos, bm, [4.0, 1.0]) == pytest.approx(fused)
    assert convex(cos, {1: 1.0, 2: 1.0, 3: 1.0}, [0.5, 0.5]) == pytest.approx({1: 0.5, 2: 0.0, 3: 0.25})
    assert convex({}, {}, [0.8, 0.2]) == {}


def test_retriever_fusions_rank_the_chunk_both_retrievers_agree_on(built, fake_embedder):
    config, _ = built
    index = load(config.index_dir)
    target = next(c for c in index.chunks if c.kind == "speech" and len(c.text) > 60)
    for fusion in ("convex", "rrf"):
        hits = Retriever(index, fake_embedder, config.replace(fusion=fusion)).search(target.text[10:50], k=5)
        assert hits[0].chunk.chunk_id == target.chunk_id, fusion
        assert all(h.dense_score is not None for h in hits) and hits[0].bm25_score > 0
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_versions_list_and_rollback(built, fake_embedder):
    from rag.versions import list_versions, rollback

    config, first = built
    add_article(config, "new")
    second = build(config, fake_embedder)
    versions = list_versions(config.index_dir)
    assert [v["version"] for v in versions] == [first.manifest["version"], second.manifest["version"]]
    assert [v["current"] for v in versions] == [False, True] and [v["status"] for v in versions] == ["ok", "ok"]
    back = rollback(config.index_dir)
    assert back["version"] == first.manifest["version"] == load(config.index_dir).version
    with pytest.raises(IndexFault, match="no earlier"):
        rollback(config.index_dir)
    rollback(config.index_dir, second.manifest["version"])
    assert load(config.index_dir).version == second.manifest["version"]


def test_strict_build_refuses_skipped_files_and_keeps_current(built, fake_embedder):
    config, first = built
    (config.corpus_dir / "broken.txt").write_bytes(b"\x00\x01\x02binary")
    report = build(config, fake_embedder)  # lenient: skipped and named, still builds
    assert [s.path for s in report.skipped] == ["broken.txt"]
    with pytest.raises(IndexFault, match="broken.txt"):
        build(config, fake_embedder, strict=True)
    assert load(config.index_dir).version == report.manifest["version"]


# A build in a child process that stops at a named phase, says so on stdout and waits to be killed: the test
# kills it at exactly that phase on any machine (sleeping for a while would hit a different phase on each).
# The phases are the points build() passes through in rag/building.py; wrapping a name that is gone fails loudly.
KILL_SCRIPT = """
import sys
from pathlib import Path

import rag.building as building
from rag.config import Config
from tests.conftest import FakeEmbedder

corpus_dir, index_dir, stop_at = sys.argv[1:4]


def reached(phase):
    if phase == stop_at:
        print(phase, flush=True)
        sys.stdin.read()  # the test kills us here; EOF means it did not
        sys.exit(f"not killed at {phase}")


def before(phase, name):
    call = getattr(building, name)

    def wrapped(*args, **kwargs):
        reached(phase)
        return call(*args, **kwargs)

    setattr(building, name, wrapped)


def after(phase, name):
    call = getattr(building, name)

    def wrapped(*args, **kwargs):
        result = call(*args, **kwargs)
        reached(phase)
        return result

    setattr(building, name, wrapped)


class Embedder(FakeEmbedder):
    def encode_passages(self, texts, batch_size=16, progress=None):
        reached("embedding")
        return super().encode_passages(texts)


before("parsing", "load_corpus")
before("writing", "make_dense_index")  # chunks, vectors and spans are in the temporary folder; dense.faiss is not
after("written", "validate")  # the temporary folder is complete and checked, not yet renamed into versions/
before("renamed", "point_current")  # the new version is in versions/; `current` still names the old one
building.build(Config(corpus_dir=Path(corpus_dir), index_dir=Path(index_dir)), Embedder())
print("done", flush=True)
"""

KILL_PHASES = ["parsing", "embedding", "writing", "written", "renamed"]


@pytest.mark.parametrize("phase", KILL_PHASES)
def test_a_build_killed_with_sigkill_leaves_the_current_index(built, fake_embedder, phase):
    """SIGKILL at each phase of a build (parsing, embedding, writing, renaming): the old version keeps answering,
    and the next build recovers and leaves no temporary folder behind."""
    import select
    import subprocess
    import sys

    from .conftest import ROOT

    config, first = built
    (config.corpus_dir / "extra.txt").write_text("新文章\n王继元在会上作了报告。", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(config.corpus_dir), str(config.index_dir), phase],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        said = proc.stdout.readline().strip() if ready else "(nothing in 120 s)"
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup, as when the machine loses power mid-build
        proc.wait()
    with proc.stdin, proc.stdout, proc.stderr:
        assert said == phase, f"the build did not stop at {phase}; it said {said!r}\n{proc.stderr.read()[-3000:]}"
    left = sorted(p.name for p in (config.index_dir / "versions").iterdir() if p != first.path)
    if phase in ("writing", "written"):  # what the kill leaves shows that it hit the phase it names
        assert len(left) == 1 and left[0].endswith(f".tmp-{proc.pid}"), left
    else:
        assert len(left) == (phase == "renamed"), left

    index = load(config.index_dir)
    assert index.version == first.manifest["version"]  # `current` never named a half-built version
    assert Retriever(index, fake_embedder, config).search("王继元")
    report = build(config, fake_embedder)  # the next build recovers and leaves no stale temp folder
    assert load(config.index_dir).version == report.manifest["version"] != first.manifest["version"]
    assert not list((config.index_dir / "versions").glob(".*.tmp-*"))
    assert not list(config.index_dir.glob(".current.tmp-*"))


def clustered_vectors(n, dim, seed=0):
    """Unit vectors around 200 centres: closer to real embeddings than uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, dim))
    x = centres[rng.integers(0, 200, n)] + 0.5 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["hnsw", "ivf_sq8"])
def test_approximate_index_recall_at_10_against_exact(kind):
    from rag.index import make_dense_index

    config = Config()
    data = clustered_vectors(20_000, 64)
    queries = clustered_vectors(200, 64, seed=1)
    exact = make_dense_index(data, "flat", config).search(queries, 10)[1]
    approx = make_dense_index(data, kind, config).search(queries, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.95, recall


def test_auto_index_kind_follows_size_and_is_recorded(tmp_path, seed_corpus, fake_embedder):
    from rag.index import dense_index_kind

    assert dense_index_kind(Config(approx_threshold=100), 100) == "flat"
    assert dense_index_kind(Config(approx_threshold=100), 101) == "ivf_sq8"
    assert dense_index_kind(Config(approx_threshold=100, dense_index="hnsw"), 50) == "hnsw"
    config = Config(corpus_dir=seed_corpus, index_dir=tmp_path / "i", approx_threshold=5)
    report = build(config, fake_embedder)
    assert report.manifest["dense_index"] == "ivf_sq8"
    index = load(config.index_dir)
    hits = Retriever(index, fake_embedder, config).search("王继元后勤")
    assert len(hits) >= 5


def test_incremental_add_edit_delete_reembeds_only_what_changed(built, fake_embedder):
    config, first = built
    seed = next(config.corpus_dir.glob("*.txt"))
    (config.corpus_dir / "new.txt").write_text("图书馆举办读书日活动\n4月23日,图书馆举办读书日活动。馆长作了讲话。",
                                               encoding="utf-8")
    added = build(config, fake_embedder)
    assert added.manifest["changes"]["added"] == ["new"] and added.manifest["changes"]["changed"] == []
    new_chunks = [c for c in load(config.index_dir).chunks if c.doc_id == "new"]
    assert added.embedded == len(new_chunks) and added.reused == first.embedded

    (config.corpus_dir / "new.txt").write_text("图书馆举办读书日活动\n4月23日,图书馆举办读书日活动。副馆长作了讲话。",
                                               encoding="utf-8")
    edited = build(config, fake_embedder)
    assert edited.manifest["changes"]["changed"] == ["new"]
    assert 0 < edited.embedded <= len(new_chunks)
    index = load(config.index_dir)
    assert any("副馆长" in c.text for c in index.chunks) and not any(c.text.endswith("。馆长作了讲话。") for c in index.chunks)

    (config.corpus_dir / "new.txt").unlink()
    (config.corpus_dir / "copy.txt").write_bytes(seed.read_bytes())  # the same article twice: indexed once
    removed = build(config, fake_embedder)
    assert removed.manifest["changes"]["removed"] == ["new"] and removed.embedded == 0
    assert {c.doc_id for c in load(config.index_dir).chunks} == {SEED_ID}
    assert [s.path for s in removed.skipped] == ["copy.txt"]


def test_incremental_build_reuses_chunks_and_tokens_and_equals_a_full_build(built, fake_embedder, tmp_path):
    config, first = built
    assert first.manifest["counts"]["tokenized"] == first.manifest["counts"]["chunks"]
    assert first.manifest["counts"]["chunked"] == 1
    (config.corpus_dir / "new.txt").write_text(
        "图书馆举办读书日活动\n4月23日,图书馆在慎行楼举办读书日活动。李馆长在会上作《阅读与成长》主题发言。",
        encoding="utf-8")
    again = build(config, fake_embedder)
    counts = again.manifest["counts"]
    new_chunks = [c for c in load(config.index_dir).chunks if c.doc_id == "new"]
    assert len(new_chunks) <= counts["tokenized"] < counts["chunks"]
    assert counts["chunked"] == 1  # the new article; the seed's chunks come from the previous version
    (config.corpus_dir / "new.txt").write_text(
        (config.corpus_dir / "new.txt").read_text(encoding="utf-8").replace("读书日活动\n", "读书节活动\n", 1),
        encoding="utf-8")  # a new title: re-chunked, since every chunk's header carries the title
    retitled = build(config, fake_embedder)
    assert retitled.manifest["changes"]["changed"] == ["new"] and retitled.manifest["counts"]["chunked"] == 1

    fresh = config.replace(index_dir=tmp_path / "fresh")
    build(fresh, fake_embedder)
    rows = lambda cfg: (cfg.index_dir / "current" / "chunk_hashes.jsonl").read_text(encoding="utf-8")  # noqa: E731
    assert rows(config) == rows(fresh)  # same hashes and the same tokens, chunk by chunk
    for name in ("chunks.jsonl", "article_terms.jsonl", "bm25_vocab.json", "lexicon.txt"):
        assert (config.index_dir / "current" / name).read_bytes() == (fresh.index_dir / "current" / name).read_bytes()


def test_live_qa_switches_to_a_new_version_and_survives_a_bad_one(built, fake_embedder):
    from rag.answering import LiveQA

    config, first = built
    config = config.replace(model=fake_embedder.name)
    live = LiveQA(config, fake_embedder)
    old = live.get()
    assert old.index.version == first.manifest["version"] and live.get() is old
    add_article(config, "second")
    second = build(config, fake_embedder)
    new = live.get()
    assert new is not old and new.index.version == second.manifest["version"]
    add_article(config, "third", "运动会\n学校举办运动会。")
    third = build(config, fake_embedder)
    (third.path / "manifest.json").write_text("{broken", encoding="utf-8")
    assert live.get() is new  # the broken version never replaces the working one
    assert new.ask("王继元讲了什么？").passages


def test_validation_checks_checksums_and_finds_chunks_by_themselves(built):
    from rag.index import validate

    config, report = built
    assert set(report.manifest["checksums"]) >= {"chunks.jsonl", "dense.faiss", "embeddings.npy", "bm25_matrix.npz"}
    validate(report.path)
    with (report.path / "chunks.jsonl").open("a", encoding="utf-8") as fh:
        fh.write("\n")  # one byte changed: the checksum no longer matches
    with pytest.raises(IndexFault, match="checksum"):
        validate(report.path)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_sq8"])
def test_filtered_search_finds_a_rare_speakers_chunks_among_many(tmp_path, fake_embedder, kind):
    # The seed article among 30 news articles: a filter to one seed speaker must still find that speaker's chunks
    # (searched among the allowed ones, not the nearest few then filtered), by vector and by BM25 alike.
    from rag.retrieval import Filters

    from .conftest import corpus_in

    news = sorted((ROOT.parent / "shared" / "eval" / "news_corpus").glob("*.txt"))
    config = Config(corpus_dir=corpus_in(tmp_path, *news), index_dir=tmp_path / "index", dense_index=kind)
    build(config, fake_embedder)
    index = load(config.index_dir)
    filters = Filters(speakers=("王任",))
    theirs = [i for i, c in enumerate(index.chunks) if c.speaker == "王任"]
    assert 0 < len(theirs) < len(index.chunks) / 20
    query = fake_embedder.encode_queries(["学校高质量发展的报告讲了什么"])
    found = index.nearest(query, 3, filters)
    exact = np.argsort(-(index.vectors(theirs) @ query[0]), kind="stable")[:3]
    assert found.ids.tolist() == [theirs[j] for j in exact]
    tokens = index.tokenizer.tokenize("高质量发展", search=True)
    best = index.lexical(tokens, 3, filters)
    assert len(best.ids) > 0 and set(best.ids.tolist()) <= set(theirs)
    assert index.nearest(query, 3, Filters(speakers=("nobody",))).ids.tolist() == []
