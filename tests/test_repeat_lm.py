"""The repeat_lm curriculum (repeated spans in training blocks) and the copy-score
diagnostic that motivates it (scripts/copy_score.py)."""

import math

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from lm_builders import BIN, PLUGIN, run_command

from fairseq_memtrm.diagnostics import copy_score
from fairseq_memtrm.tasks.repeat_lm import RepeatSpanDataset


class Blocks(torch.utils.data.Dataset):
    """Items as TokenBlockDataset(include_targets=True) gives them: source = target shifted right."""

    def __init__(self, count=50, length=40):
        self.items = []
        for i in range(count):
            target = torch.arange(100 * i + 1, 100 * i + 1 + length)
            self.items.append((torch.cat([torch.tensor([2]), target[:-1]]), target, None))
        self.sizes = [length] * count

    def __getitem__(self, index):
        return self.items[index]

    def __len__(self):
        return len(self.items)


def test_a_repeated_span_copies_an_earlier_one_and_source_follows_target():
    blocks = Blocks()
    data = RepeatSpanDataset(blocks, prob=1.0, min_len=4, max_len=10, seed=3)
    for index in range(len(blocks)):
        source, target, _ = data[index]
        original = blocks[index][1]
        start, copy_start, span = data.span(index, len(target))
        assert 4 <= span <= 10 and start + span <= copy_start and copy_start + span <= len(target)
        assert torch.equal(target[copy_start : copy_start + span], original[start : start + span])
        changed = (target != original).nonzero().flatten()
        assert changed.min() >= copy_start and changed.max() < copy_start + span  # nothing else moves
        assert source[0] == 2 and torch.equal(source[1:], target[:-1])
        assert torch.equal(blocks[index][1], original)  # the wrapped dataset is not modified
        assert torch.equal(data[index][1], target)  # deterministic
    spans_1 = [data.span(i, 40) for i in range(len(blocks))]
    data.set_epoch(2)
    assert [data.span(i, 40) for i in range(len(blocks))] != spans_1  # new spans each epoch


@pytest.mark.parametrize("prob", [0.0, 0.3])
def test_the_probability_is_the_share_of_changed_blocks(prob):
    data = RepeatSpanDataset(Blocks(count=400), prob=prob, min_len=4, max_len=10, seed=1)
    changed = sum(data.span(i, 40) is not None for i in range(400))
    assert changed == 0 if prob == 0 else abs(changed / 400 - prob) < 0.07


def setup_task(data_bin, *extra):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(data_bin), "--user-dir", PLUGIN, "--arch", "transformer_lm",
                                                "--tokens-per-sample", "64", "--cpu", *extra])
    return tasks.setup_task(convert_namespace_to_omegaconf(args).task)


def test_only_the_train_split_is_augmented(prepared_data_bin):
    plain = setup_task(prepared_data_bin, "--task", "language_modeling")
    augmented = setup_task(prepared_data_bin, "--task", "repeat_lm", "--repeat-prob", "1.0")
    for split in ("train", "valid"):
        plain.load_dataset(split)
        augmented.load_dataset(split)
    same = [torch.equal(plain.datasets["valid"][i]["target"], augmented.datasets["valid"][i]["target"])
            for i in range(len(plain.datasets["valid"]))]
    assert all(same)
    differ = [not torch.equal(plain.datasets["train"][i]["target"], augmented.datasets["train"][i]["target"])
              for i in range(len(plain.datasets["train"]))]
    assert sum(differ) > 0.8 * len(differ)  # a span copied over an equal span changes nothing


def test_bad_repeat_options_are_clear_errors(prepared_data_bin):
    result = run_command(BIN / "fairseq-train", prepared_data_bin, "--user-dir", PLUGIN, "--task", "repeat_lm",
                         "--arch", "transformer_lm", "--repeat-min-len", "50", "--repeat-max-len", "10",
                         "--batch-size", "2", "--cpu", "--max-update", "1", check=False)
    assert result.returncode != 0 and "need 2 <= min <= max" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


class Copier(torch.nn.Module):
    """Predicts token t+1 as the token one span back (a perfect copier), else uniform."""

    def __init__(self, vocab, span):
        super().__init__()
        self.vocab, self.span = vocab, span

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for t in range(tokens.size(1) - 1):
            if t + 1 - self.span >= 0:
                logits[torch.arange(tokens.size(0)), t, tokens[:, t + 1 - self.span]] = 50.0
        return (logits,)


def test_copy_score_separates_a_copier_from_a_model_that_does_not_copy():
    passages = torch.randint(4, 30, (3, 12))
    copier = copy_score(Copier(30, 12), passages)
    assert copier["second_copy_loss"] < 1e-3
    assert copier["first_copy_loss"] == pytest.approx(math.log(30), rel=1e-4)
    uniform = copy_score(lambda tokens: (torch.zeros(*tokens.shape, 30),), passages)
    assert uniform["copy_gain"] == pytest.approx(0.0, abs=1e-6)


def test_copy_score_cli_names_a_missing_checkpoint(prepared_data_bin, tmp_path):
    result = run_command(BIN / "python", "scripts/copy_score.py", tmp_path / "none.pt", prepared_data_bin, check=False)
    assert result.returncode != 0 and "no file" in result.stderr and "Traceback" not in result.stderr
