"""Run the engine on the shipped model pair: speculative decoding of Python source.

Run:  python examples/shipped_pair.py

The target (4 layers) and the draft (1 layer) were trained on the Python standard library's
source (docs/model-pair.md).  The script completes a prompt with a few verifiers and tree shapes
-- drafted sequences, a branching tree (SpecHub's binary tree) and staged drafting with a byte
bigram as the second draft -- and prints the text, the block efficiency (tokens per target pass)
and the time against plain decoding.
"""

import torch

from multidraft.engine import Engine, autoregressive_generate
from multidraft.engine.pretrained import decode, encode, load_ngram, load_pair

torch.set_num_threads(1)
target, draft = load_pair()
prompt = encode("import os\n\n\ndef read_lines(path):\n    \"\"\"Return the lines of a text file.\"\"\"\n").tolist()
settings = dict(max_new_tokens=120, temperature=0.6, seed=0)

base = autoregressive_generate(target, [prompt], **settings)
print(f"target alone: {base.stats.tokens_per_second:.0f} tokens/s\n{decode(base.tokens[0])}\n")
bigram = load_ngram(2)  # the second-stage draft, counted on the pair's training files
shapes = [("single", dict(num_drafts=1, depth=4)), ("rrs", dict(num_drafts=2, depth=4)),
          ("rrs-wor", dict(num_drafts=2, depth=4)), ("importance", dict(num_drafts=2, depth=4)),
          ("spechub", dict(widths=(2, 2, 2))), ("rrs", dict(num_drafts=2, depth=4, draft2=bigram))]
for verifier, shape in shapes:
    out = Engine(target, draft, verifier=verifier, **shape).generate([prompt], **settings)
    s = out.stats
    label = ", ".join(f"{key}={'bigram' if key == 'draft2' else value}" for key, value in shape.items())
    print(f"--- {verifier} ({label}): {s.block_efficiency:.2f} tokens per target pass, "
          f"{s.tokens_per_second:.0f} tokens/s ({s.tokens_per_second / base.stats.tokens_per_second:.2f}x)")
    print(decode(out.tokens[0]))
