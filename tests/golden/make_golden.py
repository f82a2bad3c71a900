#!/usr/bin/env python3
"""Builds the golden fixtures: tiny random Qwen3-MoE models and Hugging Face transformers'
logits for them, which epic's forward pass must reproduce (relative L2 error <= 1e-4).

Runs where torch + transformers + safetensors exist (the GPU machine's python3; CPU is enough):
    python3 tests/golden/make_golden.py --out tests/golden/fixtures
Every weight is redrawn at random (norms included) so no term of the math can hide behind a
constant. The reference is computed in float64 from the exact stored weights (after rounding to
the storage dtype), so the comparison measures epic's error alone.

Checkpoints and config.json are written by transformers itself (`save_pretrained`, which saves
the published per-expert layout although transformers 5 keeps experts fused in memory), so the
fixtures hold what real tools write: transformers 5 spells the expert count `num_local_experts`
for Qwen3-MoE and `num_experts` for the Omni text config, and the rope theta inside
`rope_parameters`. One case converts a saved config to the spelling of published hub configs
(transformers 4: `num_experts`, `rope_theta`, `torch_dtype`), which transformers 5 cannot write.
Cases with missing experts or a pruned router edit the saved shards afterwards (a tool that
prunes experts would do the same).
"""
import argparse
import copy
import json
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3OmniMoeConfig

STORAGE = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

BASE = dict(
    vocab_size=160, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=48, moe_intermediate_size=24,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    max_position_embeddings=256, hidden_act="silu", attention_bias=False,
)

# name, config overrides, storage, layout, sharded, missing {layer: [experts]}, pruned {layer: rows}
# layout: "qwen3_moe" (transformers 5 spelling), "hub" (published transformers 4 spelling),
# "omni" (Qwen3-Omni thinker: thinker_config.text_config, tensors under thinker.).
CASES = [
    ("qwen3_moe_f32", dict(mlp_only_layers=[1]), "f32", "qwen3_moe", True, {}, {}),
    ("qwen3_moe_bf16", dict(decoder_sparse_step=2, norm_topk_prob=False, tie_word_embeddings=True,
                            num_experts_per_tok=3, rope_theta=1000000.0), "bf16", "qwen3_moe", False, {}, {}),
    ("qwen3_omni_thinker_f16", dict(num_experts_per_tok=4, rope_theta=1000000.0), "f16", "omni", True, {}, {}),
    ("missing_experts", dict(), "f32", "qwen3_moe", True, {0: [3], 2: [5, 6]}, {}),
    ("pruned_router", dict(), "bf16", "qwen3_moe", True, {}, {1: 5}),
    ("qwen3_moe_hub_config_bf16", dict(rope_theta=1000000.0, max_position_embeddings=512), "bf16", "hub", True,
     {}, {}),
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
        router_logits = F.linear(hidden_states, router.weight) + mask.to(router.weight.device, router.weight.dtype)
        router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, indices = torch.topk(router_probs, router.top_k, dim=-1)
        if router.norm_topk_prob:
            top_value /= top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value.to(router_logits.dtype), indices

    router.forward = forward


def shard_size(model, storage):
    """About a quarter of the checkpoint, so one layer's experts straddle two files as in real
    checkpoints."""
    total = sum(p.numel() for p in model.parameters()) * torch.tensor([], dtype=STORAGE[storage]).element_size()
    return total // 4 + 1


def edit_saved_checkpoint(directory, missing, pruned):
    """Drops missing experts and pruned router rows from the shards transformers wrote, and keeps
    the index (weight_map, total_size) true."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    weight_map = {}
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        path = os.path.join(directory, shard)
        tensors = load_file(path)
        kept = {}
        for name, tensor in tensors.items():
            parts = name.split(".")
            if "layers" in parts:
                layer = int(parts[parts.index("layers") + 1])
                if ".mlp.experts." in name:
                    expert = int(parts[parts.index("experts") + 1])
                    if expert in missing.get(layer, []) or expert >= pruned.get(layer, 1 << 30):
                        continue
                if name.endswith(".mlp.gate.weight") and layer in pruned:
                    tensor = tensor[: pruned[layer]].contiguous()
            kept[name] = tensor
            weight_map[name] = shard
            total += tensor.numel() * tensor.element_size()
        save_file(kept, path, metadata={"format": "pt"})
    index["weight_map"] = weight_map
    index["metadata"]["total_size"] = total
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)


def to_hub_spelling(directory):
    """The saved transformers 5 config.json rewritten in the published hub (transformers 4)
    spelling of Qwen3-30B-A3B's config.json: num_experts, rope_theta + rope_scaling null,
    torch_dtype; every value stays as transformers wrote it."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    spelled = {}
    for key, value in config.items():
        if key == "num_local_experts":
            spelled["num_experts"] = value
        elif key == "rope_parameters":
            assert value["rope_type"] == "default", value
            spelled["rope_theta"] = value["rope_theta"]
            spelled["rope_scaling"] = None
        elif key == "dtype":
            spelled["torch_dtype"] = value
        else:
            spelled[key] = value
    with open(path, "w") as f:
        json.dump(spelled, f, indent=2, sort_keys=True)


def save_omni(model, directory, params, storage, max_shard_size):
    """The Qwen3-Omni thinker layout: config.json by transformers' own Qwen3OmniMoeConfig (the text
    model's values under thinker_config.text_config), tensors saved by transformers under a
    temporary folder, then renamed to thinker.* (the thinker's text model computes exactly
    Qwen3MoeForCausalLM's math for text-only positions)."""
    text = {k: v for k, v in params.items() if k != "rope_theta"}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": params["rope_theta"],
                               "mrope_section": [2, 3, 3], "interleaved": True}
    omni = Qwen3OmniMoeConfig(thinker_config={"text_config": text}, enable_audio_output=False)
    omni.architectures = ["Qwen3OmniMoeForConditionalGeneration"]
    omni.save_pretrained(directory)
    staging = directory + ".staging"
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    with open(os.path.join(staging, "model.safetensors.index.json")) as f:
        index = json.load(f)
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(os.path.join(staging, shard))
        save_file({"thinker." + n: t for n, t in tensors.items()}, os.path.join(directory, shard),
                  metadata={"format": "pt"})
    index["weight_map"] = {"thinker." + n: s for n, s in index["weight_map"].items()}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    shutil.rmtree(staging)


