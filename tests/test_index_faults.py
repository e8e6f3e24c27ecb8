"""Index faults (issue 10): a damaged, missing or read-only index never takes the chat down, and never prints a
traceback; the tools for that moment (list, rollback) work whatever state a version is in."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from rag.answering import LiveQA
from rag.building import build
from rag.config import Config
from rag.index import IndexFault, check_version, load
from rag.serving import ensure_index, stale_reasons
from rag.versions import list_versions, open_serving, rollback

from .conftest import ROOT, SEED_ID


def add_article(config: Config, name: str, text: str) -> None:
    (config.corpus_dir / f"{name}.txt").write_text(text, encoding="utf-8")


@pytest.fixture
def two(tmp_path, seed_corpus, fake_embedder):
    """An index with two good versions; the second (current) has one more article than the first."""
    config = Config(corpus_dir=seed_corpus, index_dir=tmp_path / "index", model=fake_embedder.name)
    first = build(config, fake_embedder)
    add_article(config, "reading", "读书日活动\n4月23日，图书馆举办读书日活动。馆长作了讲话。")
    second = build(config, fake_embedder)
    assert second.path != first.path
    return config, first, second


def one_line(e) -> str:
    text = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


DAMAGE = {
    "truncated dense.faiss": lambda v: os.truncate(v / "dense.faiss", 1000),  # faiss RuntimeError on read
    "removed chunks.jsonl": lambda v: (v / "chunks.jsonl").unlink(),  # FileNotFoundError
    "garbage chunks.jsonl": lambda v: (v / "chunks.jsonl").write_text("{garbage\n", encoding="utf-8"),  # JSON error
    "removed embeddings.npy": lambda v: (v / "embeddings.npy").unlink(),
    "garbage manifest.json": lambda v: (v / "manifest.json").write_text("\x00garbage{", encoding="utf-8"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_current_version_is_reported_in_one_line_and_the_newest_good_one_serves(two, fake_embedder, damage):
    config, first, second = two
    DAMAGE[damage](second.path)
    with pytest.raises(IndexFault) as e:
        load(config.index_dir)  # strict: names the version and says what to do
    assert second.path.name in one_line(e) and "rag index rollback" in str(e.value)

    index, problems = open_serving(config.index_dir, fake_embedder.name)
    assert index.version == first.manifest["version"]
    assert len(problems) == 1 and "\n" not in problems[0]
    assert second.path.name in problems[0] and "damaged" in problems[0] and f"serving {first.path.name}" in problems[0]

    # The chat answers from the good version and says why.
    said = []
    live = LiveQA(config, fake_embedder, say=said.append)
    qa = live.get()
    assert qa.index.version == first.manifest["version"] and live.problems == problems and said == problems
    assert qa.ask("读书日活动在哪里举办？").passages
    assert live.get() is qa and said == problems  # reported once, not on every question

    # The damage shows in the version list, which the operators' tab and `rag index list` read.
    versions = list_versions(config.index_dir)
    assert [(v["version"], v["current"]) for v in versions] == [(first.path.name, False), (second.path.name, True)]
    assert versions[0]["status"] == "ok" and versions[0]["problem"] is None
    assert versions[1]["status"].startswith("damaged: ") and versions[1]["problem"] == versions[1]["status"]


def test_a_version_damaged_while_serving_is_left_for_the_newest_good_one(two, fake_embedder, monkeypatch):
    import rag.index

    config, first, second = two
    live = LiveQA(config, fake_embedder, say=lambda line: None)
    qa = live.get()
    assert qa.index.version == second.manifest["version"] and live.problems == []

    # Each question checks `current`, but its checksums are computed once per version, not per question.
    hashed = []
    real_sha = rag.index._file_sha
    monkeypatch.setattr(rag.index, "_file_sha", lambda path: hashed.append(path) or real_sha(path))
    for _ in range(20):
        assert live.get() is qa
    assert hashed == []

    os.truncate(second.path / "dense.faiss", 1000)
    assert check_version(second.path) == "damaged: dense.faiss does not match its checksum"
    assert hashed  # a changed file is verified again
    moved = live.get()
    assert moved.index.version == first.manifest["version"] and second.path.name in live.problems[0]
    assert moved.ask("王继元讲了什么？").passages


def test_a_single_damaged_version_is_a_one_line_error_that_says_to_build(tmp_path, seed_corpus, fake_embedder):
    config = Config(corpus_dir=seed_corpus, index_dir=tmp_path / "index", model=fake_embedder.name)
    only = build(config, fake_embedder)
    (only.path / "chunks.jsonl").unlink()
    with pytest.raises(IndexFault, match="rag build") as e:
        open_serving(config.index_dir, fake_embedder.name)
    assert "chunks.jsonl is missing" in one_line(e)
    with pytest.raises(IndexFault, match="rag build"):
        LiveQA(config, fake_embedder).get()


def test_list_and_rollback_work_whatever_state_a_version_is_in(two, fake_embedder):
    config, first, second = two
    (second.path / "manifest.json").write_text("not json at all", encoding="utf-8")
    for _ in range(2):  # and go on working while that version is kept
        versions = list_versions(config.index_dir)
        assert [v["version"] for v in versions] == [first.path.name, second.path.name]
        broken = versions[1]
        assert broken["current"] and broken["status"].startswith("damaged: manifest.json cannot be read")
        assert broken["documents"] is None and broken["built_at"] is None and broken["model"] is None

    with pytest.raises(IndexFault) as e:
        rollback(config.index_dir, second.path.name)  # a damaged target is refused, naming the good ones
    assert "damaged" in one_line(e) and first.path.name in str(e.value)
    back = rollback(config.index_dir)  # the version before the damaged current one
    assert back["version"] == first.path.name and back["current"]
    assert load(config.index_dir).version == first.manifest["version"]
    assert [v["current"] for v in list_versions(config.index_dir)] == [True, False]

    # A damaged version between is skipped by a plain rollback too.
    add_article(config, "sports", "运动会\n学校举办春季运动会。")
    third = build(config, fake_embedder)
    assert [v["status"] == "ok" for v in list_versions(config.index_dir)] == [True, False, True]
    assert rollback(config.index_dir)["version"] == first.path.name
    with pytest.raises(IndexFault, match="no earlier intact"):
        rollback(config.index_dir)
    assert rollback(config.index_dir, third.path.name)["version"] == third.path.name


def test_current_pointing_at_a_missing_version_serves_the_newest_good_one(two, fake_embedder):
    config, first, second = two
    shutil.rmtree(second.path)
    index, problems = open_serving(config.index_dir, fake_embedder.name)
    assert index.version == first.manifest["version"]
    assert "missing" in problems[0] and "no index" not in problems[0]
    assert LiveQA(config, fake_embedder, say=lambda line: None).get().index.version == first.manifest["version"]
    versions = list_versions(config.index_dir)
    assert [(v["version"], v["current"], v["status"]) for v in versions] == [
        (first.path.name, False, "ok"), (second.path.name, True, "missing (its folder does not exist)")]
    assert stale_reasons(config, fake_embedder) == [f"the current index version {second.path.name} is missing"]
    assert rollback(config.index_dir)["version"] == first.path.name
    assert open_serving(config.index_dir, fake_embedder.name).problems == []


def test_a_no_change_rebuild_writes_nothing_and_keeps_the_good_versions(two, fake_embedder):
    config, first, second = two
    add_article(config, "sports", "运动会\n学校举办春季运动会。")
    third = build(config, fake_embedder)
    kept = list_versions(config.index_dir)
    assert [v["version"] for v in kept] == [first.path.name, second.path.name, third.path.name]
    lines = []
    for cfg in (config, config.replace(embed_batch_size=4)):  # the batch size does not change what is written
        again = build(cfg, fake_embedder, progress=lines.append)
        assert again.unchanged and again.path == third.path and again.embedded == 0
        assert again.reused == third.manifest["counts"]["chunks"] and again.manifest["version"] == third.path.name
        assert again.manifest["changes"]["unchanged"] == sorted([SEED_ID, "reading", "sports"])
        assert not any(again.manifest["changes"][k] for k in ("added", "changed", "removed"))
    assert "nothing changed" in lines[-1]
    assert list_versions(config.index_dir) == kept  # no version pushed out

    # A damaged current version is not "unchanged": the next build repairs it from the newest good version.
    os.truncate(third.path / "dense.faiss", 10)
    repaired = build(config, fake_embedder, progress=lines.append)
    assert not repaired.unchanged and repaired.path != third.path
    assert f"is damaged: dense.faiss does not match its checksum; building from {second.path.name}" in "\n".join(lines)
    assert 0 < repaired.embedded < repaired.manifest["counts"]["chunks"]  # the seed and reading day are reused
    assert load(config.index_dir).version == repaired.manifest["version"]
    # The damaged version does not count among the 3 kept: the first good one is still there to roll back to.
    assert [(v["version"], v["status"][:7]) for v in list_versions(config.index_dir)] == [
        (first.path.name, "ok"), (second.path.name, "ok"), (third.path.name, "damaged"), (repaired.path.name, "ok")]


def test_a_failed_build_leaves_nothing_new_behind(tmp_path, seed_corpus, fake_embedder, monkeypatch):
    import rag.building

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IndexFault, match="no articles"):
        build(Config(corpus_dir=empty, index_dir=tmp_path / "new-index"), fake_embedder)
    assert not (tmp_path / "new-index").exists()

    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    with pytest.raises(IndexFault, match="is a file") as e:
        build(Config(corpus_dir=seed_corpus, index_dir=tmp_path / "a-file"), fake_embedder)
    one_line(e)

    def fails(path):
        raise IndexFault(f"the dense index at {path} does not find chunks by their own vectors; run `rag build`")

    monkeypatch.setattr(rag.building, "validate", fails)  # a build that fails while writing its version
    with pytest.raises(IndexFault, match="own vectors"):
        build(Config(corpus_dir=seed_corpus, index_dir=tmp_path / "fresh"), fake_embedder)
    assert not (tmp_path / "fresh").exists()
    monkeypatch.undo()

    config = Config(corpus_dir=seed_corpus, index_dir=tmp_path / "index")
    build(config, fake_embedder)
    before = sorted(p.relative_to(config.index_dir) for p in config.index_dir.rglob("*"))
    add_article(config, "reading", "读书日活动\n图书馆举办读书日活动。")
    monkeypatch.setattr(rag.building, "validate", fails)
    with pytest.raises(IndexFault):
        build(config, fake_embedder)
    assert sorted(p.relative_to(config.index_dir) for p in config.index_dir.rglob("*")) == before


READ_ONLY_SCRIPT = """
import json, sys
from pathlib import Path
from rag.answering import LiveQA
from rag.building import build
from rag.config import Config
from rag.index import IndexFault
from rag.serving import ensure_index
from rag.versions import list_versions, rollback
from tests.conftest import FakeEmbedder

