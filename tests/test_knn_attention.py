"""KNNAugmentedAttention against fairseq's MultiheadAttention and a by-hand reference."""

import pytest
import torch
import torch.nn.functional as F
from fairseq.modules import MultiheadAttention

from fairseq_memtrm.memory import KNNMemory
from fairseq_memtrm.modules import KNNAugmentedAttention
from fairseq_memtrm.modules.knn_attention import MemoryBinding

E, H, T, B = 16, 4, 6, 2
D = E // H


def pair(gate_init=0.0, knn_k=3, memory_query="query"):
    torch.manual_seed(0)
    plain = MultiheadAttention(E, H, self_attention=True)
    knn = KNNAugmentedAttention(E, H, knn_k=knn_k, memory_gate_init=gate_init, memory_query=memory_query)
    knn.load_state_dict({**plain.state_dict(), "memory_gate": knn.memory_gate.data,
                         "memory_log_scale": knn.memory_log_scale.data,
                         "memory_param_gain": knn.memory_param_gain, "memory_position_free": knn.memory_position_free})
    return plain.eval(), knn.eval()


def causal_mask(seq_len):
    return torch.triu(torch.full((seq_len, seq_len), float("-inf")), 1)


def split_heads(x):  # (T, B, E) -> (B, H, T, D)
    return x.view(x.size(0), x.size(1), H, D).permute(1, 2, 0, 3)


def test_without_memory_it_is_plain_attention():
    plain, knn = pair()
    x = torch.randn(T, B, E)
    expected, _ = plain(x, x, x, attn_mask=causal_mask(T), need_weights=False)
    got, _ = knn(x, x, x, attn_mask=causal_mask(T), need_weights=False)
    torch.testing.assert_close(got, expected)
    with knn.bind(MemoryBinding(KNNMemory(B, H, D, memory_size=32))):  # bound but empty
        got, _ = knn(x, x, x, attn_mask=causal_mask(T), need_weights=False)
    torch.testing.assert_close(got, expected)
    assert knn.binding is None  # the binding ends with its block


