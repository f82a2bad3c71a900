#!/usr/bin/env python3
"""Trains the project's small Qwen3-MoE on Python's own standard library sources, and writes its
checkpoint (transformers' save_pretrained, bf16), a held-out text, and golden logits from
transformers for epic to match.

Run on the GPU machine (torch + transformers; the corpus is that machine's Python standard library,
PSF license), from the repository root, with the real Qwen3 tokenizer.json:
    python3 tests/golden/train_small_moe.py --tokenizer PATH/tokenizer.json --out OUT --seconds 330

The model (TRAINED below): 8 layers, hidden 96, 32 experts top-8 (moe_intermediate 64), the Qwen3
vocabulary (151,936 rows) with tied embeddings, so the bf16 checkpoint stays near 39 MB. Two layers
have uneven expert counts, as a pruned model has, and are trained that way from the start (their
router logits masked): layer 2 lacks experts 7, 19 and 30 (their router rows stay: missing experts),
layer 5 has a router of 24 rows (experts 24-31 removed: a pruned router). The saved shards are then
edited like make_golden.py's missing/pruned cases. Files in OUT:
    model/                       the checkpoint (epic loads it with the Qwen3 tokenizer.json beside it)
    heldout.txt                  held-out source files (never trained on), for perplexity
    golden/golden.json, logits_*.npy, bf16_reference.json   as make_golden.py writes them
    training.json                corpus, split, steps, tokens, losses, held-out perplexity, versions
"""
import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time

import torch
import transformers
from tokenizers import Tokenizer
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import (edit_saved_checkpoint, golden_prompt, mask_router,  # noqa: E402
                         write_bf16_reference)

TRAINED = dict(
    vocab_size=151936, hidden_size=96, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
    head_dim=24, intermediate_size=192, moe_intermediate_size=64, num_experts=32, num_experts_per_tok=8,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, max_position_embeddings=2048, hidden_act="silu", attention_bias=False,
    output_router_logits=True, router_aux_loss_coef=0.01, bos_token_id=151643, eos_token_id=151643,
)
MISSING = {2: [7, 19, 30]}
PRUNED = {5: 24}
END_OF_TEXT = 151643
GOLDEN_PROMPT_LENGTHS = [1, 3, 6]
GOLDEN_NEW_TOKENS = 5


