#!/usr/bin/env python3
"""The baselines of issue 7's GPU benchmarks, on the card this runs on: bf16 GEMM rate, read and copy
bandwidth, transformers' Qwen3MoeSparseMoeBlock (grouped_mm experts) at Qwen3-30B-A3B shapes, and
transformers generate / prefill on a Qwen3-30B-A3B-shaped model with random bf16 weights.

Prints one JSON object per line on stdout (log lines and warnings go to stderr). A measurement that
fails (out of memory, a transformers API that moved) prints {"name": ..., "error": ...} and the run
goes on. Needs torch with CUDA and transformers 5 (written against torch 2.11, transformers 5.17).

  python3 launch/bench/baselines.py [--quick] [--only gemm|bandwidth|moe|generate] [--layers N]
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roofline  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
PRESET = os.path.join(REPO_ROOT, "configs", "presets", "qwen3-30b-a3b.json")
GIB = 1 << 30


def emit(record):
    print(json.dumps(record), flush=True)


def log(message):
    print(f"baselines: {message}", file=sys.stderr, flush=True)


def release_memory():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def guarded(name, measure, *args):
    """Runs one measurement; its failure becomes an error line instead of ending the run."""
    try:
        for record in measure(*args):
            emit(record)
    except torch.cuda.OutOfMemoryError as error:
        emit({"name": name, "error": f"out of memory: {(str(error).splitlines() or [''])[0]}"})
    except Exception as error:  # noqa: BLE001 - one broken measurement must not hide the others
        traceback.print_exc(file=sys.stderr)
        emit({"name": name, "error": f"{type(error).__name__}: {error}"})
    finally:
        try:
            release_memory()
        except Exception:  # noqa: BLE001 - a dead context shows in the next measurement's error
            pass


def time_with_events(fn, reps, warmup):
    """Median / min milliseconds per call, CUDA events around each call (GPU idle gaps included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) for start, end in zip(starts, ends)]
    return statistics.median(times), min(times)


def time_with_sync(fn, reps):
    """Median wall milliseconds per call, synchronised before and after each (what a caller waits)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------
# Card


def environment(args):
    props = torch.cuda.get_device_properties(0)
    try:
        import transformers
        transformers_version = transformers.__version__
    except Exception as error:  # noqa: BLE001
        transformers_version = f"unavailable: {error}"
    yield {"name": "env", "device": torch.cuda.get_device_name(0), "memory_gib": props.total_memory / GIB,
           "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
           "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers_version,
           "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "seed": args.seed, "quick": args.quick, "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}


def gemm_rate(args, rates):
    n = 8192
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=generator)
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    median_ms, min_ms = time_with_events(lambda: torch.matmul(a, b, out=out), args.reps, 5)
    rates["gemm_tflops"] = 2 * n**3 / (median_ms * 1e-3) / 1e12
    yield {"name": "gemm_bf16", "m": n, "n": n, "k": n, "reps": args.reps, "median_ms": median_ms, "min_ms": min_ms,
           "tflop_per_s": rates["gemm_tflops"]}


def bandwidth(args, rates):
    numel = 4 * GIB // 2  # 4 GiB of bf16
    nbytes = numel * 2
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    x = torch.randn(numel, device="cuda", dtype=torch.bfloat16, generator=generator)
    kernels = {
        "read_bandwidth_sum": (lambda: torch.sum(x, dtype=torch.float32), nbytes),  # fp32 accumulation
        "read_bandwidth_max": (lambda: torch.amax(x), nbytes),
    }
    for name, (fn, moved) in kernels.items():
        median_ms, min_ms = time_with_events(fn, args.reps, 3)
        gbs = moved / (median_ms * 1e-3) / 1e9
        if name == "read_bandwidth_sum":
            rates["bandwidth_gbs"] = gbs
        yield {"name": name, "bytes": moved, "reps": args.reps, "median_ms": median_ms, "min_ms": min_ms,
               "gb_per_s": gbs}
    y = torch.empty_like(x)
    median_ms, min_ms = time_with_events(lambda: y.copy_(x), args.reps, 3)
    yield {"name": "copy_bandwidth", "bytes": 2 * nbytes, "counts": "read + write", "reps": args.reps,
           "median_ms": median_ms, "min_ms": min_ms, "gb_per_s": 2 * nbytes / (median_ms * 1e-3) / 1e9}


# ---------------------------------------------------------------------------------------------------
# transformers


class default_dtype:
    """Parameters created inside are bf16 (a 48-layer fp32 model would not fit the card)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)