def test_empty_stream_gets_local_attention_while_others_use_memory():
    plain, knn = pair(gate_init=2.0)
    memory = KNNMemory(B, H, D, memory_size=32)
    first = torch.randn(T, B, E)
    with knn.bind(MemoryBinding(memory)):
        knn(first, first, first, attn_mask=causal_mask(T), need_weights=False)  # fills both streams
    memory.reset(torch.tensor([False, True]))
    x = torch.randn(T, B, E)
    expected, _ = plain(x, x, x, attn_mask=causal_mask(T), need_weights=False)
    with knn.bind(MemoryBinding(memory)):
        got, _ = knn(x, x, x, attn_mask=causal_mask(T), need_weights=False)
    torch.testing.assert_close(got[:, 1], expected[:, 1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[:, 0], expected[:, 0], atol=1e-3)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("memory_query,shift_keys", [("query", False), ("key", False), ("key", True)])
def test_output_matches_by_hand_reference(memory_query, shift_keys, grad):
    """Top-k by brute force over everything stored, separate softmax, sigmoid gate;
    the memory queried with the token's query or its key, entries keyed by their own
    token or (shifted) by the previous one. Without gradient the logits come from the
    search's scores (the found keys are not gathered): the same output."""
    plain, knn = pair(gate_init=0.5, knn_k=4, memory_query=memory_query)
    past = torch.randn(T, B, E)
    x = torch.randn(T, B, E)
    with knn.bind(MemoryBinding(KNNMemory(B, H, D, memory_size=64, shift_keys=shift_keys))), \
            torch.set_grad_enabled(grad):
        knn(past, past, past, attn_mask=causal_mask(T), need_weights=False)
        got, _ = knn(x, x, x, attn_mask=causal_mask(T), need_weights=False)
    assert got.requires_grad == grad
    # the local attention's two paths: fused (no weights) and explicit (weights wanted)
    with knn.bind(MemoryBinding(KNNMemory(B, H, D, memory_size=64, shift_keys=shift_keys))):
        knn(past, past, past, attn_mask=causal_mask(T), need_weights=True)
        with_weights, weights = knn(x, x, x, attn_mask=causal_mask(T), need_weights=True)
    torch.testing.assert_close(with_weights, got.detach(), rtol=1e-5, atol=1e-6)
    assert weights.shape == (B, T, T) and torch.allclose(weights.sum(-1), torch.ones(B, T))
    assert (weights.triu(1) == 0).all()  # causal

    with torch.no_grad():
        local = []
        q = split_heads(knn.q_proj(x))
        k_now, v_now = split_heads(knn.k_proj(x)), split_heads(knn.v_proj(x))
        k_past = F.normalize(split_heads(knn.k_proj(past)), dim=-1)
        if shift_keys:  # entry p: key of p - 1 (the first token keys itself), value of p
            k_past = k_past[:, :, [0] + list(range(T - 1))]
        v_past = split_heads(knn.v_proj(past))
        scores_local = (q * knn.scaling) @ k_now.transpose(-1, -2) + causal_mask(T)
        local = scores_local.softmax(-1) @ v_now
        q_unit = F.normalize(q if memory_query == "query" else k_now, dim=-1)
        sims = q_unit @ k_past.transpose(-1, -2)  # (B, H, T, T_past): every stored entry
        top, index = sims.topk(4, dim=-1)
        scale = knn.memory_scale().view(1, H, 1, 1)
        weights = (top * scale).softmax(-1)
        memory_values = torch.stack(
            [torch.stack([v_past[b, h][index[b, h]] for h in range(H)]) for b in range(B)]
        )  # (B, H, T, k, D)
        memory_out = torch.einsum("bhtk,bhtkd->bhtd", weights, memory_values)
        g = torch.sigmoid(torch.tensor(0.5))
        mixed = local * (1 - g) + memory_out * g
        expected = knn.out_proj(mixed.permute(2, 0, 1, 3).reshape(T, B, E))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_retrieve_before_write_and_gradient_only_to_queries():
    _, knn = pair(gate_init=1.0)
    knn.train()
    knn.dropout_module.p = 0.0
    memory = KNNMemory(B, H, D, memory_size=64)
    x = torch.randn(T, B, E)
    with knn.bind(MemoryBinding(memory, record_retrievals=True)) as binding:
        knn(x, x, x, attn_mask=causal_mask(T), need_weights=False)
    assert binding.record is None  # first segment: nothing to retrieve
    assert memory.num_valid(0) == T  # ...but it was written
    y = torch.randn(T, B, E, requires_grad=True)
    with knn.bind(MemoryBinding(memory, record_retrievals=True)) as binding:
        out, _ = knn(y, y, y, attn_mask=causal_mask(T), need_weights=False)
    positions = binding.record.retrieval.positions
    assert positions.max() < T and positions.min() >= 0  # only the first segment, never itself
    assert memory.num_valid(0) == 2 * T
    out.sum().backward()
    assert knn.memory_gate.grad is not None and knn.memory_gate.grad.abs().sum() > 0
    assert knn.memory_log_scale.grad.abs().sum() > 0
    assert not memory.keys.requires_grad


def test_memory_scalars_move_gain_times_faster_and_old_checkpoints_keep_their_values():
    """Adam moves a parameter by ~lr per update: the gate and temperature are
    stored divided by memory_param_gain so that a short fine-tune can open a gate."""
    fast = KNNAugmentedAttention(E, H, knn_k=4, memory_gate_init=0.5, memory_scale_init=20.0, memory_param_gain=50.0)
    slow = KNNAugmentedAttention(E, H, knn_k=4, memory_gate_init=0.5, memory_scale_init=20.0, memory_param_gain=1.0)
    for module in (fast, slow):  # same effective values at init
        torch.testing.assert_close(module.gate_logits(), torch.full((H,), 0.5))
        torch.testing.assert_close(module.memory_scale(), torch.full((H,), 20.0))
    moved = []
    for module in (fast, slow):
        optimizer = torch.optim.Adam([module.memory_gate], lr=1e-3)
        for _ in range(10):
            optimizer.zero_grad()
            (-module.gate_values().sum()).backward()  # push every gate open
            optimizer.step()
        moved.append((module.gate_logits() - 0.5).mean().item())
    assert moved[1] == pytest.approx(10 * 1e-3, rel=0.05)
    assert moved[0] == pytest.approx(50 * moved[1], rel=0.05)

    # a checkpoint of the first format (no gain buffer, effective values stored) loads unchanged
    state = {k: v for k, v in slow.state_dict().items() if k != "memory_param_gain"}
    fast.upgrade_state_dict_named(state, "")
    fast.load_state_dict(state, strict=True)
    torch.testing.assert_close(fast.gate_logits(), slow.gate_logits())
    torch.testing.assert_close(fast.memory_scale(), slow.memory_scale())
    assert float(fast.memory_param_gain) == 50.0


@pytest.mark.parametrize("memory_query", ["query", "key"])
def test_position_free_keys_come_from_the_memory_input(memory_query):
    """With position_free_keys, what is written and what queries the memory are the
    projections of ``memory_input``; local attention still reads the layer's input."""
    _, knn = pair(gate_init=1.0, memory_query=memory_query)
    knn.memory_position_free.fill_(True)
    x, x_free = torch.randn(T, B, E), torch.randn(T, B, E)
    memory = KNNMemory(B, H, D, memory_size=32)
    with knn.bind(MemoryBinding(memory, memory_input=x_free, record_retrievals=True)) as binding:
        knn(x, x, x, attn_mask=causal_mask(T), need_weights=False)  # empty memory: writes only
        keys = F.normalize(split_heads(knn.k_proj(x_free)), dim=-1)
        torch.testing.assert_close(memory.keys[:, :, :T], keys)
        knn(x, x, x, attn_mask=causal_mask(T), need_weights=False)  # the same segment again
    record = binding.record.retrieval
    project = knn.k_proj if memory_query == "key" else knn.q_proj
    queries = F.normalize(split_heads(project(x_free)), dim=-1)
    expected = torch.einsum("bhtd,bhsd->bhts", queries, keys).topk(3, dim=-1)
    torch.testing.assert_close(record.scores, expected.values)
    with pytest.raises(RuntimeError, match="memory_input"), knn.bind(MemoryBinding(memory)):
        knn(x, x, x, attn_mask=causal_mask(T), need_weights=False)


def test_padded_keys_are_ignored_by_both_local_attention_paths():
    """With a key padding mask, the fused path (no weights) and the explicit one
    (weights) agree, and no real token's output depends on what the padding holds."""
    _, knn = pair(gate_init=0.5, knn_k=3)
    past, x = torch.randn(T, B, E), torch.randn(T, B, E)
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, :2] = True  # stream 1 starts with two pads, which its later tokens could see
    other = x.clone()
    other[:2, 1] = torch.randn(2, E)  # different padding content

    def run(inputs, need_weights):
        memory = KNNMemory(B, H, D, memory_size=64)
        with knn.bind(MemoryBinding(memory)):
            knn(past, past, past, attn_mask=causal_mask(T), need_weights=False)
            return knn(inputs, inputs, inputs, key_padding_mask=padding, attn_mask=causal_mask(T),
                       need_weights=need_weights)

    with torch.no_grad():
        fused, _ = run(x, False)
        explicit, weights = run(x, True)
        fused_other, _ = run(other, False)
    real = ~padding.t()  # (T, B): the rows that are tokens
    torch.testing.assert_close(fused[real], explicit[real], rtol=1e-5, atol=1e-6)
    assert (weights[1, 2:, :2] == 0).all()  # no real token attends to a pad
    torch.testing.assert_close(fused_other[real], fused[real])
