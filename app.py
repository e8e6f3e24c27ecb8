"""The web chat staff use: `python app.py` is `rag serve` (the page is rag/web.py, what it shows rag/chat.py)."""

import sys

from rag.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
