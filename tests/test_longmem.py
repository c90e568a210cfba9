"""longmem_sidenet_lm: the frozen backbone writes the memory and never changes,
the SideNet computes the LongMem recurrence, its checkpoint holds only the side
weights yet fairseq-eval-lm loads it, and chunked retrieval equals brute force."""

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.memory import KNNMemory, MemoryBank
from fairseq_memtrm.memory.chunked_memory import ChunkedKNNMemory
from fairseq_memtrm.modules.knn_attention import KNNAugmentedAttention, MemoryBinding
from fairseq_memtrm.modules.side_network import side_layer_spans
from lm_builders import TINY, build, random_tokens, save_checkpoint, write_dictionary

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRE_NORM = ["--decoder-normalize-before"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dict")
    write_dictionary(path)
    return path


@pytest.fixture(scope="module")
def backbones(data_dir, tmp_path_factory):
    """{name: path} of tiny 4-layer transformer_lm checkpoints: post-norm (fairseq's
    default, the experiment's shape), pre-norm (final layer norm), and a post-norm
    one with other weights."""
    folder = tmp_path_factory.mktemp("backbones")
    paths = {}
    for name, extra, seed in [("post", [], 1), ("pre", PRE_NORM, 1), ("other", [], 7)]:
        cfg, _, model = build(data_dir, "transformer_lm", TINY + ["--decoder-layers", "4", *extra], seed=seed)
        paths[name] = folder / f"{name}.pt"
        save_checkpoint(cfg, model, paths[name])
    return paths


def side_model(data_dir, backbone, extra=(), seed=2):
    return build(data_dir, "longmem_sidenet_lm_tiny",
                 ["--backbone-checkpoint", str(backbone), "--dropout", "0", "--memory-size", "256", *extra],
                 seed=seed)


def test_side_layers_cover_the_backbone_in_even_spans():
    assert side_layer_spans(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert side_layer_spans(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for backbone, side in [(5, 2), (12, 5), (24, 12)]:
        spans = side_layer_spans(backbone, side)
        assert spans[0][0] == 0 and spans[-1][1] == backbone
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_empty_memory_gives_the_side_layers_without_memory_and_writes_the_backbone_keys(data_dir, backbones, norm):
    """Reference: fairseq's own backbone and plain decoder layers holding the side
    weights, combined by the LongMem recurrence by hand."""
    cfg, task, model = side_model(data_dir, backbones[norm], ["--memory-gate-init", "3"])
    model.eval()
    decoder = model.decoder
    assert decoder.spans == [(0, 2), (2, 4)] and decoder.memory_layer_id == 0
    assert decoder.memory_source_layer == 1  # the backbone layer side layer 0 starts from
    _, _, backbone = build(data_dir, "transformer_lm", TINY + ["--decoder-layers", "4"]
                           + (PRE_NORM if norm == "pre" else []), seed=5)
    backbone.load_state_dict(torch.load(backbones[norm], weights_only=False)["model"])
    backbone.eval()
    plain_layers = []
    for layer in decoder.layers:
        plain = TransformerDecoderLayerBase(decoder.backbone.decoder.cfg, no_encoder_attn=True).eval()
        state = {k: v for k, v in layer.state_dict().items() if "memory_" not in k}
        plain.load_state_dict(state, strict=True)
        plain_layers.append(plain)

    tokens = random_tokens(task, 2, 16)
    tokens[1, -3:] = task.dictionary.pad()
    with torch.no_grad():
        _, extra = backbone.decoder(tokens, features_only=True, return_all_hiddens=True)
        states = extra["inner_states"]
        x = states[0]
        mask = backbone.decoder.buffered_future_mask(x)
        for plain, (start, end) in zip(plain_layers, [(0, 2), (2, 4)]):
            x = plain(x, self_attn_mask=mask, self_attn_padding_mask=tokens.eq(task.dictionary.pad()))[0]
            x = x + states[end] - states[start]
        if norm == "pre":
            x = decoder.layer_norm(x)
        x = x.transpose(0, 1)
        if backbone.decoder.project_out_dim is not None:  # TINY's 32 dims -> transformer_lm's output dim
            x = backbone.decoder.project_out_dim(x)
        expected = backbone.decoder.output_layer(x)

        got = model(tokens, doc_start=torch.tensor([True, True]), stream_id="test")[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

        # the memory now holds the backbone's layer-1 keys and values of the real tokens
        source = backbone.decoder.layers[1]
        attention_input = source.self_attn_layer_norm(states[1]) if norm == "pre" else states[1]
        keys = source.self_attn.k_proj(attention_input).view(16, 2, 4, 8).permute(1, 2, 0, 3)
        values = source.self_attn.v_proj(attention_input).view(16, 2, 4, 8).permute(1, 2, 0, 3)
        memory = model.memory_bank.memories("test")[0]
        assert memory.written.tolist() == [16, 13]
        torch.testing.assert_close(memory.keys[0, :, :16], F.normalize(keys[0], dim=-1))
        torch.testing.assert_close(memory.values[1, :, :13], values[1, :, :13])

        # the next segment reads that memory: the output moves away from the no-memory reference
        again = model(tokens, doc_start=torch.tensor([False, False]), stream_id="test")[0]
    assert not torch.allclose(again, expected, atol=1e-3)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_residual_gate_blends_each_side_step_into_the_backbone(data_dir, backbones, norm):
    """--side-residual-gate-init: x_{i+1} = h[end] + g_i (layer_i(x_i) - h[start]) by hand; a
    closed gate gives the backbone's own logits, and the gate learns (a gradient, stored / gain)."""
    cfg, task, model = side_model(data_dir, backbones[norm], ["--side-residual-gate-init", "-1.5",
                                                               "--memory-param-gain", "10"])
    model.eval()
    decoder = model.decoder
    assert decoder.residual_gate.tolist() == pytest.approx([-0.15, -0.15])  # moves 10x faster than stored
    with torch.no_grad():
        decoder.residual_gate.copy_(torch.tensor([-0.1, 0.2]))  # g = sigmoid(-1), sigmoid(2)
    gates = torch.sigmoid(torch.tensor([-1.0, 2.0]))
    torch.testing.assert_close(decoder.residual_gates(), gates)
    tokens = random_tokens(task, 2, 16)
    with torch.no_grad():
        states = decoder.backbone.hidden_states(tokens)
        x = states[0]
        mask = decoder.backbone.decoder.buffered_future_mask(x)
        for layer, gate, (start, end) in zip(decoder.layers, gates, decoder.spans):
            y = layer(x, self_attn_mask=mask, self_attn_padding_mask=None)[0]  # memory unbound: local only
            x = states[end] + gate * (y - states[start])
        expected = decoder.output_layer(decoder.extract_features(tokens)[0])
        by_hand = x if decoder.layer_norm is None else decoder.layer_norm(x)
        by_hand = by_hand.transpose(0, 1)
        if decoder.backbone.decoder.project_out_dim is not None:
            by_hand = decoder.backbone.decoder.project_out_dim(by_hand)
        torch.testing.assert_close(decoder.output_layer(by_hand), expected, rtol=1e-5, atol=1e-5)

        decoder.residual_gate.fill_(-4.0)  # g = sigmoid(-40): the backbone itself
        closed = model(tokens, doc_start=torch.tensor([True, True]), stream_id="test")[0]
        backbone_logits = decoder.backbone.decoder(tokens)[0]
    torch.testing.assert_close(closed, backbone_logits, rtol=1e-5, atol=1e-5)
    model.train()
    with torch.no_grad():
        decoder.residual_gate.fill_(0.0)
    loss = model(tokens, doc_start=torch.tensor([True, True]), stream_id="grad")[0].logsumexp(-1).mean()
    loss.backward()
    assert decoder.residual_gate.grad is not None and decoder.residual_gate.grad.abs().min() > 0


def test_a_side_net_without_residual_gate_has_none(data_dir, backbones):
    _, _, model = side_model(data_dir, backbones["post"])
    assert model.decoder.residual_gate is None and model.decoder.residual_gates() is None
    assert not any("residual_gate" in key for key in model.state_dict())


def test_backbone_never_changes_through_fairseq_trainer_steps(data_dir, backbones):
    from fairseq.trainer import Trainer

    cfg, task, model = side_model(data_dir, backbones["post"], ["--dropout", "0.1"])
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    backbone = model.decoder.backbone
    before_backbone = {k: v.clone() for k, v in backbone.live_state_dict("").items()}
    before_side = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = random_tokens(task, 2, 33, seed=3)
    for step in range(3):
        source, target = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        sample = {"id": torch.arange(2), "nsentences": 2, "ntokens": target.numel(), "target": target,
                  "net_input": {"src_tokens": source, "src_lengths": torch.full((2,), 32),
                                "doc_start": torch.tensor([step == 0] * 2), "stream_id": "train"}}
        trainer.train_step([sample])
        assert model.training and not backbone.training  # dropout never touches the memory keys
    after_backbone = backbone.live_state_dict("")
    assert all(torch.equal(before_backbone[k], after_backbone[k]) for k in before_backbone)
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before_side[k])]
    assert any(k.startswith("decoder.layers.0.") for k in changed) and "decoder.layers.0.self_attn.memory_gate" in changed
    # the optimizer holds exactly the SideNet's parameters
    optimized = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    assert optimized == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert optimized < sum(p.numel() for p in backbone.parameters())


def test_checkpoint_holds_the_side_only_and_reloads_the_recorded_backbone(data_dir, backbones, tmp_path):
    cfg, task, model = side_model(data_dir, backbones["post"])
    state = model.state_dict()
    assert not any(k.startswith("decoder.backbone.") for k in state)
    assert os.path.isabs(cfg.model.backbone_checkpoint)
    moved = tmp_path / "moved.pt"
    shutil.copy(backbones["post"], moved)
    cfg.model.backbone_checkpoint = str(moved)  # as --model-overrides would
    fresh = task.build_model(cfg.model)
    fresh.load_state_dict(copy.deepcopy(state), strict=True, model_cfg=cfg.model)
    tokens = random_tokens(task, 2, 12)
    with torch.no_grad():
        for m in (model, fresh):
            m.eval()
        expected = model(tokens, doc_start=torch.tensor([True, True]), stream_id="a")[0]
        torch.testing.assert_close(fresh(tokens, doc_start=torch.tensor([True, True]), stream_id="a")[0], expected)
    # the live backbone keeps its final layer norm and weights after fairseq's upgrade pass
    assert fresh.decoder.backbone.decoder.layers[0].self_attn.k_proj.weight.requires_grad is False

    # the same SideNet on a backbone with other weights is refused
    cfg.model.backbone_checkpoint = str(backbones["other"])
    other = task.build_model(cfg.model)
    with pytest.raises(MemtrmUserError, match="other weights"):
        other.load_state_dict(copy.deepcopy(state), strict=True, model_cfg=cfg.model)


def test_bad_inputs_get_clear_errors(data_dir, backbones, tmp_path):
    with pytest.raises(MemtrmUserError, match="--backbone-checkpoint"):
        build(data_dir, "longmem_sidenet_lm_tiny")
    with pytest.raises(MemtrmUserError, match="not found.*model-overrides"):
        side_model(data_dir, tmp_path / "gone.pt")
    with pytest.raises(MemtrmUserError, match="--side-layers must be between 1 and the backbone's 4"):
        side_model(data_dir, backbones["post"], ["--side-layers", "5"])
    with pytest.raises(MemtrmUserError, match="multiple of --memory-chunk-size"):
        side_model(data_dir, backbones["post"], ["--memory-chunk-size", "3"])
    with pytest.raises(MemtrmUserError, match="--memory-source-layer"):
        side_model(data_dir, backbones["post"], ["--memory-source-layer", "4"])
    # a memorizing checkpoint is not a plain transformer_lm
    cfg, _, memorizing = build(data_dir, "memorizing_transformer_lm", TINY + ["--memory-size", "64"])
    save_checkpoint(cfg, memorizing, tmp_path / "memorizing.pt")
    with pytest.raises(MemtrmUserError, match="plain transformer_lm"):
        side_model(data_dir, tmp_path / "memorizing.pt")
    # a data-bin with another dictionary
    other_dict = tmp_path / "other-dict"
    write_dictionary(other_dict, num_symbols=90)
    with pytest.raises(MemtrmUserError, match="dictionary mismatch.*dict.txt"):
        side_model(other_dict, backbones["post"])


def test_side_attention_that_does_not_write_leaves_the_memory_alone():
    attention = KNNAugmentedAttention(16, 2, knn_k=4)
    memory = KNNMemory(1, 2, 8, 32)
    x = torch.randn(5, 1, 16)
    with attention.bind(MemoryBinding(memory, write=False)):
        attention(x, x, x)
    assert memory.is_empty()
    with attention.bind(MemoryBinding(memory)):
        attention(x, x, x)
    assert memory.num_valid(0) == 5


def brute_force_chunks(history, query, c, kc, memory_size, written):
    """Positions of the tokens of the kc chunks (still fully in a ring of
    memory_size) whose mean key scores best against query (H, D)."""
    complete = written // c
    first_live = max(0, complete - memory_size // c)
    means = torch.stack([history[:, j * c:(j + 1) * c].mean(dim=1) for j in range(first_live, complete)], dim=1)
    best = torch.einsum("hd,hnd->hn", query, means).topk(min(kc, means.size(1)), dim=-1).indices + first_live
    return best  # (H, kc) chunk indices


@pytest.mark.parametrize("memory_size", [64, 16])
def test_chunked_retrieval_equals_brute_force(memory_size):
    torch.manual_seed(0)
    c, heads, dim, k = 4, 2, 8, 8
    memory = ChunkedKNNMemory(2, heads, dim, memory_size, c)
    history = torch.randn(heads, 60, dim)
    written = 0
    for length in (7, 13, 5, 10):  # segments that end mid-chunk
        keys = history[:, written:written + length].unsqueeze(0).expand(2, -1, -1, -1).clone()
        mask = torch.ones(2, length, dtype=torch.bool)
        mask[1] = False  # stream 1 reads only padding: never searchable
        memory.add(keys, keys * 2, mask)
        written += length
    assert memory.written.tolist() == [35, 0]
    queries = torch.randn(2, heads, 3, dim)
    retrieval = memory.search(queries, k)
    assert retrieval.keys.shape == (2, heads, 3, k, dim)
    assert not retrieval.mask[1].any()
    for h in range(heads):
        for t in range(3):
            chunks = brute_force_chunks(history, queries[0, :, t], c, k // c, memory_size, written)[h]
            expected = sorted(p for j in chunks.tolist() for p in range(j * c, (j + 1) * c)
                              if p >= written - memory_size)  # tokens the ring still holds
            got = retrieval.positions[0, h, t][retrieval.mask[0, h, t]]
            assert sorted(got.tolist()) == expected
            torch.testing.assert_close(retrieval.keys[0, h, t][retrieval.mask[0, h, t]], history[h, got])
            torch.testing.assert_close(retrieval.values[0, h, t][retrieval.mask[0, h, t]], 2 * history[h, got])
            torch.testing.assert_close(retrieval.scores[0, h, t][retrieval.mask[0, h, t]],
                                       history[h, got] @ queries[0, h, t])
    memory.reset(torch.tensor([True, False]))
    assert memory.is_empty() and not memory.search(queries, k).mask.any()


def test_bank_builds_chunked_memories_that_the_knn_layer_reads():
    bank = MemoryBank({0: (2, 8)}, memory_size=64, dtype="fp32", backend="exact", chunk_size=4)
    plain = MemoryBank({0: (2, 8)}, memory_size=64, dtype="fp32", backend="exact")
    assert bank.bytes_per_stream() > plain.bytes_per_stream()  # the chunk ring comes on top
    memory = bank.select("s", 1, None, torch.device("cpu"))[0]
    assert isinstance(memory, ChunkedKNNMemory)
    attention = KNNAugmentedAttention(16, 2, knn_k=8, memory_gate_init=5.0).eval()
    x = torch.randn(6, 1, 16)
    with attention.bind(MemoryBinding(memory)):
        plain_out = attention(x, x, x)[0]  # 6 tokens: one complete chunk written
    with attention.bind(MemoryBinding(memory, record_retrievals=True)) as binding:
        out = attention(x, x, x)[0]
    record = binding.record
    # k = 8 asks for 2 chunks of 4; the memory holds one: no wider than what it can return
    assert record.retrieval.positions.shape[-1] == 4
    assert set(record.retrieval.positions[record.retrieval.mask].tolist()) == {0, 1, 2, 3}
    assert not torch.allclose(out, plain_out, atol=1e-4)
    with pytest.raises(MemtrmUserError, match="multiple of --memory-chunk-size"):
        MemoryBank({0: (2, 8)}, memory_size=30, dtype="fp32", backend="exact", chunk_size=4)


# ------------------------------------------------------------- CLI chain
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "BIN": str(BIN), "TOKENS_PER_SAMPLE": "64", "BATCH_SIZE": "2",
       "MAX_UPDATE": "2", "COPY_UPDATES": "0"}  # the vanilla in one plain phase


def run(*cmd, env=ENV, check=True):
    result = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd[:2]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def eval_lm(data, checkpoint, *extra):
    result = run(BIN / "fairseq-eval-lm", data, "--user-dir", "fairseq_memtrm", "--task", "document_lm",
                 "--path", checkpoint, "--gen-subset", "test", "--tokens-per-sample", "64", "--batch-size", "2",
                 "--cpu", *extra, check=False)
    log = result.stdout + result.stderr
    match = re.search(r"Evaluated ([\d,]+) tokens.*Perplexity: (\d+\.\d+)", log, re.S)
    return result.returncode, log, (int(match.group(1).replace(",", "")), float(match.group(2))) if match else None


@pytest.fixture(scope="module")
def vanilla_checkpoint(prepared_data_bin, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vanilla")
    run("bash", "scripts/train_vanilla.sh", prepared_data_bin, folder)
    return folder / "checkpoint_last.pt"


def test_longmem_checkpoint_trains_and_evaluates_with_fairseq_eval_lm(prepared_data_bin, vanilla_checkpoint, tmp_path):
    """train_vanilla.sh -> finetune_longmem.sh -> fairseq-eval-lm, then the backbone moves."""
    import json

    backbone = tmp_path / "backbone.pt"
    shutil.copy(vanilla_checkpoint, backbone)
    train = run("bash", "scripts/finetune_longmem.sh", prepared_data_bin, backbone, tmp_path / "longmem",
                env={**ENV, "MEMORY_SIZE": "512", "CHUNK_SIZE": "4", "MEMORY_PARAM_GAIN": "300"})
    assert "num. trained:" in train.stdout + train.stderr
    side = tmp_path / "longmem" / "checkpoint_last.pt"
    state = torch.load(side, weights_only=False, map_location="cpu")
    assert state["cfg"]["model"]["memory_param_gain"] == 300  # MEMORY_PARAM_GAIN reaches every fine-tune
    assert not any(k.startswith("decoder.backbone.") for k in state["model"])
    assert state["cfg"]["model"]["backbone_checkpoint"] == str(backbone.resolve())

    expected_tokens = json.loads((prepared_data_bin / "stats.json").read_text())["test"]["tokens"]
    rc, log, scored = eval_lm(prepared_data_bin, side)
    assert rc == 0 and scored, log[-3000:]
    tokens, ppl = scored
    assert tokens == expected_tokens and 1 < ppl < 1e4

    moved = tmp_path / "elsewhere.pt"
    backbone.rename(moved)
    rc, log, _ = eval_lm(prepared_data_bin, side)
    assert rc != 0 and "Traceback" not in log
    assert "not found" in log and "--model-overrides" in log
    rc, log, scored = eval_lm(prepared_data_bin, side, "--model-overrides", f"{{'backbone_checkpoint': '{moved}'}}")
    assert rc == 0 and scored == (tokens, ppl), log[-3000:]


def test_staleness_is_zero_for_longmem_and_not_for_memorizing(prepared_data_bin, vanilla_checkpoint, tmp_path):
    """scripts/measure_staleness.py: stored keys vs the final weights' keys."""
    import json

    common = [prepared_data_bin, "--user-dir", "fairseq_memtrm", "--task", "document_lm", "--memory-size", "512",
              "--tokens-per-sample", "64", "--batch-size", "2", "--optimizer", "adam", "--lr", "0.01",
              "--max-update", "4", "--disable-validation", "--cpu", "--log-format", "none"]
    shape = ["--decoder-layers", "6", "--decoder-embed-dim", "256", "--decoder-input-dim", "256",
             "--decoder-output-dim", "256", "--decoder-ffn-embed-dim", "1024", "--decoder-attention-heads", "4",
             "--share-decoder-input-output-embed"]
    results = {}
    for name, model in [("longmem", ["--arch", "longmem_sidenet_lm", "--backbone-checkpoint", vanilla_checkpoint,
                                     "--dropout", "0.1", "--memory-chunk-size", "4"]),
                        ("memorizing", ["--arch", "memorizing_transformer_lm", *shape, "--dropout", "0",
                                        "--finetune-from-model", vanilla_checkpoint])]:
        run(BIN / "python", "scripts/measure_staleness.py", "--out", tmp_path / f"{name}.json", "--", *common, *model)
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    longmem, memorizing = results["longmem"], results["memorizing"]
    assert longmem["updates"] == memorizing["updates"] == 4
    assert longmem["entries"] > 1000 and memorizing["entries"] > 1000
    assert min(row["min_cosine"] for row in longmem["by_age"]) > 0.9999  # the frozen backbone never drifts
    assert memorizing["mean_cosine"] < 0.999  # no dropout: only the updated weights move the keys
