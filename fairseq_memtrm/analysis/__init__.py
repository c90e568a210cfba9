"""Analysis of what a memory model retrieved and what it gained, shared by the
demo (``demo/report.py``) and the scripts (``scripts/eval_memory_sweep.py``).

* ``retrieval``: per-head retrievals merged into per-token entries, and whether
  an entry holds the token its query predicts;
* ``gains``: the token types whose loss the memory lowered most.
"""

from .gains import TokenTypeGain, gains_by_token_type  # noqa: F401
from .retrieval import entries_hold_token, merge_heads  # noqa: F401