def qwen3_config(layers):
    """A transformers Qwen3MoeConfig with the preset's shapes, experts through grouped_mm."""
    from transformers import Qwen3MoeConfig

    with open(PRESET) as f:
        shapes = dict(json.load(f)["config"])
    shapes.pop("architectures", None)
    shapes.pop("rope_theta", None)  # transformers 5 spells it rope_parameters; it does not change timings
    shapes["num_hidden_layers"] = layers
    shapes["hidden_act"] = "silu"
    config = Qwen3MoeConfig(**shapes)
    for key, value in shapes.items():  # a renamed field (num_experts -> num_local_experts) reads through
        if getattr(config, key, None) != value:
            setattr(config, key, value)
        if getattr(config, key) != value:
            raise RuntimeError(f"Qwen3MoeConfig.{key} is {getattr(config, key)!r}, wanted {value!r}")
    config._experts_implementation = "grouped_mm"
    return config


def randomize_(module, seed):
    """Matrices ~ N(0, 0.02) (router logits then spread over the experts); norms keep their ones."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.02, generator=generator)


def selected_experts(gate, hidden):
    """The experts the block's own router picks for each token (its output format moved in 5.x)."""
    out = gate(hidden)
    if isinstance(out, tuple):
        indices = [t for t in out if torch.is_tensor(t) and not t.is_floating_point()]
        if len(indices) != 1:
            raise RuntimeError(f"cannot find the top-k indices among the router's {len(out)} outputs")
        return indices[0]
    return torch.topk(out, gate_top_k(gate), dim=-1).indices  # transformers 4: the router is nn.Linear


def gate_top_k(gate):
    return getattr(gate, "top_k", 8)


def shape_of(config):
    return roofline.MoeShape(hidden=config.hidden_size, moe_intermediate=config.moe_intermediate_size,
                             experts=config.num_experts, top_k=config.num_experts_per_tok,
                             layers=config.num_hidden_layers, heads=config.num_attention_heads,
                             kv_heads=config.num_key_value_heads, head_dim=config.head_dim, vocab=config.vocab_size)


def moe_block(args):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError("torch._grouped_mm is missing: transformers' grouped_mm experts need torch >= 2.9")
    config = qwen3_config(layers=1)
    with torch.device("cuda"), default_dtype(torch.bfloat16):
        block = Qwen3MoeSparseMoeBlock(config).eval()
    randomize_(block, args.seed)
    implementation = block.experts.config._experts_implementation
    if implementation != "grouped_mm":
        raise RuntimeError(f"the experts run {implementation!r}, not grouped_mm")
    shape = shape_of(config)
    hidden = shape.hidden
    generator = torch.Generator(device="cuda").manual_seed(args.seed + 1)
    yield {"name": "moe_block_setup", "experts_implementation": implementation, "hidden": hidden,
           "moe_intermediate": shape.moe_intermediate, "experts": shape.experts, "top_k": shape.top_k,
           "norm_topk_prob": config.norm_topk_prob}

    with torch.inference_mode():
        # The implementation switch is live: eager and grouped_mm must agree at bf16 precision.
        x = torch.randn(1, 32, hidden, device="cuda", dtype=torch.bfloat16, generator=generator)
        grouped = block(x)
        grouped = grouped[0] if isinstance(grouped, tuple) else grouped
        config._experts_implementation = "eager"
        eager = block(x)
        eager = eager[0] if isinstance(eager, tuple) else eager
        config._experts_implementation = "grouped_mm"
        rel_l2 = ((grouped.float() - eager.float()).norm() / eager.float().norm()).item()
        yield {"name": "moe_block_check", "tokens": 32, "grouped_mm_vs_eager_rel_l2": rel_l2,
               "ok": bool(rel_l2 < 2e-2)}

        for num_tokens in args.moe_tokens:
            guarded(f"moe_block_{num_tokens}", moe_block_at, block, shape, num_tokens, generator, args)


