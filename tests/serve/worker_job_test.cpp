// The coordinator's side of the worker job without MPI or a model: fake ranks (threads speaking the worker
// protocol over real TCP sockets) attach to a WorkerJob. Checked: a job forms whatever stray connections
// come first; a rank that closes its connection, or does not answer in time, is an error naming it within
// the deadline; a missing rank is a timeout, not a hang; RemoteStepEngine spreads sequences by load, and
// after a rank dies it starts the job again and resumes every sequence with the tokens it reported, so
// each sequence's tokens arrive exactly once and in order; it gives up after --max-worker-restarts.
#include <gtest/gtest.h>

#include <atomic>
#include <boost/asio.hpp>
#include <map>
#include <mutex>
#include <thread>

#include "coordinator/remote_step_engine.h"
#include "coordinator/worker_job.h"
#include "coordinator/worker_link.h"
#include "kernels/error.h"

namespace epic {
namespace {

namespace wp = worker_protocol;
using namespace std::chrono_literals;

// The fake model: a sequence's token at a position depends on its id, prompt and position only.
int32_t fake_token(const wp::Sequence& s, size_t position) {
  int64_t sum = s.id * 7;
  for (int32_t id : s.prompt) sum += id;
  return static_cast<int32_t>((sum + 31 * static_cast<int64_t>(position)) % 1000);
}

struct FakeRankOptions {
  int rank = 0, world = 2;
  int die_at_step = -1;     // closes its connection instead of answering that step (1-based)
  bool never_answer = false;  // takes steps and never answers
  int64_t vocab_size = 1000, max_context = 256;
};

// One rank in a thread: hello, then steps until shutdown or its connection goes.
class FakeRank {
 public:
  FakeRank(uint16_t port, FakeRankOptions options, std::atomic<int>* bad_resumes)
      : thread_([=, this] {
          run(port, options, bad_resumes);
          ended = true;
        }) {}
  ~FakeRank() { thread_.join(); }
  std::atomic<bool> ended{false};  // its connection is gone

