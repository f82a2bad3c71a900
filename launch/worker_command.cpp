// `epic worker`: one rank of the worker job that `epic serve` drives over TCP (issue 11). The ranks build
// the model as `epic run`'s do (launch/cluster_model.h: rank 0 plans the placement, each rank reads only
// its experts), connect to the coordinator, and then step when told: each kStep brings the sequences that
// join this rank and the ids it cancels; the ranks agree on the step's shape through their own
// communicator (MPI; NCCL for the MoE exchange), step together, and each answers with its tokens. A rank
// with no sequence still steps, so every MoE layer's collectives see every rank. A rank that fails tells
// the coordinator (kError) and ends the job; a coordinator that goes away ends it too.
#include <unistd.h>

#include <chrono>
#include <cstdio>

#include "comm/fault_injection.h"
#include "comm/node_topology.h"
#include "coordinator/worker_link.h"
#include "coordinator/worker_protocol.h"
#include "kernels/error.h"
#include "launch/cli_commands.h"
#include "launch/cluster_model.h"
#include "launch/flag_checks.h"
#include "launch/local_step_engine.h"
#include "launch/rank_agreement.h"
#include "launch/run_wire.h"
#include "worker/generation_engine.h"

namespace epic::cli {
namespace {

namespace wp = worker_protocol;
using clock_type = std::chrono::steady_clock;

// The per-expert load since the job started, at most about once a second, and once more when a step leaves
// this rank idle (once, not every step its peers still run), so a burst shorter than a second shows too (the
// coordinator's load of the last window comes from the differences; reading it waits for the device).
struct ExpertLoadReporter {
  MoeExecutor* executor = nullptr;
  clock_type::time_point last = clock_type::now();
  bool stepped_since = false;  // a step ran since the last report
  bool reported_idle = false;  // this rank's idle spell is reported
  void fill(wp::StepDone& done, bool stepped, bool idle) {
    stepped_since = stepped_since || stepped;
    if (!idle) reported_idle = false;
    const auto now = clock_type::now();
    const bool due = now - last >= std::chrono::seconds(1) || (idle && !reported_idle);
    if (executor == nullptr || !stepped_since || !due) return;
    last = now;
    stepped_since = false;
    reported_idle = idle;
    ExpertLoad load = executor->read_expert_load();
    done.expert_rows = std::move(load.rows_per_expert);
    done.rows_per_rank = std::move(load.rows_per_rank);
  }
};

// One step as the coordinator asked: cancels, then admissions, then the agreed step on every rank.
wp::StepDone run_step(const wp::StepCommand& command, GenerationEngine& engine, ModelRunner& runner,
                      Communicator& comm, int64_t& steps, ExpertLoadReporter& expert_load) {
  const auto start = clock_type::now();
  for (int64_t id : command.cancel) engine.cancel(id);  // an id that already finished is no error
  for (const wp::Sequence& s : command.admit)
    engine.admit(to_sequence_request(
        EngineSequence{s.id, s.prompt, s.resumed, s.max_new_tokens, s.temperature, s.top_p, s.seed}));
  wp::StepDone done;
  int64_t unfinished_everywhere = 0;
  const StepAgreement agreement =
      agree_on_step(comm, engine.next_step(), runner.current_graph_buckets(), unfinished_everywhere);
  if (unfinished_everywhere > 0) {  // the same on every rank: all step, or none
    ++steps;
    const bool poison = inject_test_step_fault(comm.rank(), steps);
    for (const SequenceStepEvent& event : engine.step(comm.size() > 1 ? &agreement : nullptr, poison))
      done.tokens.push_back({event.sequence_id, event.token.value_or(-1), event.finished.has_value()});
  }
  done.live = engine.live_sequences();
  done.waiting = engine.waiting_sequences();
  done.kv_tokens = engine.kv_positions();
  expert_load.fill(done, unfinished_everywhere > 0, engine.idle());
  done.step_seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  return done;
}

int serve_as_worker(const WorkerArgs& args, Communicator& comm) {
  const RunArgs& run = args.run;
  ClusterModel cluster;
  open_cluster_model(run, comm, cluster);
  const std::string plan_bytes = broadcast_from_root(comm, 0, [&] {
    wire::RunPlan plan;
    plan.placement = plan_job_placement(run, cluster).to_cereal_bytes();
    plan.allow_missing_experts = run.allow_missing_experts;
    return wire::to_bytes(plan);
  });
  const wire::RunPlan plan = wire::from_bytes<wire::RunPlan>(plan_bytes, wire::kRunPlanVersion, "run plan");
  load_cluster_model(run, comm, plan, args.max_context, cluster);
  GenerationEngine engine(*cluster.runner, run.max_active_sequences, run.prefill_chunk_tokens);
  // The per-expert load /metrics reports (the host exchange counts its rows anyway).
  cluster.runner->moe_executor().count_expert_load(*cluster.chosen.backend, cluster.weights);

  const auto [host, port] = parse_host_port(args.coordinator, "--coordinator");
  std::unique_ptr<CoordinatorLink> link;
  run_on_all_ranks(comm, [&] {
    link = std::make_unique<CoordinatorLink>(
        host, port, std::chrono::milliseconds(static_cast<int64_t>(args.connect_timeout_seconds * 1000)));
    wp::Message hello;
    hello.kind = wp::Kind::kHello;
    hello.hello.rank = comm.rank();
    hello.hello.world = comm.size();
    hello.hello.pid = getpid();
    hello.hello.host = this_host_name();
    hello.hello.max_active_sequences = run.max_active_sequences;
    hello.hello.max_context = args.max_context;
    hello.hello.vocab_size = cluster.model.config.vocab_size;
    hello.hello.backend = cluster.chosen.description;
    hello.hello.kv_capacity_tokens = cluster.runner->kv_cache_blocks() * kKvBlockSize;
    link->send(hello);
  });
  if (comm.rank() == 0)
    std::fprintf(stderr, "epic worker: %d rank(s) connected to %s (%s)\n", comm.size(), args.coordinator.c_str(),
                 cluster.chosen.description.c_str());

  int64_t steps = 0;
  ExpertLoadReporter expert_load{&cluster.runner->moe_executor()};
  const auto serve = [&] {
    while (true) {
      const wp::Message message = link->receive();
      wp::Message reply;
      switch (message.kind) {
        case wp::Kind::kShutdown: return;
        case wp::Kind::kPing: reply.kind = wp::Kind::kPong; break;
        case wp::Kind::kStep:
          reply.kind = wp::Kind::kStepDone;
          reply.done = run_step(message.command, engine, *cluster.runner, comm, steps, expert_load);
          break;
        default:
          throw Error(ErrorCode::kCommunication,
                      std::string("the coordinator sent ") + wp::kind_name(message.kind) + ", which a worker never takes");
      }
      link->send(reply);
    }
  };
  try {
    serve();
  } catch (const Error& e) {
    // Tell the coordinator why (it restarts the job), then end the job naming this rank: the other ranks
    // may be waiting in a collective for this one.
    try {
      wp::Message failure;
      failure.kind = wp::Kind::kError;
      failure.error = "rank " + std::to_string(comm.rank()) + ": " + e.what();
      link->send(failure);
    } catch (const Error&) {
      // The coordinator is gone too: nothing to tell.
    }
    if (comm.size() > 1) end_job_naming_rank(comm, e);
    throw;
  }
  if (comm.rank() == 0) std::fprintf(stderr, "epic worker: shut down after %lld step(s)\n", static_cast<long long>(steps));
  return 0;
}

}  // namespace

int worker_command(const WorkerArgs& args) {
  return run_job(
      [&] {
        check_cluster_flags(args.run);
        check_int_flag("--max-active-sequences", args.run.max_active_sequences, 1, kMaxActiveSequencesBound);
        check_int_flag("--max-context", args.max_context, 2, int64_t{1} << 20);
        parse_host_port(args.coordinator, "--coordinator");
        if (!(args.connect_timeout_seconds > 0 && args.connect_timeout_seconds <= 3600))
          throw Error(ErrorCode::kInvalidArgument, "--connect-timeout must be in (0, 3600] seconds");
      },
      args.run.comm_timeout_seconds, [&](Communicator& comm) { return serve_as_worker(args, comm); });
}

}  // namespace epic::cli
