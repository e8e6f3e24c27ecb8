"""`python -m rag` == `rag`."""
import sys

from .cli import main

sys.exit(main())
