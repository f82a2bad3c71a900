#!/usr/bin/env python3
"""Builds the golden fixtures: tiny random Qwen3-MoE models and Hugging Face transformers'
logits for them, which epic's forward pass must reproduce (relative L2 error <= 1e-4).

Runs where torch + transformers + safetensors exist (the GPU machine's python3; CPU is enough):
    python3 tests/golden/make_golden.py --out tests/golden/fixtures
Every weight is redrawn at random (norms included) so no term of the math can hide behind a
constant. The reference is computed in float64 from the exact stored weights (after rounding to
the storage dtype), so the comparison measures epic's error alone. Checkpoints are written in the
published per-expert layout (transformers 5 keeps experts fused: gate_up_proj [E, 2I, H] with the
gate rows first, down_proj [E, H, I]).
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

STORAGE = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

BASE = dict(
    vocab_size=160, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=48, moe_intermediate_size=24,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    max_position_embeddings=256, hidden_act="silu", attention_bias=False,
)

# name, config overrides, storage, layout, sharded, missing {layer: [experts]}, pruned {layer: rows}
CASES = [
    ("qwen3_moe_f32", dict(mlp_only_layers=[1]), "f32", "qwen3_moe", True, {}, {}),
    ("qwen3_moe_bf16", dict(decoder_sparse_step=2, norm_topk_prob=False, tie_word_embeddings=True,
                            num_experts_per_tok=3, rope_theta=1000000.0), "bf16", "qwen3_moe", False, {}, {}),
    ("qwen3_omni_thinker_f16", dict(num_experts_per_tok=4, rope_theta=1000000.0), "f16", "omni", True, {}, {}),
    ("missing_experts", dict(), "f32", "qwen3_moe", True, {0: [3], 2: [5, 6]}, {}),
    ("pruned_router", dict(), "bf16", "qwen3_moe", True, {}, {1: 5}),
]

PROMPT_LENGTHS = [1, 4, 11]
NUM_NEW_TOKENS = 5


def randomize(model, generator):
    """Redraw every parameter; scales keep activations O(1) so top-k choices are well separated."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            value = torch.empty(param.shape).uniform_(0.5, 1.5, generator=generator)
        elif "embed_tokens" in name:
            value = torch.randn(param.shape, generator=generator)
        else:
            fan_in = param.shape[-1]
            value = torch.randn(param.shape, generator=generator) / fan_in ** 0.5
        param.data.copy_(value)


def mask_router(router, masked_experts):
    """The masked reference: missing/pruned experts get -inf router logits, so they never win
    top-k and the softmax runs over present experts (transformers' router, one line added)."""
    mask = torch.zeros(router.num_experts, dtype=torch.float64)
    mask[masked_experts] = float("-inf")

    def forward(hidden_states):
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        router_logits = F.linear(hidden_states, router.weight) + mask.to(router.weight.dtype)
        router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, indices = torch.topk(router_probs, router.top_k, dim=-1)
        if router.norm_topk_prob:
            top_value /= top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value.to(router_logits.dtype), indices

    router.forward = forward


