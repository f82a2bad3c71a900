// The subcommands of the `epic` executable; each returns the process exit code.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "launch/expert_budget.h"

namespace epic::cli {

struct MakeModelArgs {
  std::string preset;
  std::string out_dir;
  uint64_t seed = 0;
  std::string tokenizer_json;     // empty: the default location, if present
  std::optional<int64_t> layers;  // override num_hidden_layers (a slice of a big preset)
  bool force = false;             // replace an earlier make-model output in out_dir
};

struct RunArgs {
  std::string model_dir;
  std::optional<std::string> prompt;
  std::optional<std::string> prompt_ids;
  std::optional<std::string> prompts_file;     // one text prompt per line
  std::optional<std::string> prompt_ids_file;  // one id list per line
  int64_t max_new_tokens = 16;
  double temperature = 0.0;
  double top_p = 1.0;
  uint64_t seed = 0;
  std::string logits_out;
  bool allow_missing_experts = false;
  bool allow_nonfinite_weights = false;  // load NaN/Inf weights instead of failing
  // Placement of the experts over the workers (the ranks of the job).
  std::optional<int64_t> slots;
  std::optional<uint64_t> budget_bytes;
  std::string load_profile;      // plan from a profile recorded by an earlier run
  std::string load_profile_out;  // record this run's tokens per (layer, expert)
  std::string placement_out;     // save the plan used, as JSON
  std::string report_out;        // per-worker report (bytes, phases, load) as JSON
  double comm_timeout_seconds = 300;
  int64_t max_active_sequences = 64;  // per worker; worker/generation_loop.h kDefaultMaxActiveSequences
  // Random weights of a preset instead of --model (launch/model_source.h).
  std::string random_weights;
  std::optional<int64_t> layers;
  uint64_t weights_seed = 0;
  // Where and in which precision to compute (launch/backend_choice.h).
  std::string backend = "auto";
  std::optional<int> device;
  std::string precision = "auto";
  bool cuda_graphs = true;
  // The MoE exchange of a multi-rank GPU run: "nccl" (device buffers, worker/device_expert_parallel_moe.h),
  // "host" (MPI through host memory, worker/expert_parallel_moe.h), "auto": nccl where the backend is cuda,
  // NCCL is built, there are several ranks, no load profile is recorded (it needs per-expert rows) and no
  // --expert-budget waits or substitutes on a miss (over NCCL a budget reads misses in place: --on-miss
  // read).
  std::string ep_transport = "auto";
  // The NCCL exchange's mode (worker/ep_mode.h): "auto" (fixed-size low-latency blocks for steps of at
  // most ep_low_latency_max_tokens rows per rank, capturable in decode graphs; the normal mode beyond),
  // "normal" or "low-latency" (every step; a larger one is an error).
  std::string ep_mode = "auto";
  int64_t ep_low_latency_max_tokens = 256;  // worker/ep_mode.h: kDefaultLowLatencyMaxTokens
  bool ep_overlap = false;  // two-batch overlap of the normal mode's exchanges with the expert compute
  // The host exchange's scheme (worker/expert_parallel_moe.h): "flat" or "hierarchical" (a token crosses
  // between nodes once per destination node). ranks_per_node > 0 declares the nodes (every N consecutive
  // ranks); 0 takes them from the host names (comm/node_topology.h).
  std::string ep_dispatch = "flat";
  int ranks_per_node = 0;
  // The residency state of every step (worker/routing_policy.h): "focus" (the trained experts per token)
  // or "wake" (4 per token).
  std::string residency_state = "focus";
  // A budget of resident experts and how the rest are kept (launch/expert_budget.h); one process.
  ExpertStoreFlags expert_store;
  // Prompt tokens a step feeds at most over all prefilling sequences (worker/generation_engine.h); 0: each
  // prompt in one step.
  int64_t prefill_chunk_tokens = 0;
  // Positions the KV cache holds per worker for all live sequences together; 0: max-active x context.
  int64_t kv_cache_tokens = 0;
};

struct PlanArgs {
  std::string model_dir;
  int workers = 1;
  std::optional<int64_t> slots;
  std::optional<uint64_t> budget_bytes;
  std::string load_profile;
  bool allow_missing_experts = false;
  std::string out;         // also save the plan JSON here
  int ranks_per_node = 0;  // > 0: the workers form nodes of this many (topology-aware plan and traffic)
  std::string
      expert_budget;  // also estimate what each worker's resident experts serve (launch/expert_budget.h)
};

struct TokenizeArgs {
  std::string model_dir;
  std::optional<std::string> text;
  std::optional<std::string> file;
};

struct DetokenizeArgs {
  std::string model_dir;
  std::string ids;
};

// 2 for bad flags or input, 1 for failures of the system (I/O, communication, bugs).
int exit_code_for(ErrorCode code);
// "epic: error [code]: message" on stderr.
void print_error(const Error& error);

struct BenchMoeArgs {
  std::string preset = "qwen3-30b-a3b";
  int64_t tokens_per_worker = 64;
  int64_t layers = 1;
  int64_t iterations = 5;
  int64_t warmup = 1;
  std::optional<int64_t> slots;
  uint64_t seed = 1;
  int threads = 0;  // CPU threads per rank; 0 = cores / ranks on the node
  std::string csv_out;
  std::string json_out;
  double comm_timeout_seconds = 300;
  std::string backend = "auto";  // auto | cpu | cuda (launch/backend_choice.h)
  std::optional<int> device;
  std::string precision = "auto";
  bool cuda_graphs = false;  // one GPU worker: the timed iterations replay a CUDA graph of the layers
  bool check = true;         // check the layers' output after timing (--no-check: skip)
  std::string ep_transport = "auto";  // auto | nccl | host (launch/ep_transport.h)
  bool baseline = true;  // with nccl: NCCL's all-to-all of the same bytes and the link, timed in the same run
  // With nccl: the exchange's mode, "normal" or "low-latency" (fixed-size blocks sized for
  // --tokens-per-worker; its phases timed with a host wait per call), and two-batch overlap (normal mode).
  std::string ep_mode = "normal";
  bool ep_overlap = false;
  std::string ep_dispatch = "flat";  // host exchange: flat | hierarchical (as epic run)
  int ranks_per_node = 0;            // as epic run
  // Test-only (a hidden flag, --inject-wrong-row RANK): corrupt one combined row of the check on that
  // rank, so tests can prove the check fails and names the worker. -1: no fault.
  int inject_wrong_row_rank = -1;
};
int bench_moe_command(const BenchMoeArgs& args);

struct BenchLoadArgs {
  std::string model_dir;
  int threads = 0;  // reader threads; 0 = min(8, cores)
  bool allow_nonfinite_weights = false;
  std::string backend = "cpu";  // where to load: cpu (host memory) or cuda (through pinned staging)
  std::optional<int> device;
};
int bench_load_command(const BenchLoadArgs& args);

struct BenchDecodeArgs {
  std::string model_dir;       // or random_weights
  std::string random_weights;  // a preset
  std::optional<int64_t> layers;
  uint64_t weights_seed = 0;
  std::string backend = "auto";
  std::optional<int> device;
  std::string precision = "auto";
  std::vector<int64_t> batches = {1};  // each timed in turn on the one loaded model
  int64_t prompt_tokens = 32;
  int64_t new_tokens = 64;
  int64_t prefill_tokens = 0;  // > 0: also time one prefill of this many tokens
  bool cuda_graphs = true;
  std::string json_out;
  double comm_timeout_seconds = 300;  // under mpirun
  bool ep_overlap = false;            // under mpirun with NCCL: two-batch overlap of the prefill steps
  // Decode with only a budget of experts resident (one process), each budget against every expert resident
  // in the same run (launch/expert_budget.h); prompts from a text instead of random ids.
  std::vector<std::string> expert_budgets;
  std::string expert_tier = "host";
  std::string eviction = "lru";
  std::string on_miss = "wait";
  std::string prefetch = "next-layer";
  int64_t admit_per_step = 0;  // --on-miss read: experts copied in per layer and step (0: every miss)
  std::string host_budget;     // --expert-tier disk: a pinned host cache of this budget ("" none)
  std::string prompts_from;
  bool allow_missing_experts = false;
};
int bench_decode_command(const BenchDecodeArgs& args);

// epic eval (launch/eval_command.cpp): perplexity, KL and top-1 agreement against the model as trained,
// tokens/s and expert bytes, for fewer experts per token and for experts pruned by least use.
struct EvalArgs {
  std::string model_dir;
  std::string text_file;
  int64_t window = 256;               // tokens a window reads
  std::optional<int64_t> stride;      // tokens a window advances; default window / 2
  int64_t max_tokens = 0;             // score only the text's first N tokens; 0: all
  int64_t windows_per_step = 4;       // per rank, run together in one batched step
  bool decode = false;                // score token by token as generation runs (after the window's context)
  std::vector<int64_t> top_k;         // variants: experts per token
  std::vector<double> prune_percent;  // variants: percent of each pruned layer's experts removed
  std::string prune_layers = "all";   // "all" or MoE layer indices "2,5"
  std::string calibration_file;       // the text whose routing decides which experts are used least
  // variants with only a budget of experts resident (launch/expert_budget.h), each with each --on-miss
  std::vector<std::string> expert_budgets;
  std::vector<std::string> on_miss = {"wait"};
  std::string expert_tier = "host";
  std::string eviction = "lru";
  std::string prefetch = "next-layer";
  int64_t admit_per_step = 0;  // --on-miss read: experts copied in per layer and step (0: every miss)
  std::string host_budget;     // --expert-tier disk: a pinned host cache of this budget ("" none)
  bool allow_missing_experts = false;
  std::string backend = "auto";
  std::optional<int> device;
  std::string precision = "auto";
  std::string json_out;
  double comm_timeout_seconds = 300;
};
int eval_command(const EvalArgs& args);

int make_model_command(const MakeModelArgs& args);
int run_command(const RunArgs& args);
int plan_command(const PlanArgs& args);
int tokenize_command(const TokenizeArgs& args);

// epic serve (launch/serve_command.cpp): an OpenAI-compatible HTTP server over the model in this process.
struct ServeArgs {
  std::string model_dir;
  std::string served_model_name;  // "" -> the model folder's name
  std::string host = "127.0.0.1";
  int64_t port = 8000;
  // The model in a worker job of this many ranks (launched with mpirun, or srun inside a Slurm
  // allocation) instead of in this process (0); or, with attach, a worker job started apart that
  // connects to worker_host:worker_port.
  int workers = 0;
  bool attach = false;
  std::string worker_launcher = "auto";  // auto (srun inside an allocation, else mpirun), mpirun, srun
  std::string worker_host = "127.0.0.1";  // where the coordinator listens for its workers
  int64_t worker_port = 0;                // 0: any free port (not with attach)
  double worker_start_timeout_seconds = 600;  // launch to every rank's hello, loading included
  double worker_step_timeout_seconds = 300;   // a step (or a ping) past this: the job is dead
  double heartbeat_seconds = 1;               // pings while idle
  int max_worker_restarts = 5;                // in a row without a step that went through
  std::vector<std::string> worker_flags;      // after `--`: passed to every `epic worker`
  int64_t prefill_chunk_tokens = 512;  // a long prompt is fed over steps of this many tokens
  int64_t kv_cache_tokens = 0;         // per worker; 0: max-active-sequences x max-context
  int64_t max_active_sequences = 64;
  int64_t max_context = 4096;
  int64_t max_queued = 256;
  int64_t default_max_tokens = 256;
  int64_t max_body_bytes = int64_t{1} << 20;
  double shutdown_grace_seconds = 10;
  bool allow_missing_experts = false;
  std::string backend = "auto";
  std::optional<int> device;
  std::string precision = "auto";
};
int serve_command(const ServeArgs& args);

// `epic worker`: one rank of the worker job `epic serve` drives (launched by it, or started apart for
// --attach); the model and cluster flags are epic run's.
struct WorkerArgs {
  RunArgs run;                 // model, backend, exchange, placement flags; no prompts
  std::string coordinator;     // HOST:PORT
  int64_t max_context = 4096;  // positions per sequence (prompt + completion): epic serve's --max-context
  double connect_timeout_seconds = 60;
};
int worker_command(const WorkerArgs& args);

// `epic bench-scheduler`: the serve scheduler's cost per step against an instant fake engine over real
// HTTP streams (launch/bench_scheduler_command.cpp).
struct BenchSchedulerArgs {
  std::string tokenizer_json;
  std::string streams = "64,256";  // concurrent streaming requests, one measurement each
  int64_t tokens = 200;            // tokens per stream
  int64_t step_us = 1000;          // how long the fake engine's step takes (a decode step of a real model)
  std::string json_out;
};
int bench_scheduler_command(const BenchSchedulerArgs& args);

// `epic bench-serve`: concurrent streaming clients against a running epic serve
// (launch/bench_serve_command.cpp).
struct BenchServeArgs {
  std::string url = "http://127.0.0.1:8000";
  std::string model_name = "model";  // the request's "model" (the server's --served-model-name)
  std::string prompts_file;          // one text prompt a line
  std::string prompt_ids_file;       // or one a line as token ids
  int64_t clients = 64;
  int64_t requests_per_client = 4;
  int64_t max_tokens = 64;
  double temperature = 0;
  std::string json_out;
};
int bench_serve_command(const BenchServeArgs& args);
int detokenize_command(const DetokenizeArgs& args);

}  // namespace epic::cli