@torch.no_grad()
def reference(model, ids):
    logits = model(torch.tensor([ids])).logits[0]
    return logits


@torch.no_grad()
def routing_margins(model, ids, masked, top_k):
    """Per position, the reference's smallest top-k margin over its MoE layers: (k-th - (k+1)-th
    largest router logit among the present experts) / the largest |logit|. A small margin is a
    near tie that any rounding may flip (the bf16 bar of the golden test leaves positions from the
    first near tie on out, for epic and transformers alike); inf where every present expert is chosen."""
    margins = torch.full((len(ids),), float("inf"), dtype=torch.float64)

    def make_hook(layer):
        def hook(module, args):
            x = args[0].reshape(-1, module.weight.shape[1]).double()
            logits = x @ module.weight.double().T
            present = [e for e in range(logits.shape[1]) if e not in masked.get(layer, [])]
            logits = logits[:, present]
            if logits.shape[1] > top_k:
                top = torch.topk(logits, top_k + 1, dim=-1).values
                gap = (top[:, top_k - 1] - top[:, top_k]) / logits.abs().max(dim=-1).values
                margins.copy_(torch.minimum(margins, gap))
        return hook

    hooks = [layer.mlp.gate.register_forward_pre_hook(make_hook(index))
             for index, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    try:
        reference(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    return margins


def golden_prompt(model, bf16_model, ids, masked, top_k, device, directory, index, new_tokens):
    """One prompt of a golden case: the float64 reference logits (saved as logits_INDEX.npy), the greedy
    continuation by full recompute (epic's KV cache must agree), and transformers' own bf16 error with
    the routing margins. Returns (the golden.json prompt entry, the bf16_reference.json entry)."""
    logits = reference(model, ids)
    np.save(os.path.join(directory, f"logits_{index}.npy"), logits.to(torch.float32).numpy())
    with torch.no_grad():
        bf16_logits = bf16_model(torch.tensor([ids], device=device)).logits[0].double().cpu()
    margins = routing_margins(model, ids, masked, top_k)
    bf16_error = {"relative_l2": float((bf16_logits - logits).norm() / logits.norm()),
                  "position_squared_error": ((bf16_logits - logits) ** 2).sum(dim=-1).tolist(),
                  "routing_margin": [m if np.isfinite(m) else None for m in margins.tolist()]}
    generated = list(ids)
    for _ in range(new_tokens):
        generated.append(int(reference(model, generated)[-1].argmax()))
    return {"ids": ids, "logits": f"logits_{index}.npy", "greedy": generated[len(ids):]}, bf16_error


def write_bf16_reference(path, bf16_errors, bf16_model, device):
    with open(path, "w") as f:
        json.dump({"what": "relative L2 of transformers' own bf16 logits against the float64 reference, per prompt; "
                           "per position: its squared L2 error and the reference's smallest relative top-k "
                           "router margin over the layers (null: every present expert chosen)",
                   "transformers": transformers.__version__, "torch": torch.__version__,
                   "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "experts_implementation": bf16_model.config._experts_implementation,
                   "attention": "sdpa", "prompts": bf16_errors}, f, indent=2)


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
    # Save a copy cast to the storage dtype; the reference keeps the float32 model, whose buffers
    # (rotary inv_freq) a cast to bf16 would round and so degrade the reference itself.
    stored = copy.deepcopy(model).to(STORAGE[storage])
    max_shard_size = shard_size(stored, storage) if sharded else "10GB"
    if layout == "omni":
        save_omni(stored, directory, params, storage, max_shard_size)
    else:
        stored.save_pretrained(directory, max_shard_size=max_shard_size)
        if layout == "hub":
            to_hub_spelling(directory)
    if missing or pruned:
        edit_saved_checkpoint(directory, missing, pruned)
    num_tensors = 0
    for shard in os.listdir(directory):
        if shard.endswith(".safetensors"):
            num_tensors += len(load_file(os.path.join(directory, shard)))

    # transformers' own bf16 run of the same weights (the bar for epic's cuda bf16 mode): the model
    # cast to bf16 as a user would serve it, on the GPU with grouped_mm experts where there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16_model = copy.deepcopy(model).to(torch.bfloat16).to(device)
    bf16_model.config._experts_implementation = "grouped_mm" if device == "cuda" else "eager"
    bf16_model.config._attn_implementation = "sdpa"

    model = model.double()
    masked = {layer: list(experts) for layer, experts in missing.items()}
    for layer, rows in pruned.items():
        masked[layer] = list(range(rows, params["num_experts"]))
    for layer, experts in masked.items():
        mask_router(model.model.layers[layer].mlp.gate, experts)
        mask_router(bf16_model.model.layers[layer].mlp.gate, experts)
    bf16_errors = []

    prompts = []
    for i, length in enumerate(PROMPT_LENGTHS):
        ids = torch.randint(0, params["vocab_size"], (length,), generator=generator).tolist()
        prompt, bf16_error = golden_prompt(model, bf16_model, ids, masked, params["num_experts_per_tok"], device,
                                           directory, i, NUM_NEW_TOKENS)
        prompts.append(prompt)
        bf16_errors.append(bf16_error)
    with open(os.path.join(directory, "golden.json"), "w") as f:
        json.dump({"case": name, "storage": storage, "layout": layout,
                   "missing_experts": {str(k): v for k, v in missing.items()},
                   "pruned_router_rows": {str(k): v for k, v in pruned.items()},
                   "needs_allow_missing_experts": bool(missing),
                   "reference": f"transformers {transformers.__version__} Qwen3MoeForCausalLM, float64, eager "
                                "attention; masked experts get -inf router logits",
                   "written_by": f"transformers {transformers.__version__} save_pretrained"
                                 + (", config converted to the hub spelling" if layout == "hub" else "")
                                 + (", tensors renamed to thinker.*" if layout == "omni" else "")
                                 + (", experts/router rows removed afterwards" if missing or pruned else ""),
                   "seed": seed, "prompts": prompts}, f, indent=2)
    write_bf16_reference(os.path.join(directory, "bf16_reference.json"), bf16_errors, bf16_model, device)
    print(f"{name}: {num_tensors} tensors, storage {storage}, layout {layout}, "
          f"transformers bf16 rel L2 {[round(e['relative_l2'], 6) for e in bf16_errors]}")


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