def moe_block_at(block, shape, num_tokens, generator, args):
    hidden, inter, num_experts, top_k = shape.hidden, shape.moe_intermediate, shape.experts, shape.top_k
    x = torch.randn(1, num_tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=generator)
    distinct = int(torch.unique(selected_experts(block.gate, x.view(-1, hidden))).numel())
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    finite = bool(torch.isfinite(out).all().item())
    median_ms, min_ms = time_with_events(lambda: block(x), args.reps, 5)
    wall_ms = time_with_sync(lambda: block(x), max(5, args.reps // 4))
    bytes_read = distinct * 3 * hidden * inter * 2  # bf16 gate, up and down of each expert hit
    flops = num_tokens * (2 * hidden * num_experts + top_k * 6 * hidden * inter)  # router + experts
    yield {"name": "moe_block", "tokens": num_tokens, "reps": args.reps, "median_ms": median_ms, "min_ms": min_ms,
           "wall_ms": wall_ms, "distinct_experts": distinct,
           "expected_distinct_experts": roofline.expected_distinct_experts(num_experts, top_k, num_tokens),
           "expert_bytes_read": bytes_read, "gb_per_s": bytes_read / (median_ms * 1e-3) / 1e9, "flops": flops,
           "tflop_per_s": flops / (median_ms * 1e-3) / 1e12, "output_finite": finite}


def build_model(args):
    from transformers import Qwen3MoeForCausalLM

    config = qwen3_config(args.layers)
    start = time.perf_counter()
    with torch.device("cuda"), default_dtype(torch.bfloat16):
        model = Qwen3MoeForCausalLM(config)
    if hasattr(model, "set_experts_implementation"):
        try:  # the config asked for grouped_mm already; this re-checks it the public way where it exists
            model.set_experts_implementation("grouped_mm")
        except Exception as error:  # noqa: BLE001 - the check below says what the experts run
            log(f"set_experts_implementation('grouped_mm') failed: {type(error).__name__}: {error}")
    randomize_(model, args.seed)
    model.eval()
    torch.cuda.synchronize()
    implementation = model.config._experts_implementation
    if implementation != "grouped_mm":
        raise RuntimeError(f"the model's experts run {implementation!r}, not grouped_mm")
    parameters = sum(p.numel() for p in model.parameters())
    shape = shape_of(config)
    # The roofline's weight bytes hold only if it counts the same model transformers built.
    expected = roofline.model_parameters(shape)["total"]
    return model, shape, {"name": "generate_setup", "layers": args.layers, "parameters": parameters,
                          "roofline_parameters": expected, "parameters_match": parameters == expected,
                          "weight_gib": parameters * 2 / GIB, "experts_implementation": implementation,
                          "attn_implementation": model.config._attn_implementation,
                          "build_s": time.perf_counter() - start,
                          "memory_allocated_gib": torch.cuda.memory_allocated() / GIB}


def generate(args, rates):
    model, shape, setup = build_model(args)
    yield setup
    vocab = model.config.vocab_size
    generator = torch.Generator(device="cuda").manual_seed(args.seed + 2)
    for batch in args.batches:
        guarded(f"generate_batch_{batch}", generate_at, model, shape, batch, vocab, generator, args, rates)
        if batch == args.batches[0]:  # the prefill comes early: a later batch may take the run's time
            guarded("prefill", prefill_at, model, shape, vocab, generator, args, rates)


def generate_at(model, shape, batch, vocab, generator, args, rates):
    ids = torch.randint(0, vocab, (batch, args.prompt_tokens), device="cuda", generator=generator)
    mask = torch.ones_like(ids)
    new = args.new_tokens
    torch.cuda.reset_peak_memory_stats()

    def run(max_new):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                                  do_sample=False, num_beams=1, pad_token_id=0)

    # Warm-up: same batch and prompt, fewer new tokens (kernels chosen, allocator grown).
    warm_start = time.perf_counter()
    run(min(new, args.warmup_new_tokens))
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - warm_start
    start = time.perf_counter()
    out = run(new)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = out.shape[1] - args.prompt_tokens
    record = {"name": "generate", "batch": batch, "prompt_tokens": args.prompt_tokens, "new_tokens": generated,
              "seconds": seconds, "warmup_seconds": warmup_s, "warmup_new_tokens": min(new, args.warmup_new_tokens),
              "tokens_per_s": generated * batch / seconds, "ms_per_step": seconds / generated * 1e3,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB}
    if rates.get("bandwidth_gbs") and rates.get("gemm_tflops"):
        # The roofline of a mid-generation step (context = prompt + half the new tokens).
        step = roofline.decode_step(shape, batch, args.prompt_tokens + generated // 2, rates["bandwidth_gbs"],
                                    rates["gemm_tflops"])
        record["roofline_tokens_per_s"] = step["tokens_per_s"]
        record["fraction_of_roofline"] = record["tokens_per_s"] / step["tokens_per_s"]
    yield record


def prefill_at(model, shape, vocab, generator, args, rates):
    ids = torch.randint(0, vocab, (1, args.prefill_tokens), device="cuda", generator=generator)

    def forward():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=True, logits_to_keep=1)

    forward()
    median_ms = time_with_sync(forward, args.prefill_reps)
    flops = roofline.prefill(shape, 1, args.prefill_tokens)["flops_last_token_logits"]
    record = {"name": "prefill", "batch": 1, "tokens": args.prefill_tokens, "reps": args.prefill_reps,
              "median_ms": median_ms, "tokens_per_s": args.prefill_tokens / (median_ms * 1e-3), "flops": flops,
              "tflop_per_s": flops / (median_ms * 1e-3) / 1e12}
    if rates.get("gemm_tflops"):
        record["fraction_of_gemm_rate"] = record["tflop_per_s"] / rates["gemm_tflops"]
    yield record


