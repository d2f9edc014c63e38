"""Speculative decoding with a Hugging Face transformers model pair, and the comparison report
on it.

Run:  python examples/transformers_pair.py [OUT_DIR]

No weights can be downloaded here, so the example builds a tiny Llama target and a smaller
draft from configs (random weights, a character-level tokenizer), saves them as ordinary local
model directories and then uses them exactly as you would use your own:

    multidraft generate --target DIR --draft DIR ...
    multidraft compare --hf-target DIR --hf-draft DIR --prompts-file prompts.txt

With random weights the acceptance means little; the point is the wiring.  With real models
(same tokenizer for both), pass their directories instead.
"""

import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from multidraft.engine import Engine, HFModel
from multidraft.reports import CompareConfig, run_report, write_report

CHARS = "abcdefghijklmnopqrstuvwxyz .,:()_=\n"


def build_pair(root: Path) -> tuple[Path, Path]:
    vocab = {c: i for i, c in enumerate(CHARS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=" ")
    dirs = []
    for name, layers, width in [("target", 4, 128), ("draft", 1, 64)]:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(CHARS), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        model = LlamaForCausalLM(config).eval()
        path = root / name
        model.save_pretrained(path)
        fast.save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]


def main(out_dir: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="multidraft-hf-"))
    target_dir, draft_dir = build_pair(root)
    target, draft = HFModel.from_pretrained(str(target_dir)), HFModel.from_pretrained(str(draft_dir))

    prompt = [[CHARS.index(c) for c in "def main():"]]
    out = Engine(target, draft, verifier="rrs-wor", num_drafts=2, depth=3).generate(prompt, 24, temperature=1.0, seed=0)
    print("generated:", repr("".join(CHARS[t] for t in out.tokens[0].tolist())))
    print(f"block efficiency {out.stats.block_efficiency:.2f} tokens per target pass")

    prompts = root / "prompts.txt"
    prompts.write_text("def add(a, b):\n" "class point:\n" "for item in items:\n" "print(value)\n")
    config = CompareConfig(pair="hf", hf_target=str(target_dir), hf_draft=str(draft_dir), prompts_file=str(prompts),
                           families=[], verifiers=["rrs", "rrs-wor", "spechub", "importance"], ks=[1, 2], temperatures=[1.0],
                           tree_shapes=[(2, 1), (2, 3)], engine_prompts=4, engine_new_tokens=12, costs=False, out_dir=out_dir)
    report = run_report(config)
    print((write_report(config, report) / "report.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "multidraft-hf-report")