def per_expert_state_dict(model, prefix, missing, pruned, tie):
    """transformers' fused state_dict -> the published per-expert tensor names."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        if name.startswith("model."):
            out_name = prefix + name
        else:
            out_name = prefix + name  # lm_head.weight -> [thinker.]lm_head.weight
        if ".mlp.experts.gate_up_proj" in name or ".mlp.experts.down_proj" in name:
            layer = int(name.split(".")[2])
            base = out_name.rsplit(".experts.", 1)[0] + ".experts"
            num_experts = tensor.shape[0]
            for expert in range(num_experts):
                if expert in missing.get(layer, []) or expert >= pruned.get(layer, num_experts):
                    continue
                if name.endswith("gate_up_proj"):
                    inter = tensor.shape[1] // 2
                    tensors[f"{base}.{expert}.gate_proj.weight"] = tensor[expert, :inter]
                    tensors[f"{base}.{expert}.up_proj.weight"] = tensor[expert, inter:]
                else:
                    tensors[f"{base}.{expert}.down_proj.weight"] = tensor[expert]
            continue
        if name.endswith(".mlp.gate.weight"):
            layer = int(name.split(".")[2])
            if layer in pruned:
                tensor = tensor[: pruned[layer]]
        tensors[out_name] = tensor
    return tensors


def layer_key(name):
    parts = name.split(".")
    if "layers" in parts:
        index = parts.index("layers")
        expert = int(parts[index + 4]) if len(parts) > index + 4 and parts[index + 3] == "experts" else -1
        return (1, int(parts[index + 1]), expert, name)
    return (0 if "embed" in name else 2, 0, 0, name)


def write_checkpoint(directory, tensors, storage, sharded):
    names = sorted(tensors, key=layer_key)
    stored = {n: tensors[n].to(STORAGE[storage]).contiguous() for n in names}
    if not sharded:
        save_file(stored, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    # Small shards so that one layer's experts straddle two files, as in real checkpoints.
    shard_budget = sum(t.numel() * t.element_size() for t in stored.values()) // 4 + 1
    shards, current, size = [], [], 0
    for n in names:
        nbytes = stored[n].numel() * stored[n].element_size()
        if current and size + nbytes > shard_budget:
            shards.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: stored[n] for n in shard}, os.path.join(directory, file_name), metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = file_name
    total = sum(t.numel() * t.element_size() for t in stored.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def config_json(cfg, layout):
    text = {k: v for k, v in BASE.items()}
    text.update(cfg)
    if layout == "qwen3_moe":
        out = dict(text, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", torch_dtype="float32")
        return out
    # Qwen3-Omni: the thinker's text model config nests under thinker_config.text_config and
    # names its rope theta in rope_parameters (with the multimodal rope sections).
    theta = text.pop("rope_theta")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "mrope_section": [2, 3, 3],
                               "interleaved": True}
    text["model_type"] = "qwen3_omni_moe_text"
    return {"architectures": ["Qwen3OmniMoeForConditionalGeneration"], "model_type": "qwen3_omni_moe",
            "thinker_config": {"model_type": "qwen3_omni_moe_thinker", "text_config": text,
                               "audio_config": {"model_type": "qwen3_omni_moe_audio_encoder"},
                               "vision_config": {"model_type": "qwen3_omni_moe_vision_encoder"}},
            "talker_config": {"model_type": "qwen3_omni_moe_talker"}, "enable_audio_output": False}


@torch.no_grad()
def reference(model, ids):
    logits = model(torch.tensor([ids])).logits[0]
    return logits


def make_case(out_root, case, seed):
    name, overrides, storage, layout, sharded, missing, pruned = case
    directory = os.path.join(out_root, name)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    generator = torch.Generator().manual_seed(seed)
    params = dict(BASE, **overrides)
    config = Qwen3MoeConfig(**params)
    config._attn_implementation = "eager"
    # The plain per-expert loop: grouped_mm kernels have no float64 path.
    config._experts_implementation = "eager"
    model = Qwen3MoeForCausalLM(config).eval()
    assert config.rope_parameters["rope_theta"] == params["rope_theta"], config.rope_parameters
    assert config.decoder_sparse_step == params["decoder_sparse_step"]
    randomize(model, generator)
    if params["tie_word_embeddings"]:
        model.tie_weights()
    # Round to the storage dtype first, so the reference sees exactly the stored weights.
    for p in model.parameters():
        p.data.copy_(p.data.to(STORAGE[storage]).to(torch.float32))
    prefix = "thinker." if layout == "omni" else ""
    tensors = per_expert_state_dict(model, prefix, missing, pruned, params["tie_word_embeddings"])
    write_checkpoint(directory, tensors, storage, sharded)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_json(overrides, layout), f, indent=2)

    model = model.double()
    masked = {layer: list(experts) for layer, experts in missing.items()}
    for layer, rows in pruned.items():
        masked[layer] = list(range(rows, params["num_experts"]))
    for layer, experts in masked.items():
        mask_router(model.model.layers[layer].mlp.gate, experts)

    prompts = []
    for i, length in enumerate(PROMPT_LENGTHS):
        ids = torch.randint(0, params["vocab_size"], (length,), generator=generator).tolist()
        logits = reference(model, ids)
        np.save(os.path.join(directory, f"logits_{i}.npy"), logits.to(torch.float32).numpy())
        generated = list(ids)
        for _ in range(NUM_NEW_TOKENS):  # greedy, full recompute (no cache): epic's KV cache must agree
            generated.append(int(reference(model, generated)[-1].argmax()))
        prompts.append({"ids": ids, "logits": f"logits_{i}.npy", "greedy": generated[length:]})
    with open(os.path.join(directory, "golden.json"), "w") as f:
        json.dump({"case": name, "storage": storage, "layout": layout,
                   "missing_experts": {str(k): v for k, v in missing.items()},
                   "pruned_router_rows": {str(k): v for k, v in pruned.items()},
                   "needs_allow_missing_experts": bool(missing),
                   "reference": f"transformers {transformers.__version__} Qwen3MoeForCausalLM, float64, eager "
                                "attention; masked experts get -inf router logits",
                   "seed": seed, "prompts": prompts}, f, indent=2)
    print(f"{name}: {len(tensors)} tensors, storage {storage}, layout {layout}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=20261126)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for i, case in enumerate(CASES):
        make_case(args.out, case, args.seed + i)


if __name__ == "__main__":
    main()