# ---------------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["gemm", "bandwidth", "moe", "generate"], help="run one measurement")
    parser.add_argument("--quick", action="store_true", help="fewer reps, token counts and batches")
    parser.add_argument("--skip-generate", action="store_true", help="no 57 GB model (GEMM, bandwidth, MoE only)")
    parser.add_argument("--layers", type=int, default=48, help="layers of the generate model (default 48)")
    parser.add_argument("--batches", type=int, nargs="+", help="generate batch sizes (default 1 16 64 256)")
    parser.add_argument("--moe-tokens", type=int, nargs="+", help="MoE block token counts")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup-new-tokens", type=int, default=8, help="new tokens of the warm-up generate")
    parser.add_argument("--prefill-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, help="default: a fresh one, printed in the env line")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little") % (1 << 31)
    args.reps = 20 if args.quick else 50
    args.prefill_reps = 2 if args.quick else 3
    if args.moe_tokens is None:
        args.moe_tokens = [1, 128, 2048, 16384] if args.quick else [1, 8, 32, 128, 512, 2048, 4096, 16384]
    if args.batches is None:
        args.batches = [1, 16, 64] if args.quick else [1, 16, 64, 256]
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        emit({"name": "env", "error": "no CUDA device visible to torch"})
        return 2
    try:
        from transformers.utils import logging as transformers_logging
        transformers_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - the transformers measurements report the import error themselves
        pass
    rates = {}  # measured here, used by the roofline figures of the generate lines

    def wanted(what):
        return args.only in (None, what)

    guarded("env", environment, args)
    if wanted("gemm"):
        guarded("gemm_bf16", gemm_rate, args, rates)
    if wanted("bandwidth"):
        guarded("bandwidth", bandwidth, args, rates)
    if wanted("moe"):
        guarded("moe_block", moe_block, args)
    if wanted("generate") and not args.skip_generate:
        guarded("generate", generate, args, rates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
