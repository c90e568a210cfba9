"""session 10: planted-passage probe (valid) of the repeat-memory fine-tune at memory 0 and 65,536,
and of the committed vanilla, with what the memory found (diagnostics.planted_passage_loss)."""
import json, sys, time
from types import SimpleNamespace
import torch
from fairseq_memtrm.evaluation import gate_values, load, load_task, planted_probes
from fairseq_memtrm.diagnostics import planted_passage_loss

torch.set_num_threads(2)
data, out = "data-bin/books", sys.argv[1]
args = SimpleNamespace(subset="valid", probe_at=1000, probe_gap=30000, probe_length=40, probe_passages="random,text")
task = load_task(data, "valid", 512, 4, True)
probes = planted_probes(task, args)
rows = []
for name, ckpt, size in [("repeat-memory", "checkpoints/books/repeat-memory/checkpoint_last.pt", 65536),
                         ("repeat-memory", "checkpoints/books/repeat-memory/checkpoint_last.pt", 0),
                         ("vanilla", "demo/assets/books/vanilla.pt", None)]:
    model, _ = load(ckpt, data, "valid", 512, 4, {"memory_size": size} if size is not None else {}, True)
    print(name, size, "gates", json.dumps(gate_values(model)), flush=True)
    for kind, documents in probes.items():
        start = time.time()
        found = planted_passage_loss(model, documents, 1000, 30000, 40, 512)
        row = dict(run=name, memory_size=size or 0, passage=kind, documents=documents.size(0),
                   seconds=round(time.time() - start), **{k: round(v, 4) for k, v in found.items()})
        print(json.dumps(row), flush=True)
        rows.append(row)
json.dump(rows, open(out, "w"), indent=1)
