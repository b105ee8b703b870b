"""pid against pie inference throughput on real MultiWOZ test turns, at a given model shape.

    python scripts/multiwoz_infer_speed.py [--size base] [--limit 16] [--batch-size 8]
        [--data MULTIWOZ_FOLDER] [--tokenizer ../shared/tokenizers/t5]

A model trained on this machine is tiny, and its 32k-token LM head outweighs its encoder, which
caps pid's advantage at inference. This measures the same turns at a real shape instead: a
random-weight T5 v1.1 of `--size` (speed does not depend on the weights), saved with the T5
vocabulary and loaded through `pidec.load` as a user would (packed weights on the CPU). Every
subtask gets a budget of its gold answer's length plus EOS: the tokens a model that answers
right would write (a random model hardly ever writes EOS, so each row runs its budget). Both
layouts decode the same turns in batches of `--batch-size` turns, documents cut from the oldest
utterances to the model's 512-token input (pie: less the prompt), after one untimed batch."""

import argparse
import tempfile
import time

from pidec import checkpoint, tasks
from pidec.api import load
from pidec.bench.workloads import build_random_model
from pidec.tasks.base import data_root

p = argparse.ArgumentParser()
p.add_argument("--size", default="base")
p.add_argument("--limit", type=int, default=16)
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--data", default=None)
p.add_argument("--tokenizer", default=None, help="default: the T5 vocabulary beside the data")
a = p.parse_args()

task = tasks.get("multiwoz")
examples = task.load("test", a.data, limit=a.limit)
tok_path = a.tokenizer or str(data_root().parent / "tokenizers" / "t5")
with tempfile.TemporaryDirectory() as tmp:
    checkpoint.save(build_random_model(a.size), tmp, tokenizer=checkpoint.load_tokenizer(tok_path))
    model = load(tmp)
tok = model.tokenizer
budgets = [[len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in ex.targets] for ex in examples]
batches = [
    ([(ex.document, ex.prompts) for ex in examples[i : i + a.batch_size]], budgets[i : i + a.batch_size])
    for i in range(0, len(examples), a.batch_size)
]
print(
    f"{a.size}: {model.model.num_parameters() / 1e6:.0f}M parameters, {len(examples)} test turns, "
    f"{sum(map(sum, budgets))} answer tokens (with EOS) in all"
)
rate = {}
for layout in ("pid", "pie"):
    model.generate_batch(batches[0][0][:1], max_new_tokens=batches[0][1][:1], layout=layout, truncate="left")
    t0, out_tokens = time.perf_counter(), 0
    for docs, budget in batches:
        r = model.generate_batch(docs, max_new_tokens=budget, layout=layout, truncate="left", return_details=True)
        out_tokens += r.usage["output_tokens"]
    seconds = time.perf_counter() - t0
    rate[layout] = len(examples) / seconds
    print(f"{layout}: {seconds:.1f} s, {rate[layout]:.3f} turns/s, {out_tokens} output tokens")
print(f"pid / pie inference throughput: {rate['pid'] / rate['pie']:.2f}x")