 private:
  void run(uint16_t port, FakeRankOptions options, std::atomic<int>* bad_resumes) {
    try {
      CoordinatorLink link("127.0.0.1", port, 10s);
      wp::Message hello;
      hello.kind = wp::Kind::kHello;
      hello.hello.rank = options.rank;
      hello.hello.world = options.world;
      hello.hello.vocab_size = options.vocab_size;
      hello.hello.max_context = options.max_context;
      hello.hello.host = "fake";
      link.send(hello);
      struct Live {
        wp::Sequence sequence;
        size_t produced;
      };
      std::map<int64_t, Live> live;
      for (int step = 1;; ++step) {
        const wp::Message message = link.receive();
        if (message.kind == wp::Kind::kShutdown) return;
        wp::Message reply;
        if (message.kind == wp::Kind::kPing) {
          reply.kind = wp::Kind::kPong;
          link.send(reply);
          continue;
        }
        if (step == options.die_at_step) return;  // the link closes: the coordinator sees it go
        if (options.never_answer) continue;
        for (int64_t id : message.command.cancel) live.erase(id);
        for (const wp::Sequence& s : message.command.admit) {
          for (size_t p = 0; p < s.resumed.size(); ++p)
            if (s.resumed[p] != fake_token(s, p)) ++*bad_resumes;  // the coordinator must resend what it got
          live[s.id] = {s, s.resumed.size()};
        }
        reply.kind = wp::Kind::kStepDone;
        for (auto it = live.begin(); it != live.end();) {
          const int32_t token = fake_token(it->second.sequence, it->second.produced++);
          const bool finished = static_cast<int64_t>(it->second.produced) >= it->second.sequence.max_new_tokens;
          reply.done.tokens.push_back({it->first, token, finished});
          it = finished ? live.erase(it) : std::next(it);
        }
        reply.done.live = static_cast<int64_t>(live.size());
        link.send(reply);
      }
    } catch (const Error&) {
      // The coordinator dropped this job: a rank of a dead job just ends.
    }
  }
  std::thread thread_;
};

WorkerJobOptions attach_options(int ranks) {
  WorkerJobOptions options;
  options.ranks = ranks;
  options.start_timeout = 10s;
  options.vocab_size = 1000;
  options.min_context = 128;
  return options;
}

TEST(WorkerJob, FormsWhateverStrayConnectionsComeFirstAndChecksHellos) {
  WorkerJob job(attach_options(2));
  // Not our protocol: an HTTP client on the worker port, and a connection that closes at once.
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket stray(io), quitter(io);
  stray.connect({boost::asio::ip::make_address("127.0.0.1"), job.port()});
  boost::asio::write(stray, boost::asio::buffer(std::string("GET /health HTTP/1.1\r\nHost: x\r\n\r\n")));
  quitter.connect({boost::asio::ip::make_address("127.0.0.1"), job.port()});
  quitter.close();
  std::atomic<int> bad{0};
  {
    FakeRank rank1(job.port(), {1, 2}, &bad), rank0(job.port(), {0, 2}, &bad);
    job.start();
    ASSERT_EQ(job.ranks(), 2);
    EXPECT_EQ(job.hellos()[0].rank, 0);
    EXPECT_EQ(job.hellos()[1].rank, 1);
    job.stop(5s);
  }
  // A rank with another vocabulary (another model): refused by name.
  {
    FakeRankOptions other{0, 1};
    other.vocab_size = 999;
    WorkerJob one(attach_options(1));
    FakeRank rank(one.port(), other, &bad);
    try {
      one.start();
      ADD_FAILURE() << "a rank of another model was taken";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("vocabulary of 999"), std::string::npos) << e.what();
    }
  }
}

TEST(WorkerJob, ADeadOrSilentRankIsAnErrorNamingItWithinTheDeadline) {
  std::atomic<int> bad{0};
  for (const bool silent : {false, true}) {
    WorkerJob job(attach_options(2));
    FakeRankOptions rank1{1, 2};
    if (silent)
      rank1.never_answer = true;
    else
      rank1.die_at_step = 1;
    FakeRank a(job.port(), {0, 2}, &bad), b(job.port(), rank1, &bad);
    job.start();
    std::vector<wp::Message> steps(2);
    for (wp::Message& m : steps) m.kind = wp::Kind::kStep;
    const auto start = std::chrono::steady_clock::now();
    try {
      job.exchange(steps, 500ms);
      ADD_FAILURE() << "the exchange went through";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kCommunication);
      EXPECT_NE(std::string(e.what()).find("worker rank 1"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(silent ? "did not answer in time" : "closed the connection"),
                std::string::npos)
          << e.what();
    }
    EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
    job.kill();  // drops the connections: the fake ranks end
  }
}

TEST(WorkerJob, AMissingRankIsATimeoutNotAHang) {
  WorkerJobOptions options = attach_options(2);
  options.start_timeout = 1s;
  WorkerJob job(options);
  std::atomic<int> bad{0};
  FakeRank only(job.port(), {0, 2}, &bad);
  try {
    job.start();
    ADD_FAILURE() << "a job of one rank out of two started";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("1 of 2 said hello"), std::string::npos) << e.what();
  }
}

// Runs the engine until idle; each sequence's tokens as reported, and how often each finished.
void drain(RemoteStepEngine& engine, std::map<int64_t, std::vector<int32_t>>& tokens,
           std::map<int64_t, int>& finished) {
  for (int guard = 0; !engine.idle() && guard < 1000; ++guard)
    for (const EngineEvent& event : engine.step()) {
      if (event.token) tokens[event.id].push_back(*event.token);
      if (event.finished) ++finished[event.id];
    }
}

EngineSequence sequence(int64_t id) {
  EngineSequence s;
  s.id = id;
  s.prompt = {static_cast<int32_t>(id + 1), 5, 9};
  s.max_new_tokens = 6 + id % 4;
  return s;
}

std::vector<int32_t> expected_tokens(const EngineSequence& s) {
  const wp::Sequence wire{s.id, s.prompt, {}, s.max_new_tokens, 0, 1, 0};
  std::vector<int32_t> tokens;
  for (int64_t p = 0; p < s.max_new_tokens; ++p) tokens.push_back(fake_token(wire, static_cast<size_t>(p)));
  return tokens;
}

