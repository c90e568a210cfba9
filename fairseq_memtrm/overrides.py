"""``--model-overrides`` keys the checkpoint does not have are errors, not no-ops.

fairseq applies an override to every config group that holds its key and drops a
key that none holds without a word: ``{'memory_sizee': 0}`` (a typo) evaluates with
the stored memory size, and ``{'memory_size': 1024}`` on a vanilla
``transformer_lm`` evaluates without memory. :func:`check_overrides` names such a
key, with the closest setting the checkpoint has.
"""

import difflib
from typing import Any, Dict, Set

from omegaconf import DictConfig

from fairseq_memtrm.errors import MemtrmUserError


def setting_names(cfg) -> Set[str]:
    """Every key of a checkpoint's config, at any depth (fairseq matches overrides by name)."""
    names = set()
    if isinstance(cfg, (dict, DictConfig)):
        for key in cfg.keys():
            names.add(str(key))
            try:
                names |= setting_names(cfg[key])
            except Exception:  # an unresolvable interpolation ("???") holds no nested keys
                pass
    elif cfg is not None and hasattr(cfg, "__dict__"):  # argparse Namespace (old checkpoints)
        names |= set(vars(cfg))
    return names


def check_overrides(state: Dict[str, Any], overrides: Dict[str, Any], path: str) -> None:
    """Raise :class:`MemtrmUserError` for an override key that ``state`` (a loaded
    checkpoint, with ``cfg`` or old-style ``args``) has nowhere in its config."""
    if not overrides:
        return
    known = setting_names(state.get("cfg")) | setting_names(state.get("args"))
    for key in overrides:
        if key in known:
            continue
        model = state.get("cfg", {}).get("model") if state.get("cfg") is not None else None
        arch = getattr(model, "_name", None) or getattr(model, "arch", None) or "this model"
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "check the spelling against the model's flags"
        raise MemtrmUserError(
            f"--model-overrides key {key!r} is not a setting of {path} ({arch}), so it would be ignored; {hint}"
        )
