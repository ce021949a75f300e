"""Cross-run comparison reports (the paper's Figure 3, Figure 4a and Table 4): see compare.py."""
from .compare import compare, load_run, main, write_comparison

__all__ = ["compare", "load_run", "main", "write_comparison"]
