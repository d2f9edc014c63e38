"""Run the engine on the shipped model pair: speculative decoding of Python source.

Run:  python examples/shipped_pair.py

The target (4 layers) and the draft (1 layer) were trained on the Python standard library's
source (docs/model-pair.md).  The script completes a prompt with a few verifiers and prints the
text, the block efficiency (tokens per target pass) and the time against plain decoding.
"""

import torch

from multidraft.engine import Engine, autoregressive_generate
from multidraft.engine.pretrained import decode, encode, load_pair

torch.set_num_threads(1)
target, draft = load_pair()
prompt = encode("import os\n\n\ndef read_lines(path):\n    \"\"\"Return the lines of a text file.\"\"\"\n").tolist()
settings = dict(max_new_tokens=120, temperature=0.6, seed=0)

base = autoregressive_generate(target, [prompt], **settings)
print(f"target alone: {base.stats.tokens_per_second:.0f} tokens/s\n{decode(base.tokens[0])}\n")
for verifier, k, depth in [("single", 1, 4), ("rrs", 2, 4), ("rrs-wor", 2, 4), ("importance", 2, 4)]:
    out = Engine(target, draft, verifier=verifier, num_drafts=k, depth=depth).generate([prompt], **settings)
    s = out.stats
    print(f"--- {verifier} k={k} D={depth}: {s.block_efficiency:.2f} tokens per target pass, "
          f"{s.tokens_per_second:.0f} tokens/s ({s.tokens_per_second / base.stats.tokens_per_second:.2f}x)")
    print(decode(out.tokens[0]))
