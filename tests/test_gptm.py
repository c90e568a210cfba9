"""gptm_lm: the memory matrix is written and read as docs/gptm.md says, per stream,
document and split; the gradient follows it through --gptm-bptt-segments writes and
no further; an empty memory (and a fresh fine-tune of a vanilla) is the vanilla;
fairseq-train -> fairseq-eval-lm runs on real documents."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from fairseq.modules import MultiheadAttention

from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.memory.matrix_memory import MatrixMemory, count_sketch
from fairseq_memtrm.modules.slot_attention import SlotAttention, SlotBinding
from lm_builders import BIN, build, build_model, random_tokens, run_command, save_checkpoint, write_dictionary

torch.set_num_threads(1)
SHAPE = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-input-dim", "32", "--decoder-output-dim", "32",
         "--decoder-ffn-embed-dim", "64",
         "--decoder-attention-heads", "4", "--dropout", "0", "--attention-dropout", "0"]
MEMORY = ["--gptm-slots", "16", "--gptm-sketch-size", "4", "--gptm-layers", "0,1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dict")
    write_dictionary(path)
    return path


def gptm(data_dir, extra=(), seed=1):
    return build_model(data_dir, "gptm_lm_tiny", SHAPE + MEMORY + list(extra), seed=seed)


def open_gates(model, value=0.5):
    for attention in model.memory_attentions():
        attention.memory_gate.data.fill_(value / float(attention.memory_param_gain))


def segments(task, count, bsz=2, seq_len=12, seed=0):
    return [random_tokens(task, bsz, seq_len, seed=seed + i) for i in range(count)]


def test_count_sketch_has_one_sign_per_column():
    sketch = count_sketch(8, 100, seed=3)
    assert sketch.shape == (8, 100)
    assert torch.equal(sketch.abs().sum(dim=0), torch.ones(100))
    assert set(sketch.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(sketch, count_sketch(8, 100, seed=3))


def test_one_write_and_one_read_equal_the_formulas(data_dir):
    model, task = gptm(data_dir)
    open_gates(model)
    first, second = segments(task, 2)
    pad = task.dictionary.pad()
    first[1, 9:] = pad  # row 1 ends early: its summary is its last real token's
    start, go_on = torch.tensor([True, True]), torch.tensor([False, False])
    with torch.no_grad():
        features = model.decoder(first, features_only=True)[0]  # an empty memory reads nothing
        _, extra = model(first, doc_start=start, stream_id="s")
        c = F.normalize(torch.stack([features[0, 11], features[1, 8]]), dim=-1)
        addresses = model.gptm_addresses
        expected = torch.stack([torch.sigmoid(0.5 * (addresses @ c[b]))[:, None] * c[b][None, :] for b in range(2)])
        assert torch.allclose(extra["memory_matrix"], expected, atol=1e-6)
        assert torch.allclose(model.memory_bank.memories("s")[0].matrix, expected, atol=1e-6)
        assert extra["memory_slots"] is None

        logits, extra = model(second, doc_start=go_on, stream_id="s")
        rows = torch.einsum("sm,bmf->bsf", count_sketch(4, 16), expected)
        slots = rows / rows.norm(dim=-1, keepdim=True) * 32 ** 0.5
        assert torch.allclose(extra["memory_slots"], slots, atol=1e-5)
        # the slots reach the layers: the stock decoder with them bound gives the same logits
        binding = SlotBinding(slots, torch.ones(2, dtype=torch.bool))
        with model.memory_attentions()[0].bind(binding), model.memory_attentions()[1].bind(binding):
            features = model.decoder(second, features_only=True)[0]
        assert torch.allclose(logits, model.decoder.output_layer(features), atol=1e-6)
        assert not torch.allclose(logits, model.decoder(second)[0], atol=1e-3)  # the read changed them
        # and the second write: M + sigmoid(0.5 (M + A) c) c^T
        c = F.normalize(features[:, -1], dim=-1)
        match = torch.einsum("bmf,bf->bm", expected, c) + c @ addresses.t()
        assert torch.allclose(extra["memory_matrix"], expected + torch.sigmoid(0.5 * match)[..., None] * c[:, None],
                              atol=1e-5)


def test_slot_attention_adds_the_gated_slot_read_to_fairseqs_attention():
    torch.manual_seed(0)
    layer = SlotAttention(16, 2, memory_param_gain=10.0)
    plain = MultiheadAttention(16, 2, self_attention=True)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k not in ("memory_gate", "memory_param_gain")})
    layer.memory_gate.data = torch.tensor([0.03, -0.05])  # effective gates tanh(0.3), tanh(-0.5)
    x, slots = torch.randn(5, 3, 16), torch.randn(3, 4, 16)  # T=5, B=3, s=4
    active = torch.tensor([True, False, True])
    with layer.bind(SlotBinding(slots, active)):
        out = layer(x, x, x, need_weights=False)[0]
    local = plain(x, x, x, need_weights=False)[0]
    q = (x @ layer.q_proj.weight.t() + layer.q_proj.bias).view(5, 3, 2, 8) * 8 ** -0.5
    k = (slots @ layer.k_proj.weight.t() + layer.k_proj.bias).view(3, 4, 2, 8)
    v = (slots @ layer.v_proj.weight.t() + layer.v_proj.bias).view(3, 4, 2, 8)
    probs = torch.softmax(torch.einsum("tbhd,bshd->bhts", q, k), dim=-1)
    read = torch.einsum("bhts,bshd->tbhd", probs, v)
    gate = torch.tanh(torch.tensor([0.3, -0.5])).view(1, 1, 2, 1) * active.float().view(1, 3, 1, 1)
    expected = local + (gate * read).reshape(5, 3, 16) @ layer.out_proj.weight.t()
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(out[:, 1], local[:, 1])  # an inactive row is fairseq's attention


def test_reset_clears_only_the_named_streams():
    memory = MatrixMemory(3, 4, 5, torch.device("cpu"))
    memory.matrix, memory.written = torch.randn(3, 4, 5), torch.ones(3, dtype=torch.bool)
    kept = memory.matrix[1].clone()
    memory.reset(torch.tensor([True, False, True]))
    assert memory.matrix[0].abs().sum() == 0 and memory.matrix[2].abs().sum() == 0
    assert torch.equal(memory.matrix[1], kept)
    assert memory.written.tolist() == [False, True, False]
    memory.reset(None)
    assert memory.matrix.abs().sum() == 0 and not memory.written.any()


def test_state_never_crosses_documents_streams_or_splits(data_dir):
    model, task = gptm(data_dir)
    open_gates(model)
    vanilla = model.decoder  # with nothing bound, the stock decoder
    segs = segments(task, 3)
    start, go_on = torch.tensor([True, True]), torch.tensor([False, False])
    with torch.no_grad():
        outputs = [model(segs[0], doc_start=start, stream_id="train")[0],
                   model(segs[1], doc_start=go_on, stream_id="train")[0]]
        assert not torch.allclose(outputs[1], vanilla(segs[1])[0])  # the memory is read
        train_state = model.memory_bank.memories("train")[0].matrix.clone()

        # splits: a new stream set starts empty, and leaves the training one alone
        assert torch.equal(model(segs[1], doc_start=go_on, stream_id="valid")[0], vanilla(segs[1])[0])
        assert torch.equal(model.memory_bank.memories("train")[0].matrix, train_state)

        # documents: row 0 starts a new one and reads nothing; row 1 still reads its own
        logits = model(segs[2], doc_start=torch.tensor([True, False]), stream_id="train")[0]
        assert torch.equal(logits[0], vanilla(segs[2])[0][0])
        assert not torch.allclose(logits[1], vanilla(segs[2])[0][1])

        # streams: another row 1 changes nothing of row 0
        other = [s.clone() for s in segs]
        for s in other:
            s[1] = s[1].flip(0)
        model.memory_bank.clear()
        mine = [model(s, doc_start=d, stream_id="a")[0] for s, d in zip(segs, [start, go_on, go_on])]
        theirs = [model(s, doc_start=d, stream_id="b")[0] for s, d in zip(other, [start, go_on, go_on])]
        for a, b in zip(mine, theirs):
            assert torch.equal(a[0], b[0])
        assert not torch.allclose(mine[2][1], theirs[2][1])
        assert torch.equal(model.memory_bank.memories("a")[0].matrix[0], model.memory_bank.memories("b")[0].matrix[0])


@pytest.mark.parametrize("bptt", [0, 1, 2])
def test_gradient_reaches_the_writes_in_the_bptt_window_and_not_beyond(data_dir, bptt):
    """Three segments of disjoint token ids: after the third's backward, the embeddings
    of an earlier segment's tokens have a gradient only if that segment's write is
    within the window (no shared input/output embedding: only inputs reach them)."""
    _, task, model = build(data_dir, "gptm_lm_tiny", SHAPE + MEMORY + ["--gptm-bptt-segments", str(bptt)])
    open_gates(model)
    model.train()
    nspecial = task.dictionary.nspecial
    segs = [torch.arange(nspecial + 10 * i, nspecial + 10 * i + 10).repeat(2, 1) for i in range(3)]
    doc_start = [torch.tensor([True, True]), torch.tensor([False, False]), torch.tensor([False, False])]
    for seg, start in zip(segs, doc_start):
        model.zero_grad()
        logits = model(seg, doc_start=start, stream_id="train")[0]
        logits.logsumexp(-1).sum().backward()  # each batch's graph is freed, as in fairseq's trainer
    grad = model.decoder.embed_tokens.weight.grad
    reached = [bool(grad[seg[0]].abs().sum() > 0) for seg in segs]
    assert reached == [bptt >= 2, bptt >= 1, True]

    # the replay recomputes what evaluation carries: same logits in both modes
    model.eval()
    model.memory_bank.clear()
    with torch.no_grad():
        evaluated = [model(s, doc_start=d, stream_id="train")[0] for s, d in zip(segs, doc_start)]
    model.train()
    model.memory_bank.clear()
    trained = [model(s, doc_start=d, stream_id="train")[0].detach() for s, d in zip(segs, doc_start)]
    for a, b in zip(evaluated, trained):
        assert torch.allclose(a, b, atol=1e-5)


def test_empty_memory_and_a_fresh_finetune_give_the_vanillas_logits(data_dir, tmp_path):
    cfg, _, vanilla = build(data_dir, "transformer_lm", SHAPE)
    vanilla.eval()
    model, task = gptm(data_dir, seed=5)
    model.load_state_dict(vanilla.state_dict(), strict=True)  # what --finetune-from-model does
    assert all(float(a.gate_values().abs().max()) == 0 for a in model.memory_attentions())
    segs = segments(task, 3)
    starts = [torch.tensor([True, True]), torch.tensor([False, False]), torch.tensor([False, False])]
    with torch.no_grad():
        for seg, start in zip(segs, starts):  # gate 0: every segment is the vanilla's
            assert torch.equal(model(seg, doc_start=start, stream_id="x")[0], vanilla(seg)[0])
        open_gates(model)
        for index, (seg, start) in enumerate(zip(segs, starts)):  # open gate: only an empty memory is
            same = torch.equal(model(seg, doc_start=start, stream_id="y")[0], vanilla(seg)[0])
            assert same == (index == 0)

    # a vanilla of another shape: one sentence naming the fix
    _, _, deeper = build(data_dir, "transformer_lm", SHAPE + ["--decoder-layers", "3"])
    with pytest.raises(MemtrmUserError, match="--decoder-layers"):
        model.load_state_dict(deeper.state_dict(), strict=True)


@pytest.mark.parametrize("flag, value, message", [
    ("--gptm-slots", "0", "--gptm-slots must be >= 1"),
    ("--gptm-sketch-size", "32", "--gptm-sketch-size must be between 1 and --gptm-slots"),
    ("--gptm-bptt-segments", "-1", "--gptm-bptt-segments must be >= 0"),
    ("--gptm-decay", "0", "--gptm-decay must be in"),
    ("--gptm-layers", "7", "--memory-layers"),
    ("--memory-param-gain", "0", "--memory-param-gain must be positive, got 0.0"),
])
def test_bad_flags_get_one_sentence(data_dir, flag, value, message):
    with pytest.raises(MemtrmUserError, match=re.escape(message)):
        gptm(data_dir, [flag, value])


# ------------------------------------------------------------- CLI chain
def eval_lm(data, checkpoint):
    result = run_command(BIN / "fairseq-eval-lm", data, "--user-dir", "fairseq_memtrm", "--task", "document_lm",
                         "--path", checkpoint, "--gen-subset", "test", "--tokens-per-sample", "64",
                         "--batch-size", "2", "--cpu")
    match = re.search(r"Evaluated ([\d,]+) tokens.*Perplexity: (\d+\.\d+)", result.stdout + result.stderr, re.S)
    assert match, (result.stdout + result.stderr)[-3000:]
    return int(match.group(1).replace(",", "")), float(match.group(2))


def test_fairseq_train_then_eval_lm_on_real_documents(prepared_data_bin, tmp_path):
    save = tmp_path / "gptm"
    train = run_command(BIN / "fairseq-train", prepared_data_bin, "--user-dir", "fairseq_memtrm",
                        "--task", "document_lm", "--arch", "gptm_lm_tiny", "--gptm-slots", "64",
                        "--gptm-sketch-size", "8", "--tokens-per-sample", "64", "--batch-size", "2",
                        "--optimizer", "adam", "--lr", "1e-3", "--max-update", "3", "--validate-interval-updates",
                        "2", "--save-dir", save, "--no-epoch-checkpoints", "--cpu", "--log-format", "simple")
    log = train.stdout + train.stderr
    assert "GPTm memory for stream set 'train'" in log and "GPTm memory for stream set 'valid'" in log
    state = torch.load(save / "checkpoint_last.pt", weights_only=False, map_location="cpu")
    assert state["model"]["gptm_sketch"].shape == (8, 64)
    expected = json.loads((prepared_data_bin / "stats.json").read_text())["test"]["tokens"]
    tokens, ppl = eval_lm(prepared_data_bin, save / "checkpoint_last.pt")
    assert tokens == expected and 1 < ppl < 1e4

    bad = run_command(BIN / "fairseq-train", prepared_data_bin, "--user-dir", "fairseq_memtrm", "--task",
                      "document_lm", "--arch", "gptm_lm_tiny", "--gptm-slots", "0", "--batch-size", "2", "--cpu",
                      check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == "fairseq-memtrm: error: --gptm-slots must be >= 1, got 0"


def test_finetune_gptm_sh_from_a_vanilla_then_the_sweep(prepared_data_bin, tmp_path):
    env = {"TOKENS_PER_SAMPLE": "64", "BATCH_SIZE": "2", "MAX_UPDATE": "2", "COPY_UPDATES": "0"}
    import os
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BIN": str(BIN), **env}
    run_command("bash", "scripts/train_vanilla.sh", prepared_data_bin, tmp_path / "vanilla", env=env)
    vanilla = tmp_path / "vanilla" / "checkpoint_last.pt"
    run_command("bash", "scripts/finetune_gptm.sh", prepared_data_bin, vanilla, tmp_path / "gptm",
                env={**env, "GPTM_SLOTS": "128", "SKETCH_SIZE": "16", "MEMORY_PARAM_GAIN": "300"})
    checkpoint = tmp_path / "gptm" / "checkpoint_last.pt"
    state = torch.load(checkpoint, weights_only=False, map_location="cpu")
    assert state["cfg"]["model"]["_name"] == "gptm_lm" and state["model"]["gptm_addresses"].shape == (128, 256)
    assert state["cfg"]["model"]["memory_param_gain"] == 300  # MEMORY_PARAM_GAIN reaches every fine-tune
    assert state["model"]["decoder.layers.3.self_attn.memory_param_gain"].item() == 300
    run_command(BIN / "python", "scripts/eval_memory_sweep.py", prepared_data_bin, "--gptm-checkpoint", checkpoint, "--vanilla-checkpoint", vanilla,
                "--tokens-per-sample", "64", "--batch-size", "2", "--probe-gap", "200", "--probe-at", "20",
                "--probe-length", "10", "--out", tmp_path / "sweep", "--cpu", "--log-format", "none", env=env)
    report = json.loads((tmp_path / "sweep" / "memory_sweep.json").read_text())
    row = next(r for r in report["runs"] if r["name"] == "gptm")
    assert row["memory_size"] == 128 and row["memory_mb_per_stream"] == round(128 * 256 * 4 / 2**20, 2)
    assert "planted_passage" in row and set(row["gates"]) == {"3"}  # 3/4 of 6 layers
    assert report["gptm_gains_between"] == "vanilla vs gptm" and report["gptm_gains"]
