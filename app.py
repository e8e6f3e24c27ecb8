"""The web chat staff use: `python app.py` is `rag serve` (the page is rag/web.py, what it shows rag/chat.py)."""

import sys

from rag.cli import main
from rag.web import _feedback_or_off  # noqa: F401  still imported from here by tests/test_cli_errors.py

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
