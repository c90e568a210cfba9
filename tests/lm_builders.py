"""Build fairseq language models the way fairseq-train does, for tests."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from fairseq import options, tasks
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
PLUGIN = str(REPO / "fairseq_memtrm")
BIN = Path(sys.executable).parent  # the venv's console scripts: fairseq-train, fairseq-eval-lm, ...

TINY = [
    "--decoder-layers", "3", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
    "--decoder-attention-heads", "4", "--dropout", "0", "--attention-dropout", "0",
]
# the wiki103 layout (adaptive input + adaptive softmax, tied) at toy size
WIKI103_TINY = TINY + ["--adaptive-input-cutoff", "20,40", "--adaptive-softmax-cutoff", "20,40",
                       "--adaptive-softmax-dropout", "0", "--activation-dropout", "0"]


def write_dictionary(directory, num_symbols=60) -> Dictionary:
    """A dict.txt of ``num_symbols`` words (plus fairseq's 4 specials)."""
    dictionary = Dictionary()
    for i in range(num_symbols):
        dictionary.add_symbol(f"w{i}", n=1000 - i)
    os.makedirs(directory, exist_ok=True)
    dictionary.save(os.path.join(directory, "dict.txt"))
    return dictionary


def build_model(data_dir, arch, extra=(), seed=1):
    """(model, task) for ``--arch arch`` with fairseq's own argument parsing."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [str(data_dir), "--user-dir", PLUGIN, "--task", "language_modeling", "--arch", arch,
         "--tokens-per-sample", "64", "--cpu", *extra],
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    model = task.build_model(cfg.model)
    model.eval()
    return model, task


def build(data_dir, arch, extra=(), seed=1):
    """(cfg, task, model) as fairseq-train builds them (training mode; adam, lr 0.01)."""
    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [str(data_dir), "--user-dir", PLUGIN, "--task", "language_modeling", "--arch", arch,
         "--tokens-per-sample", "64", "--cpu", "--optimizer", "adam", "--lr", "0.01", *extra],
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    return cfg, task, task.build_model(cfg.model)


def save_checkpoint(cfg, model, path):
    """What fairseq's trainer writes, minus the optimizer state."""
    torch.save({"cfg": OmegaConf.to_container(cfg), "model": model.state_dict(), "args": None,
                "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                                       "lr_scheduler_state": {}, "num_updates": 0}],
                "extra_state": {}}, path)


def random_tokens(task, bsz, seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    nspecial = task.dictionary.nspecial
    return torch.randint(nspecial, len(task.dictionary), (bsz, seq_len), generator=g)


def run_command(*cmd, env=None, check=True, timeout=900):
    """Run ``cmd`` from the repo root (one torch thread unless ``env`` says
    otherwise); when ``check``, a failure raises with the tail of its output."""
    env = env if env is not None else {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd[:2]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