fake = FakeEmbedder()
config = Config(corpus_dir=Path(sys.argv[1]), index_dir=Path(sys.argv[2]), model=fake.name)
out = {"said": []}
out["ensured"] = repr(ensure_index(config, fake, out["said"].append))
out["served"] = LiveQA(config, fake).get().index.version
out["listed"] = [v["status"] for v in list_versions(config.index_dir)]
for name, call in (("build", lambda: build(config, fake)), ("rollback", lambda: rollback(config.index_dir))):
    try:
        call()
        out[name] = "no error"
    except IndexFault as e:
        out[name] = str(e)
print(json.dumps(out))
"""


def run_read_only(index_dir, *args) -> dict:
    """Run READ_ONLY_SCRIPT with index_dir mounted read-only (root: a private bind mount), or not writable."""
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("needs unshare(1) to mount the index read-only")
        cmd = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(index_dir),
               sys.executable, "-c", READ_ONLY_SCRIPT, *args]
    else:
        for p in [index_dir, *index_dir.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o555)
        cmd = [sys.executable, "-c", READ_ONLY_SCRIPT, *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if os.geteuid() == 0 and proc.returncode != 0 and "mount" in proc.stderr and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount read-only here: {proc.stderr.strip()}")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def test_a_read_only_index_with_a_stale_corpus_serves_what_it_has(two, fake_embedder):
    config, first, second = two
    add_article(config, "sports", "运动会\n学校举办春季运动会。")  # stale: serve would rebuild
    assert stale_reasons(config, fake_embedder)
    out = run_read_only(config.index_dir, str(config.corpus_dir), str(config.index_dir))
    assert out["ensured"] == "None" and out["served"] == second.manifest["version"]
    assert len(out["said"]) == 2 and out["said"][0].startswith("building the index: corpus changed")
    assert "not rebuilt" in out["said"][1] and f"serving version {second.path.name}" in out["said"][1]
    assert out["listed"] == ["ok", "ok"]
    for name in ("build", "rollback"):
        assert out[name].startswith(f"cannot write to {config.index_dir}"), out[name]
        assert "\n" not in out[name] and "writable" in out[name]
    assert [v["version"] for v in list_versions(config.index_dir)] == [first.path.name, second.path.name]


def test_ensure_index_repairs_a_damaged_current_version(two, fake_embedder):
    config, first, second = two
    (second.path / "chunks.jsonl").unlink()
    assert stale_reasons(config, fake_embedder) == [
        f"the current index version {second.path.name} is damaged: chunks.jsonl is missing"]
    report = ensure_index(config, fake_embedder)
    assert report is not None and not report.unchanged
    assert load(config.index_dir).version == report.manifest["version"] and stale_reasons(config, fake_embedder) == []


def test_old_versions_are_pruned_to_the_three_newest_good_ones(two, fake_embedder):
    config, first, second = two
    add_article(config, "sports", "运动会\n学校举办春季运动会。")
    third = build(config, fake_embedder)
    (second.path / "manifest.json").write_text("{", encoding="utf-8")  # damaged, and older than the newest 3 good
    add_article(config, "concert", "音乐会\n学校举办新年音乐会。")
    fourth = build(config, fake_embedder)
    add_article(config, "lecture", "讲座\n图书馆举办讲座。")
    fifth = build(config, fake_embedder)
    assert [v["version"] for v in list_versions(config.index_dir)] == [r.path.name for r in (third, fourth, fifth)]
