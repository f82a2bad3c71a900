#!/usr/bin/env python3
"""transformers' perplexity of a checkpoint on a text, scored in the sliding windows `epic eval` uses
(worker/quality_metrics.h): windows of --window tokens advancing by --stride, each token from position 1
on scored once (with --stride below --window), from the logits of the position before it, with the
context its window gives. The
reference for `epic eval`'s perplexity (BENCHMARKS.md's quality table must agree to 1e-3 relative).

The checkpoint may lack experts or have a router with fewer rows than experts (as the trained model in
configs/models/qwen3-moe-python-small): they are put back as zeros and masked out of routing with -inf
router logits (make_golden.py's mask_router), which is how epic routes around them. --top-k runs
transformers' router with fewer experts per token (its top-k changed, nothing else), the reference of
`epic eval --top-k`.

    python3 tests/golden/transformers_perplexity.py --model DIR --tokenizer tokenizer.json \
        --text-file heldout.txt --window 256 --stride 128 --max-tokens 4096 --top-k 8,4 --out ppl.json
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import mask_router  # noqa: E402
from train_small_moe import full_model_from_saved  # noqa: E402


def sliding_windows(num_tokens, window, stride):
    """(begin, end, first_target) as epic's sliding_windows."""
    windows, scored_until, begin = [], 1, 0
    while scored_until < num_tokens:
        end = min(begin + window, num_tokens)
        windows.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        begin += stride
    return windows


def masked_experts(model_dir):
    """Per layer the experts the checkpoint lacks, and the router rows it cut off, from its index and
    shard headers (no hard-coded list: any checkpoint edited this way)."""
    from safetensors import safe_open
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    experts = config.get("num_experts") or config["num_local_experts"]
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    masked = {}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp."
        gate = prefix + "gate.weight"
        if gate not in weight_map:
            continue
        with safe_open(os.path.join(model_dir, weight_map[gate]), framework="pt") as shard:
            rows = shard.get_slice(gate).get_shape()[0]
        gone = [e for e in range(experts)
                if e >= rows or f"{prefix}experts.{e}.gate_proj.weight" not in weight_map]
        if gone:
            masked[layer] = gone
    return masked


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", required=True, help="the model's tokenizer.json")
    parser.add_argument("--text-file", required=True)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--stride", type=int)
    parser.add_argument("--max-tokens", type=int, default=0)
    parser.add_argument("--top-k", default="", help="experts per token to score, e.g. 8,4 (default: trained)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from tokenizers import Tokenizer
    stride = args.stride or max(1, args.window // 2)
    with open(args.text_file, encoding="utf-8") as f:
        text = f.read()
    ids = Tokenizer.from_file(args.tokenizer).encode(text, add_special_tokens=False).ids
    if args.max_tokens > 0:
        ids = ids[: args.max_tokens]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = full_model_from_saved(args.model, torch.float32).to(device).eval()
    masked = masked_experts(args.model)
    trained = model.config.num_experts_per_tok
    top_ks = [int(k) for k in args.top_k.split(",") if k] or [trained]
    windows = sliding_windows(len(ids), args.window, stride)
    results = []
    for top_k in top_ks:
        for layer in model.model.layers:
            layer.mlp.gate.top_k = top_k
        for layer, experts in masked.items():
            mask_router(model.model.layers[layer].mlp.gate, experts)
        start = time.time()
        nll, scored = 0.0, 0
        with torch.no_grad():
            for begin, end, first_target in windows:
                x = torch.tensor([ids[begin:end]], device=device)
                logits = model(input_ids=x).logits[0].double()
                log_probs = torch.log_softmax(logits, dim=-1)
                rows = torch.arange(first_target - 1 - begin, end - 1 - begin, device=device)
                targets = torch.tensor(ids[first_target:end], device=device)
                nll -= log_probs[rows, targets].sum().item()
                scored += end - first_target
        results.append({"experts_per_token": top_k, "perplexity": math.exp(nll / scored), "mean_nll": nll / scored,
                        "scored_tokens": scored, "seconds": time.time() - start})
        print(json.dumps(results[-1]), flush=True)
    out = {"model": os.path.basename(os.path.normpath(args.model)), "text_file": os.path.basename(args.text_file),
           "tokens": len(ids), "first_ids": ids[:16], "window": args.window, "stride": stride,
           "windows": len(windows), "masked_experts": {str(k): v for k, v in masked.items()},
           "dtype": "float32", "device": device, "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "results": results,
           "command": " ".join(["python3", "tests/golden/transformers_perplexity.py"] + sys.argv[1:])}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