def corpus_files():
    """The standard library's .py files (no test suites, no site-packages), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("test", "tests", "site-packages", "dist-packages",
                                                            "idle_test", "__pycache__"))
        files += [os.path.join(directory, n) for n in sorted(names) if n.endswith(".py")]
    return root, files


def held_out(path):
    """About 1 file in 20, chosen by a hash of its path inside the library (stable across runs)."""
    return int(hashlib.sha256(path.encode()).hexdigest(), 16) % 20 == 0


def masked_layers():
    masked = {layer: list(experts) for layer, experts in MISSING.items()}
    for layer, rows in PRUNED.items():
        masked[layer] = list(range(rows, TRAINED["num_experts"]))
    return masked


def full_model_from_saved(model_dir, dtype):
    """The saved checkpoint as a full Qwen3MoeForCausalLM: the removed experts and router rows put back
    as zeros (they are masked, never chosen), loaded by transformers' own from_pretrained, so the
    buffers (rotary inv_freq) are computed fresh in float32 as for any loaded model, never a bf16 copy."""
    import shutil
    import tempfile
    from safetensors.torch import load_file, save_file
    config = Qwen3MoeConfig.from_pretrained(model_dir)
    staging = tempfile.mkdtemp()
    try:
        for name in os.listdir(model_dir):
            if name.endswith(".json"):
                shutil.copy(os.path.join(model_dir, name), staging)
        with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
            index = json.load(f)
        weight_map = dict(index["weight_map"])
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_file(os.path.join(model_dir, shard)))
        experts = getattr(config, "num_experts", None) or config.num_local_experts
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}.mlp."
            gate = tensors[prefix + "gate.weight"]
            if gate.shape[0] < experts:
                padded = torch.zeros((experts, gate.shape[1]), dtype=gate.dtype)
                padded[: gate.shape[0]] = gate
                tensors[prefix + "gate.weight"] = padded
            for expert in range(experts):
                for proj, shape in (("gate_proj", (config.moe_intermediate_size, config.hidden_size)),
                                    ("up_proj", (config.moe_intermediate_size, config.hidden_size)),
                                    ("down_proj", (config.hidden_size, config.moe_intermediate_size))):
                    key = f"{prefix}experts.{expert}.{proj}.weight"
                    if key not in tensors:
                        tensors[key] = torch.zeros(shape, dtype=gate.dtype)
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        os.remove(os.path.join(staging, "model.safetensors.index.json"))
        model = Qwen3MoeForCausalLM.from_pretrained(staging, dtype=torch.float32)
    finally:
        shutil.rmtree(staging)
    return model.to(dtype)


def write_golden(model_dir, golden_dir, test_ids, seed, device):
    """golden.json, logits_*.npy and bf16_reference.json for the checkpoint in model_dir (as make_golden.py
    writes them); returns transformers' bf16 model of it (for the sample)."""
    os.makedirs(golden_dir, exist_ok=True)
    masked = masked_layers()
    ref = full_model_from_saved(model_dir, torch.float32).double()
    ref.config._attn_implementation = "eager"
    ref.config._experts_implementation = "eager"
    for layer, experts in masked.items():
        mask_router(ref.model.layers[layer].mlp.gate, experts)
    ref.eval()
    # transformers' own bf16 run, the model cast to bf16 as a user would serve it (make_golden.py's bar).
    bf16_model = full_model_from_saved(model_dir, torch.float32).to(torch.bfloat16).to(device)
    bf16_model.config._experts_implementation = "grouped_mm" if device == "cuda" else "eager"
    bf16_model.config._attn_implementation = "sdpa"
    for layer, experts in masked.items():
        mask_router(bf16_model.model.layers[layer].mlp.gate, experts)
    bf16_model.eval()
    prompts, bf16_errors = [], []
    for i, length in enumerate(GOLDEN_PROMPT_LENGTHS):
        begin = 1000 * (i + 1)
        ids = test_ids[begin:begin + length].tolist()
        prompt, bf16_error = golden_prompt(ref, bf16_model, ids, masked, TRAINED["num_experts_per_tok"], device,
                                           golden_dir, i, GOLDEN_NEW_TOKENS)
        prompts.append(prompt)
        bf16_errors.append(bf16_error)
    with open(os.path.join(golden_dir, "golden.json"), "w") as f:
        json.dump({"case": "trained_python_moe", "storage": "bf16", "layout": "qwen3_moe",
                   "model_dir": "../../../../configs/models/qwen3-moe-python-small",
                   "missing_experts": {str(k): v for k, v in MISSING.items()},
                   "pruned_router_rows": {str(k): v for k, v in PRUNED.items()},
                   "needs_allow_missing_experts": True,
                   "reference": f"transformers {transformers.__version__} Qwen3MoeForCausalLM, float64, eager "
                                "attention; masked experts get -inf router logits",
                   "written_by": f"transformers {transformers.__version__} save_pretrained (bf16), experts/router "
                                 "rows removed afterwards; trained by tests/golden/train_small_moe.py",
                   "seed": seed, "prompts": prompts}, f, indent=2)
    write_bf16_reference(os.path.join(golden_dir, "bf16_reference.json"), bf16_errors, bf16_model, device)
    return bf16_model