TEST(RemoteStepEngine, SpreadsByLoadAndResumesEverySequenceAfterARankDies) {
  WorkerJob job(attach_options(2));
  std::atomic<int> bad_resumes{0};
  const uint16_t port = job.port();  // read once: the supervisor thread must not touch the job
  // The first job's rank 1 dies at its 4th step; the ranks of every later job are healthy. A supervisor
  // starts a new pair once the last pair has ended (as `srun` in a loop would for --attach).
  std::mutex ranks_mutex;
  std::vector<std::unique_ptr<FakeRank>> ranks;
  bool stopping = false;
  const auto last_pair_ended = [&] { return ranks[ranks.size() - 1]->ended && ranks[ranks.size() - 2]->ended; };
  FakeRankOptions dying{1, 2};
  dying.die_at_step = 4;
  ranks.push_back(std::make_unique<FakeRank>(port, FakeRankOptions{0, 2}, &bad_resumes));
  ranks.push_back(std::make_unique<FakeRank>(port, dying, &bad_resumes));
  std::thread supervisor([&] {
    while (true) {
      {
        std::lock_guard<std::mutex> lock(ranks_mutex);
        if (stopping) return;
        if (last_pair_ended()) {
          ranks.push_back(std::make_unique<FakeRank>(port, FakeRankOptions{0, 2}, &bad_resumes));
          ranks.push_back(std::make_unique<FakeRank>(port, FakeRankOptions{1, 2}, &bad_resumes));
        }
      }
      std::this_thread::sleep_for(10ms);
    }
  });
  job.start();
  RemoteEngineOptions options;
  options.step_timeout = 5s;
  options.max_restarts = 3;
  RemoteStepEngine engine(job, options);
  for (int64_t id = 0; id < 6; ++id) engine.admit(sequence(id));
  EXPECT_EQ(engine.step().size(), 6u);  // the first step: every sequence's first token
  const std::string metrics = engine.metrics_text();
  EXPECT_NE(metrics.find("epic_worker_sequences{rank=\"0\"} 3"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("epic_worker_sequences{rank=\"1\"} 3"), std::string::npos) << metrics;
  std::map<int64_t, std::vector<int32_t>> tokens;
  std::map<int64_t, int> finished;
  drain(engine, tokens, finished);
  {
    std::lock_guard<std::mutex> lock(ranks_mutex);
    stopping = true;
  }
  supervisor.join();
  job.stop(2s);  // the last pair leaves on the shutdown message
  ranks.clear();
  EXPECT_EQ(engine.restarts(), 1);
  EXPECT_EQ(bad_resumes, 0) << "a resumed sequence came back with tokens other than those reported";
  for (int64_t id = 0; id < 6; ++id) {
    std::vector<int32_t> expected = expected_tokens(sequence(id));
    tokens[id].insert(tokens[id].begin(), expected[0]);  // the first step's token, counted above
    EXPECT_EQ(tokens[id], expected) << "sequence " << id;
    EXPECT_EQ(finished[id], 1) << "sequence " << id;
  }
  EXPECT_NE(engine.metrics_text().find("epic_sequences_resumed_total 6"), std::string::npos);
}

TEST(RemoteStepEngine, GivesUpAfterMaxRestartsWhenNoJobComesBack) {
  WorkerJobOptions job_options = attach_options(1);
  job_options.start_timeout = 1s;
  WorkerJob job(job_options);
  std::atomic<int> bad{0};
  auto rank = std::make_unique<FakeRank>(job.port(), FakeRankOptions{0, 1, 2}, &bad);
  job.start();
  RemoteEngineOptions options;
  options.step_timeout = 2s;
  options.max_restarts = 1;
  RemoteStepEngine engine(job, options);
  engine.admit(sequence(1));
  engine.step();
  try {
    engine.step();  // the rank dies; no job attaches again within the start timeout, twice
    ADD_FAILURE() << "the engine went on without workers";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("giving up"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(engine.ready());
  rank.reset();
}

TEST(WorkerLink, ParsesHostAndPort) {
  EXPECT_EQ(parse_host_port("127.0.0.1:8100", "--coordinator"), std::make_pair(std::string("127.0.0.1"), uint16_t{8100}));
  EXPECT_EQ(parse_host_port("node-3:1", "--coordinator").first, "node-3");
  EXPECT_EQ(parse_host_port("[::1]:9000", "--coordinator").first, "::1");
  for (const char* bad : {"", "host", "host:", ":80", "host:0", "host:65536", "host:8o", "host:123456"})
    EXPECT_THROW(parse_host_port(bad, "--coordinator"), Error) << bad;
}

}  // namespace
}  // namespace epic