def golden_only(args):
    """--golden-from MODEL_DIR: the golden files of an existing checkpoint (the held-out ids from
    --heldout, the text the training run wrote)."""
    tokenizer = Tokenizer.from_file(args.tokenizer)
    with open(args.heldout, encoding="utf-8") as f:
        test_ids = torch.tensor(tokenizer.encode(f.read()).ids, dtype=torch.long)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_golden(args.golden_from, os.path.join(args.out, "golden"), test_ids, args.seed, device)
    print(f"golden files for {args.golden_from} in {args.out}/golden", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=330, help="training time budget")
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--golden-from", help="only write the golden files of this saved checkpoint")
    parser.add_argument("--heldout", help="with --golden-from: the heldout.txt of its training run")
    args = parser.parse_args()
    if args.golden_from:
        golden_only(args)
        return
    start_time = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(os.path.join(args.out, "model"), exist_ok=True)

    # ---- Corpus: tokenized files, an end-of-text token after each. ---------------------------------
    tokenizer = Tokenizer.from_file(args.tokenizer)
    root, files = corpus_files()
    train_ids, test_texts, test_bytes, train_bytes = [], [], 0, 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        relative = os.path.relpath(path, root)
        if held_out(relative):
            test_texts.append(f"# {relative}\n{text}")
            test_bytes += len(text.encode())
        else:
            train_ids.extend(tokenizer.encode(text).ids + [END_OF_TEXT])
            train_bytes += len(text.encode())
    train = torch.tensor(train_ids, dtype=torch.long)
    heldout_text = "\n".join(test_texts)
    with open(os.path.join(args.out, "heldout.txt"), "w", encoding="utf-8") as f:
        f.write(heldout_text)
    test_ids = torch.tensor(tokenizer.encode(heldout_text).ids, dtype=torch.long)
    print(f"corpus: {root}: {len(files)} files, train {train_bytes} bytes / {len(train)} tokens, "
          f"held out {len(test_texts)} files {test_bytes} bytes / {len(test_ids)} tokens", flush=True)

    # ---- Model, masks as the saved checkpoint will have them. --------------------------------------
    config = Qwen3MoeConfig(**TRAINED)
    config._attn_implementation = "sdpa"
    model = Qwen3MoeForCausalLM(config)
    model.tie_weights()
    masked = masked_layers()
    for layer, experts in masked.items():
        mask_router(model.model.layers[layer].mlp.gate, experts)
    model.to(device)
    implementation = "grouped_mm" if device == "cuda" else "eager"
    model.config._experts_implementation = implementation
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(args.seed)

    def batch():
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=generator)
        rows = torch.stack([train[s:s + args.seq + 1] for s in starts.tolist()])
        return rows.to(device)

    # ---- Train for the time budget (cosine to 10% after a warm-up). --------------------------------
    losses, step, tokens_seen = [], 0, 0
    train_start = time.time()
    warmup = 50
    model.train()
    while time.time() - train_start < args.seconds:
        progress = min(1.0, (time.time() - train_start) / args.seconds)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = batch()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            try:
                output = model(input_ids=rows[:, :-1], labels=rows[:, :-1].clone())
            except Exception:  # noqa: BLE001 - a grouped_mm without a backward: the plain loop
                if implementation == "eager":
                    raise
                implementation = "eager"
                model.config._experts_implementation = implementation
                continue
        loss = output.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += rows[:, :-1].numel()
        if step % 50 == 0 or step == 1:
            losses.append({"step": step, "loss": float(loss.detach()), "lr": lr, "seconds": time.time() - train_start})
            print(f"step {step}: loss {float(loss.detach()):.3f} (lm + aux), lr {lr:.2e}, "
                  f"{tokens_seen / (time.time() - train_start):.0f} tokens/s", flush=True)
    train_seconds = time.time() - train_start

    # ---- Held-out perplexity (windows of 512, stride 256: each token scored once with context). -----
    model.eval()
    model.config.output_router_logits = False
    window, stride = 512, 256
    nll, counted = 0.0, 0
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for begin in range(0, len(test_ids) - 1, stride):
            ids = test_ids[begin:begin + window].unsqueeze(0).to(device)
            scored_from = 0 if begin == 0 else window - stride
            if ids.shape[1] - 1 <= scored_from:
                break
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, scored_from:-1], ids[0, scored_from + 1:], reduction="sum")
            nll += float(loss)
            counted += ids.shape[1] - 1 - scored_from
    perplexity = math.exp(nll / counted)
    print(f"held-out perplexity {perplexity:.3f} over {counted} tokens", flush=True)

    # ---- Save: bf16, transformers' own save_pretrained, then the uneven experts cut out. -----------
    model_dir = os.path.join(args.out, "model")
    stored = copy.deepcopy(model).to("cpu").to(torch.bfloat16)
    stored.config.output_router_logits = False
    stored.config._experts_implementation = "eager"
    stored.save_pretrained(model_dir, max_shard_size="12MB")
    edit_saved_checkpoint(model_dir, MISSING, PRUNED)

    # ---- Golden logits: float64 reference of exactly the stored weights, read back from the files. ---
    bf16_model = write_golden(model_dir, os.path.join(args.out, "golden"), test_ids, args.seed, device)

    # A sample of what it writes, greedy from a held-out prefix (for the README, not a test).
    prefix = test_ids[5000:5032].tolist()
    sample = list(prefix)
    with torch.no_grad():
        for _ in range(48):
            sample.append(int(bf16_model(torch.tensor([sample], device=device)).logits[0, -1].argmax()))
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"corpus": f"Python {sys.version.split()[0]} standard library sources ({root}), .py files "
                             "outside test suites; PSF License",
                   "split": "held out: files whose path hash (sha256 mod 20) is 0",
                   "files": len(files), "train_bytes": train_bytes, "train_tokens": len(train),
                   "heldout_files": len(test_texts), "heldout_bytes": test_bytes, "heldout_tokens": len(test_ids),
                   "config": {k: v for k, v in TRAINED.items()}, "missing_experts": MISSING,
                   "pruned_router_rows": PRUNED, "parameters": params, "steps": step, "batch": args.batch,
                   "sequence": args.seq, "tokens_seen": tokens_seen, "train_seconds": train_seconds,
                   "peak_lr": args.lr, "experts_implementation": implementation, "losses": losses,
                   "heldout_perplexity": perplexity, "perplexity_window": window, "perplexity_stride": stride,
                   "perplexity_precision": "bf16 autocast", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "command": " ".join(sys.argv), "sample_prefix": tokenizer.decode(prefix),
                   "sample_greedy": tokenizer.decode(sample[len(prefix):]),
                   "total_seconds": time.time() - start_time}, f, indent=2)
    print(f"done in {time.time() - start_time:.0f} s: {step} steps, {tokens_seen} tokens; sample:\n"
          f"{tokenizer.decode(prefix)}|||{tokenizer.decode(sample[len(prefix):])}", flush=True)


if __name__ == "__main__":
    main()
