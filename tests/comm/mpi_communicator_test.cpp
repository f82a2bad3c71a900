// MpiCommunicator under mpirun (CTest runs it with 1, 2, 3 and 5 ranks). Every element carries who sent
// it to whom: rank s sends rank d pair_count(s, d) values pair_value(s, d, i), so each received element
// and each byte counter has one exact expected value. Only rank 0 prints; any rank's failure fails all.
#include "comm/mpi_communicator.h"

#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_check.h"
#include "kernels/error.h"
#include "tests/support/mpi_gtest_main.h"

namespace epic {
namespace {

// Generous: a wrong test should fail by its checks, not by a timeout; CTest's TIMEOUT bounds the run.
constexpr double kTestTimeoutSeconds = 30.0;
// The timeout test's deliberately short wait.
constexpr double kShortTimeoutSeconds = 0.5;

// Elements rank `source` sends rank `destination`: uneven, zero for some pairs at every rank count
// (0 -> 1 always) and for the own block of rank 3 with 5 ranks.
int64_t pair_count(int source, int destination) { return (source * source + 3 * destination + 2) % 5; }
// For the timeout test: no pair is empty, so no rank can finish an exchange without every peer.
int64_t full_pair_count(int source, int destination) { return 1 + (source + 2 * destination) % 3; }
using PairCount = int64_t (*)(int source, int destination);
int32_t pair_value(int source, int destination, int64_t index) {
  return static_cast<int32_t>(source * 1000000 + destination * 1000 + index);
}

class MpiCommTest : public ::testing::Test {
 protected:
  void SetUp() override {
    rank_ = comm().rank();
    size_ = comm().size();
    sent_before_ = comm().bytes_sent();
    received_before_ = comm().bytes_received();
  }
  // Keeps the ranks in step: no test starts while another rank is still in the previous one.
  void TearDown() override { comm().barrier(); }

  static MpiCommunicator& comm() { return testing::MpiGtestEnvironment::comm(); }
  uint64_t sent_in_test() const { return comm().bytes_sent() - sent_before_; }
  uint64_t received_in_test() const { return comm().bytes_received() - received_before_; }
  // Bytes of pair_count blocks this rank sends to / receives from the other ranks.
  uint64_t pair_bytes_sent(size_t element_bytes, PairCount count = pair_count) const {
    uint64_t bytes = 0;
    for (int peer = 0; peer < size_; ++peer) {
      if (peer != rank_) bytes += count(rank_, peer) * element_bytes;
    }
    return bytes;
  }
  uint64_t pair_bytes_received(size_t element_bytes, PairCount count = pair_count) const {
    uint64_t bytes = 0;
    for (int peer = 0; peer < size_; ++peer) {
      if (peer != rank_) bytes += count(peer, rank_) * element_bytes;
    }
    return bytes;
  }
  // This rank's send data in rank order with its counts.
  std::vector<int32_t> pair_send_data(std::vector<int64_t>* counts, PairCount count = pair_count) const {
    std::vector<int32_t> data;
    counts->assign(size_, 0);
    for (int destination = 0; destination < size_; ++destination) {
      (*counts)[destination] = count(rank_, destination);
      for (int64_t i = 0; i < (*counts)[destination]; ++i) data.push_back(pair_value(rank_, destination, i));
    }
    return data;
  }
  // Counts the elements of `received` (blocks in source rank order) that differ from pair_value.
  int64_t count_wrong_received(const std::vector<int32_t>& received, PairCount count = pair_count) const {
    int64_t wrong = 0;
    size_t position = 0;
    for (int source = 0; source < size_; ++source) {
      for (int64_t i = 0; i < count(source, rank_); ++i, ++position) {
        if (position >= received.size() || received[position] != pair_value(source, rank_, i)) {
          if (wrong++ < 5) {
            ADD_FAILURE() << "element " << i << " from rank " << source << ": expected "
                          << pair_value(source, rank_, i) << ", got "
                          << (position < received.size() ? std::to_string(received[position]) : "nothing");
          }
        }
      }
    }
    EXPECT_EQ(position, received.size()) << "received more elements than were sent";
    return wrong;
  }

  int rank_ = 0;
  int size_ = 0;
  uint64_t sent_before_ = 0;
  uint64_t received_before_ = 0;
};

// Runs `call`, expects Error with `code` whose message contains every one of `needles`.
template <typename Call>
void expect_error(Call&& call, ErrorCode code, const std::vector<std::string>& needles) {
  try {
    call();
    ADD_FAILURE() << "expected Error(" << error_code_name(code) << ")";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), code) << error.what();
    for (const std::string& needle : needles) {
      EXPECT_NE(std::string(error.what()).find(needle), std::string::npos)
          << "missing '" << needle << "' in: " << error.what();
    }
  }
}

TEST_F(MpiCommTest, RanksAreTheWorld) {
  EXPECT_EQ(comm().name(), "mpi");
  EXPECT_TRUE(launched_under_mpi());
  ASSERT_NE(std::getenv("OMPI_COMM_WORLD_SIZE"), nullptr);
  EXPECT_EQ(size_, std::atoi(std::getenv("OMPI_COMM_WORLD_SIZE")));
  std::vector<int32_t> expected(size_);
  std::iota(expected.begin(), expected.end(), 0);
  EXPECT_EQ(comm().all_gather_value<int32_t>(rank_), expected);
  // A duplicate of the world, not the world itself: our traffic never matches anyone else's.
  int comparison = MPI_UNEQUAL;
  EPIC_MPI_CHECK(MPI_Comm_compare(comm().mpi_comm(), MPI_COMM_WORLD, &comparison));
  EXPECT_EQ(comparison, MPI_CONGRUENT);

  // MPI is initialised now, so make_communicator gives MPI too; it does not own MPI's lifetime.
  const std::unique_ptr<Communicator> second = make_communicator(CommOptions{kTestTimeoutSeconds});
  EXPECT_EQ(second->name(), "mpi");
  EXPECT_EQ(second->rank(), rank_);
  EXPECT_EQ(second->size(), size_);
  second->barrier();
}

TEST_F(MpiCommTest, AllToAllVBytesHonoursOffsets) {
  // Send side: blocks in reverse destination order, one filler element before each. Receive side: blocks
  // in source order, two sentinels before each, that must survive.
  constexpr int32_t kFiller = -1;
  constexpr int32_t kSentinel = -7;
  const int64_t word = sizeof(int32_t);
  std::vector<int32_t> send;
  std::vector<int64_t> send_bytes(size_), send_offsets(size_);
  for (int destination = size_ - 1; destination >= 0; --destination) {
    send.push_back(kFiller);
    send_offsets[destination] = static_cast<int64_t>(send.size()) * word;
    send_bytes[destination] = pair_count(rank_, destination) * word;
    for (int64_t i = 0; i < pair_count(rank_, destination); ++i)
      send.push_back(pair_value(rank_, destination, i));
  }
  std::vector<int64_t> recv_bytes(size_), recv_offsets(size_);
  int64_t recv_elements = 0;
  for (int source = 0; source < size_; ++source) {
    recv_elements += 2;
    recv_offsets[source] = recv_elements * word;
    recv_bytes[source] = pair_count(source, rank_) * word;
    recv_elements += pair_count(source, rank_);
  }
  std::vector<int32_t> recv(recv_elements, kSentinel);

  comm().all_to_all_v(send.data(), send_bytes, send_offsets, recv.data(), recv_bytes, recv_offsets);

  int64_t wrong = 0;
  for (int source = 0; source < size_; ++source) {
    const int64_t first = recv_offsets[source] / word;
    wrong += (recv[first - 2] != kSentinel) + (recv[first - 1] != kSentinel);
    for (int64_t i = 0; i < pair_count(source, rank_); ++i)
      wrong += recv[first + i] != pair_value(source, rank_, i);
  }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(sent_in_test(), pair_bytes_sent(word));
  EXPECT_EQ(received_in_test(), pair_bytes_received(word));
}

TEST_F(MpiCommTest, TypedAllToAllVExchangesCountsAndRoundTrips) {
  std::vector<int64_t> send_counts;
  const std::vector<int32_t> send = pair_send_data(&send_counts);
  std::vector<int64_t> recv_counts;
  const std::vector<int32_t> received =
      comm().all_to_all_v(std::span<const int32_t>(send), send_counts, &recv_counts);
  ASSERT_EQ(recv_counts.size(), static_cast<size_t>(size_));
  for (int source = 0; source < size_; ++source) EXPECT_EQ(recv_counts[source], pair_count(source, rank_));
  EXPECT_EQ(count_wrong_received(received), 0);
  // The counts exchange moves one int64 per pair, then the data.
  const uint64_t count_bytes = sizeof(int64_t) * (size_ - 1);
  EXPECT_EQ(sent_in_test(), count_bytes + pair_bytes_sent(sizeof(int32_t)));
  EXPECT_EQ(received_in_test(), count_bytes + pair_bytes_received(sizeof(int32_t)));

  // The reverse exchange with known counts gives every rank its own data back, as a combine does.
  const std::vector<int32_t> returned =
      comm().all_to_all_v_known(std::span<const int32_t>(received), recv_counts, send_counts);
  EXPECT_EQ(returned, send);
  const uint64_t data_bytes = pair_bytes_sent(sizeof(int32_t)) + pair_bytes_received(sizeof(int32_t));
  EXPECT_EQ(sent_in_test(), count_bytes + data_bytes);
  EXPECT_EQ(received_in_test(), count_bytes + data_bytes);
}

TEST_F(MpiCommTest, LargeAllToAllVIsExact) {
  // About 0.5 MiB per pair: past the eager limit, so the rendezvous path runs under the polling wait.
  auto large_count = [](int source, int destination) -> int64_t {
    return 65536 + source * 7 + destination * 13;
  };
  auto large_value = [](int source, int destination, int64_t index) -> int64_t {
    return source * 1000000000LL + destination * 1000000LL + index;
  };
  std::vector<int64_t> send_counts(size_);
  std::vector<int64_t> send;
  for (int destination = 0; destination < size_; ++destination) {
    send_counts[destination] = large_count(rank_, destination);
    for (int64_t i = 0; i < send_counts[destination]; ++i) send.push_back(large_value(rank_, destination, i));
  }
  std::vector<int64_t> recv_counts(size_);
  for (int source = 0; source < size_; ++source) recv_counts[source] = large_count(source, rank_);
  const std::vector<int64_t> received =
      comm().all_to_all_v_known(std::span<const int64_t>(send), send_counts, recv_counts);
  int64_t wrong = 0;
  size_t position = 0;
  for (int source = 0; source < size_; ++source) {
    for (int64_t i = 0; i < recv_counts[source]; ++i, ++position) {
      wrong += position >= received.size() || received[position] != large_value(source, rank_, i);
    }
  }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(position, received.size());
  uint64_t expected_sent = 0, expected_received = 0;
  for (int peer = 0; peer < size_; ++peer) {
    if (peer == rank_) continue;
    expected_sent += large_count(rank_, peer) * sizeof(int64_t);
    expected_received += large_count(peer, rank_) * sizeof(int64_t);
  }
  EXPECT_EQ(sent_in_test(), expected_sent);
  EXPECT_EQ(received_in_test(), expected_received);
}

TEST_F(MpiCommTest, AllGatherBytes) {
  const std::vector<int32_t> mine = {rank_ * 1000, rank_ * 1000 + 1, rank_ * 1000 + 2};
  std::vector<int32_t> gathered(3 * size_, -1);
  comm().all_gather(mine.data(), 3 * sizeof(int32_t), gathered.data());
  for (int source = 0; source < size_; ++source) {
    for (int i = 0; i < 3; ++i)
      EXPECT_EQ(gathered[3 * source + i], source * 1000 + i) << "from rank " << source;
  }
  comm().all_gather(nullptr, 0, nullptr);  // empty contributions are legal
  EXPECT_EQ(sent_in_test(), 3 * sizeof(int32_t) * (size_ - 1));
  EXPECT_EQ(received_in_test(), 3 * sizeof(int32_t) * (size_ - 1));
}

TEST_F(MpiCommTest, AllGatherValueOfAStruct) {
  struct Load {
    int32_t rank;
    double tokens;
  };
  const std::vector<Load> loads = comm().all_gather_value(Load{rank_, rank_ * 1.5 + 0.25});
  ASSERT_EQ(loads.size(), static_cast<size_t>(size_));
  for (int source = 0; source < size_; ++source) {
    EXPECT_EQ(loads[source].rank, source);
    EXPECT_EQ(loads[source].tokens, source * 1.5 + 0.25);
  }
  EXPECT_EQ(sent_in_test(), sizeof(Load) * (size_ - 1));
  EXPECT_EQ(received_in_test(), sizeof(Load) * (size_ - 1));
}

TEST_F(MpiCommTest, AllGatherVUnevenWithEmpty) {
  auto gather_count = [](int rank) -> int64_t { return (rank * 2) % 5; };  // rank 0 contributes nothing
  std::vector<int32_t> mine;
  for (int64_t i = 0; i < gather_count(rank_); ++i) mine.push_back(rank_ * 1000 + static_cast<int32_t>(i));
  const std::vector<std::vector<int32_t>> gathered = comm().all_gather_v(std::span<const int32_t>(mine));
  ASSERT_EQ(gathered.size(), static_cast<size_t>(size_));
  uint64_t expected_received = 0;
  for (int source = 0; source < size_; ++source) {
    ASSERT_EQ(static_cast<int64_t>(gathered[source].size()), gather_count(source)) << "from rank " << source;
    for (int64_t i = 0; i < gather_count(source); ++i) EXPECT_EQ(gathered[source][i], source * 1000 + i);
    if (source != rank_) expected_received += gather_count(source) * sizeof(int32_t);
  }
  // The sizes go first as one int64 per rank.
  EXPECT_EQ(sent_in_test(),
            sizeof(int64_t) * (size_ - 1) + gather_count(rank_) * sizeof(int32_t) * (size_ - 1));
  EXPECT_EQ(received_in_test(), sizeof(int64_t) * (size_ - 1) + expected_received);
}

TEST_F(MpiCommTest, BroadcastFromTheLastRank) {
  const int root = size_ - 1;  // a non-zero root whenever there are two ranks or more
  std::vector<double> data(5, std::nan(""));
  if (rank_ == root) {
    for (int i = 0; i < 5; ++i) data[i] = root * 10 + i + 0.5;
  }
  comm().broadcast(data.data(), data.size() * sizeof(double), root);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(data[i], root * 10 + i + 0.5);
  const uint64_t bytes = 5 * sizeof(double);
  EXPECT_EQ(sent_in_test(), rank_ == root ? bytes * (size_ - 1) : 0);
  EXPECT_EQ(received_in_test(), rank_ == root ? 0 : bytes);
}

TEST_F(MpiCommTest, BroadcastBytesOfABinaryString) {
  const int root = 1 % size_;
  std::string binary;
  for (int byte = 0; byte < 256; ++byte) binary.push_back(static_cast<char>(byte));
  binary += std::string("\0\0end\0", 6);
  const std::string result =
      comm().broadcast_bytes(rank_ == root ? binary : std::string("not the root"), root);
  EXPECT_EQ(result.size(), binary.size());
  EXPECT_EQ(result, binary);
  // The length (one int64) goes first.
  const uint64_t bytes = sizeof(int64_t) + binary.size();
  EXPECT_EQ(sent_in_test(), rank_ == root ? bytes * (size_ - 1) : 0);
  EXPECT_EQ(received_in_test(), rank_ == root ? 0 : bytes);
}

// ---- Payloads of any size: no MPI call carries more than CommOptions::max_message_bytes ----
// Each test runs on communicators with a lowered piece size, so small payloads cross piece boundaries
// the way real payloads past MPI's int counts do (the same code, only the size differs). Sizes and
// bytes come from one fresh seed per test, the same on every rank, so every receiver knows exactly
// what each sender sent; receive buffers start as the complement of what must arrive, so a byte left
// untouched never passes.

// Drawn on rank 0 (EPIC_TEST_SEED replays a failure) and broadcast on the main communicator.
uint64_t shared_seed(Communicator& comm) {
  uint64_t seed = 0;
  if (comm.rank() == 0) {
    if (const char* text = std::getenv("EPIC_TEST_SEED")) {
      seed = std::strtoull(text, nullptr, 10);
    } else {
      std::random_device device;
      seed = (static_cast<uint64_t>(device()) << 32) ^ device();
    }
  }
  comm.broadcast(&seed, sizeof(seed), 0);
  return seed;
}

std::string seed_trace(uint64_t seed) {
  return "seed " + std::to_string(seed) + " (replay with EPIC_TEST_SEED=" + std::to_string(seed) + ")";
}

// A generator for one purpose of one test: the seed mixed with what it is for.
std::mt19937_64 generator(uint64_t seed, std::initializer_list<int64_t> purpose) {
  std::vector<uint32_t> words = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  for (int64_t part : purpose) words.push_back(static_cast<uint32_t>(part));
  std::seed_seq sequence(words.begin(), words.end());
  return std::mt19937_64(sequence);
}

std::vector<std::byte> random_bytes(uint64_t seed, std::initializer_list<int64_t> purpose, int64_t count) {
  std::mt19937_64 bytes = generator(seed, purpose);
  std::vector<std::byte> values(static_cast<size_t>(count));
  for (std::byte& value : values) value = static_cast<std::byte>(bytes() >> 56);
  return values;
}

// Block sizes on and around piece boundaries, empty included.
int64_t boundary_size(std::mt19937_64& draw, int64_t piece) {
  const int64_t sizes[] = {0,
                           1,
                           piece - 1,
                           piece,
                           piece + 1,
                           2 * piece,
                           3 * piece + static_cast<int64_t>(draw() % static_cast<uint64_t>(piece))};
  return sizes[draw() % std::size(sizes)];
}

// Piece sizes: tiny (many pieces per block, floats split across pieces), small, and past the shared-
// memory transport's eager limit (each piece goes by rendezvous, as real pieces do).
int64_t piece_size(uint64_t seed, int kind) {
  std::mt19937_64 draw = generator(seed, {kind, 7});
  const int64_t bounds[3][2] = {{1, 16}, {17, 300}, {40000, 70000}};
  return bounds[kind][0] + static_cast<int64_t>(draw() % (bounds[kind][1] - bounds[kind][0] + 1));
}
constexpr int kPieceKinds = 3;

// Counts the bytes of `actual` that differ from `expected`, reporting the first few.
int64_t count_wrong_bytes(const std::byte* actual, const std::vector<std::byte>& expected,
                          const std::string& what) {
  int64_t wrong = 0;
  for (size_t index = 0; index < expected.size(); ++index) {
    if (actual[index] == expected[index]) continue;
    if (wrong++ < 3) {
      ADD_FAILURE() << what << ": byte " << index << " of " << expected.size() << " is "
                    << static_cast<int>(actual[index]) << ", expected " << static_cast<int>(expected[index]);
    }
  }
  return wrong;
}

std::vector<std::byte> complement(const std::vector<std::byte>& bytes) {
  std::vector<std::byte> flipped(bytes.size());
  for (size_t index = 0; index < bytes.size(); ++index) flipped[index] = ~bytes[index];
  return flipped;
}

TEST_F(MpiCommTest, AllToAllVInPiecesIsExactAcrossPieceBoundaries) {
  const uint64_t seed = shared_seed(comm());
  SCOPED_TRACE(seed_trace(seed));
  // Three patterns: every pair random; a gather to one root (the results of finished sequences); a
  // scatter from it. Sizes differ per pair and include empty blocks and empty ranks.
  enum Pattern : int { kEveryPair, kGatherToRoot, kScatterFromRoot };
  for (int kind = 0; kind < kPieceKinds; ++kind) {
    const int64_t piece = piece_size(seed, kind);
    MpiCommunicator pieces(CommOptions{kTestTimeoutSeconds, piece});
    for (int pattern : {kEveryPair, kGatherToRoot, kScatterFromRoot}) {
      SCOPED_TRACE("max_message_bytes " + std::to_string(piece) + ", pattern " + std::to_string(pattern));
      const int root = static_cast<int>(seed % static_cast<uint64_t>(size_));
      // Every rank draws the whole table in the same order, so receivers know what senders send.
      std::mt19937_64 sizes = generator(seed, {kind, pattern, 1});
      std::vector<std::vector<int64_t>> block(size_, std::vector<int64_t>(size_));
      for (int source = 0; source < size_; ++source) {
        for (int destination = 0; destination < size_; ++destination) {
          const int64_t size = boundary_size(sizes, piece);
          const bool used = pattern == kEveryPair || (pattern == kGatherToRoot && destination == root) ||
                            (pattern == kScatterFromRoot && source == root);
          block[source][destination] = used ? size : 0;
        }
      }
      auto block_bytes = [&](int source, int destination) {
        return random_bytes(seed, {kind, pattern, source, destination}, block[source][destination]);
      };
      // Send blocks in reverse rank order with random gaps between; receive blocks in rank order with
      // gaps whose bytes must survive.
      std::mt19937_64 gaps = generator(seed, {kind, pattern, 2, rank_});
      std::vector<std::byte> send;
      std::vector<int64_t> send_bytes(size_), send_offsets(size_);
      for (int destination = size_ - 1; destination >= 0; --destination) {
        send.resize(send.size() + gaps() % 5, std::byte{0x5a});
        send_offsets[destination] = static_cast<int64_t>(send.size());
        send_bytes[destination] = block[rank_][destination];
        const std::vector<std::byte> bytes = block_bytes(rank_, destination);
        send.insert(send.end(), bytes.begin(), bytes.end());
      }
      std::vector<std::byte> recv;
      std::vector<int64_t> recv_bytes(size_), recv_offsets(size_);
      std::vector<std::vector<std::byte>> expected(size_);
      for (int source = 0; source < size_; ++source) {
        const std::vector<std::byte> gap =
            random_bytes(seed, {kind, pattern, 3, rank_, source}, 1 + source % 3);
        recv.insert(recv.end(), gap.begin(), gap.end());
        expected[source] = block_bytes(source, rank_);
        recv_offsets[source] = static_cast<int64_t>(recv.size());
        recv_bytes[source] = block[source][rank_];
        const std::vector<std::byte> untouched = complement(expected[source]);
        recv.insert(recv.end(), untouched.begin(), untouched.end());
      }
      const uint64_t sent_before = pieces.bytes_sent();
      const uint64_t received_before = pieces.bytes_received();

      pieces.all_to_all_v(send.data(), send_bytes, send_offsets, recv.data(), recv_bytes, recv_offsets);

      int64_t wrong = 0;
      uint64_t expected_sent = 0, expected_received = 0;
      for (int source = 0; source < size_; ++source) {
        wrong += count_wrong_bytes(recv.data() + recv_offsets[source], expected[source],
                                   "block from rank " + std::to_string(source));
        const std::vector<std::byte> gap =
            random_bytes(seed, {kind, pattern, 3, rank_, source}, 1 + source % 3);
        wrong += count_wrong_bytes(recv.data() + recv_offsets[source] - static_cast<int64_t>(gap.size()), gap,
                                   "gap before the block from rank " + std::to_string(source));
        if (source != rank_) {
          expected_sent += static_cast<uint64_t>(block[rank_][source]);
          expected_received += static_cast<uint64_t>(block[source][rank_]);
        }
      }
      EXPECT_EQ(wrong, 0);
      EXPECT_EQ(pieces.bytes_sent() - sent_before, expected_sent);
      EXPECT_EQ(pieces.bytes_received() - received_before, expected_received);
    }
  }
}

TEST_F(MpiCommTest, AllGatherAndBroadcastInPiecesAreExactAcrossPieceBoundaries) {
  const uint64_t seed = shared_seed(comm());
  SCOPED_TRACE(seed_trace(seed));
  for (int kind = 0; kind < kPieceKinds; ++kind) {
    const int64_t piece = piece_size(seed, kind);
    MpiCommunicator pieces(CommOptions{kTestTimeoutSeconds, piece});
    std::mt19937_64 sizes = generator(seed, {kind, 10});
    // Every boundary size once, then random ones; all ranks draw the same.
    std::vector<int64_t> payloads = {0, 1, piece - 1, piece, piece + 1, 2 * piece, 3 * piece + 1};
    for (int extra = 0; extra < 3; ++extra) payloads.push_back(boundary_size(sizes, piece));
    for (size_t call = 0; call < payloads.size(); ++call) {
      const int64_t bytes = payloads[call];
      SCOPED_TRACE("max_message_bytes " + std::to_string(piece) + ", " + std::to_string(bytes) + " bytes");
      const int64_t index = static_cast<int64_t>(call);
      const std::vector<std::byte> mine = random_bytes(seed, {kind, 11, index, rank_}, bytes);
      std::vector<std::byte> expected;
      for (int source = 0; source < size_; ++source) {
        const std::vector<std::byte> theirs = random_bytes(seed, {kind, 11, index, source}, bytes);
        expected.insert(expected.end(), theirs.begin(), theirs.end());
      }
      std::vector<std::byte> gathered = complement(expected);
      const uint64_t sent_before = pieces.bytes_sent();
      pieces.all_gather(mine.data(), bytes, gathered.data());
      EXPECT_EQ(count_wrong_bytes(gathered.data(), expected, "all_gather"), 0);
      EXPECT_EQ(pieces.bytes_sent() - sent_before, static_cast<uint64_t>(bytes) * (size_ - 1));

      const int root = static_cast<int>(call % static_cast<size_t>(size_));
      const std::vector<std::byte> root_bytes = random_bytes(seed, {kind, 12, index}, bytes);
      std::vector<std::byte> data = rank_ == root ? root_bytes : complement(root_bytes);
      const uint64_t received_before = pieces.bytes_received();
      pieces.broadcast(data.data(), bytes, root);
      EXPECT_EQ(count_wrong_bytes(data.data(), root_bytes, "broadcast from rank " + std::to_string(root)), 0);
      EXPECT_EQ(pieces.bytes_received() - received_before, rank_ == root ? 0u : static_cast<uint64_t>(bytes));
    }
  }
}

TEST_F(MpiCommTest, TypedHelpersInPiecesCarryUnevenPayloadsIncludingEmpty) {
  const uint64_t seed = shared_seed(comm());
  SCOPED_TRACE(seed_trace(seed));
  const int64_t piece = piece_size(seed, 0);  // tiny: every float of a non-empty block may straddle pieces
  MpiCommunicator pieces(CommOptions{kTestTimeoutSeconds, piece});
  SCOPED_TRACE("max_message_bytes " + std::to_string(piece));
  // Rank r contributes a different number of random, non-zero floats; the seed picks one empty rank.
  const int empty_rank = static_cast<int>((seed >> 8) % static_cast<uint64_t>(size_));
  auto contribution = [&](int rank) {
    std::mt19937_64 draw = generator(seed, {20, rank});
    const int64_t count = rank == empty_rank ? 0 : 1 + static_cast<int64_t>(draw() % 97);
    std::uniform_real_distribution<float> magnitude(0.5f, 2.0f);
    std::vector<float> values(static_cast<size_t>(count));
    for (float& value : values) value = (draw() & 1 ? 1.0f : -1.0f) * magnitude(draw);
    return values;
  };
  const std::vector<std::vector<float>> gathered =
      pieces.all_gather_v(std::span<const float>(contribution(rank_)));
  ASSERT_EQ(gathered.size(), static_cast<size_t>(size_));
  for (int source = 0; source < size_; ++source) EXPECT_EQ(gathered[source], contribution(source)) << source;

  // A serialised plan or report: a binary string, NULs included, in pieces.
  const int root = size_ - 1;
  std::string text;
  std::mt19937_64 draw = generator(seed, {21});
  for (int64_t index = 0, length = 3 * piece + 5; index < length; ++index)
    text.push_back(static_cast<char>(draw() >> 56));
  EXPECT_EQ(pieces.broadcast_bytes(rank_ == root ? text : std::string("not the root"), root), text);
}

TEST_F(MpiCommTest, RanksThatSplitPayloadsDifferentlyFailTogether) {
  if (size_ < 2) GTEST_SKIP() << "needs two ranks to disagree";
  // Rank 0 splits at 5 bytes, the others at 6: every rank fails at creation, with the same reason.
  expect_error(
      [&] {
        MpiCommunicator never_built(CommOptions{kTestTimeoutSeconds, rank_ == 0 ? 5 : 6});
      },
      ErrorCode::kInvalidArgument,
      {"rank " + std::to_string(rank_) +
       ": ranks split payloads at different sizes: rank 0 has "
       "max_message_bytes 5, rank 1 has 6"});
}

// A real payload past 2^31 bytes with the default pieces (1 GiB): about 4.3 GB per rank at a time (the
// caller's buffer and the communicator's staging). Off unless EPIC_TEST_LARGE_PAYLOAD_BYTES gives the
// size (e.g. 2147487747, 2^31 + 4099), for a machine with the memory; the tests above cover the same
// code with small pieces.
TEST_F(MpiCommTest, PayloadsPastTwoGiBWithDefaultPieces) {
  const char* text = std::getenv("EPIC_TEST_LARGE_PAYLOAD_BYTES");
  if (text == nullptr || size_ < 2) GTEST_SKIP() << "set EPIC_TEST_LARGE_PAYLOAD_BYTES (2 ranks or more)";
  const int64_t bytes = std::strtoll(text, nullptr, 10);
  ASSERT_GT(bytes, 0);
  const uint64_t seed = shared_seed(comm());
  SCOPED_TRACE(seed_trace(seed));
  // Word `index` (8 bytes) of payload `salt`, splitmix64: checked word by word without a second copy.
  auto word_at = [&](uint64_t salt, int64_t index) {
    uint64_t word =
        seed + salt * 0xD1B54A32D192ED03ull + static_cast<uint64_t>(index + 1) * 0x9E3779B97F4A7C15ull;
    word = (word ^ (word >> 30)) * 0xBF58476D1CE4E5B9ull;
    word = (word ^ (word >> 27)) * 0x94D049BB133111EBull;
    return word ^ (word >> 31);
  };
  auto fill = [&](uint64_t salt) {
    std::vector<std::byte> values(static_cast<size_t>(bytes));
    for (int64_t at = 0; at < bytes; at += 8) {
      const uint64_t word = word_at(salt, at / 8);
      std::memcpy(values.data() + at, &word, static_cast<size_t>(std::min<int64_t>(8, bytes - at)));
    }
    return values;
  };
  auto count_wrong_words = [&](const std::vector<std::byte>& values, uint64_t salt) {
    int64_t wrong = 0;
    for (int64_t at = 0; at < bytes; at += 8) {
      const size_t length = static_cast<size_t>(std::min<int64_t>(8, bytes - at));
      const uint64_t expected = word_at(salt, at / 8);
      wrong += std::memcmp(values.data() + at, &expected, length) != 0;
    }
    return wrong;
  };
  MpiCommunicator defaults(CommOptions{600.0});
  ASSERT_EQ(defaults.options().max_message_bytes, int64_t{1} << 30);
  // The results gather: rank 1 sends rank 0 one block of `bytes`.
  {
    std::vector<int64_t> send_bytes(size_, 0), recv_bytes(size_, 0);
    const std::vector<int64_t> offsets(size_, 0);
    std::vector<std::byte> send, recv;
    if (rank_ == 1) {
      send = fill(1);
      send_bytes[0] = bytes;
    }
    if (rank_ == 0) {
      recv.assign(static_cast<size_t>(bytes), std::byte{0});
      recv_bytes[1] = bytes;
    }
    defaults.all_to_all_v(send.data(), send_bytes, offsets, recv.data(), recv_bytes, offsets);
    if (rank_ == 0) {
      EXPECT_EQ(count_wrong_words(recv, 1), 0) << "all_to_all_v from rank 1";
    }
  }
  // A broadcast of the same size from rank 1.
  {
    std::vector<std::byte> data = rank_ == 1 ? fill(2) : std::vector<std::byte>(static_cast<size_t>(bytes));
    defaults.broadcast(data.data(), bytes, 1);
    EXPECT_EQ(count_wrong_words(data, 2), 0) << "broadcast from rank 1";
  }
  EXPECT_EQ(defaults.bytes_sent(), rank_ == 1 ? static_cast<uint64_t>(bytes) * size_ : 0u);
}

TEST_F(MpiCommTest, BadArgumentsFailLocallyBeforeAnyCollective) {
  // Every rank makes the same bad calls; none may start a collective (nobody would match it).
  std::vector<char> buffer(16);
  const std::vector<int64_t> zeros(size_, 0);
  const std::vector<int64_t> too_few(size_ + 1, 0);
  expect_error([&] { comm().all_to_all_v(buffer.data(), too_few, zeros, buffer.data(), zeros, zeros); },
               ErrorCode::kInvalidArgument, {"rank " + std::to_string(rank_), "send_bytes has"});
  std::vector<int64_t> self_mismatch(size_, 0);
  self_mismatch[rank_] = 4;
  expect_error([&] { comm().all_to_all_v(buffer.data(), self_mismatch, zeros, buffer.data(), zeros, zeros); },
               ErrorCode::kInvalidArgument, {"sends 4 bytes to itself but expects to receive 0"});
  expect_error([&] { comm().broadcast(buffer.data(), 4, size_); }, ErrorCode::kInvalidArgument,
               {"root " + std::to_string(size_)});
  {
    // Payloads have no size limit left but the number of MPI requests one MPI_Testall takes (an int):
    // at one byte per message, 3e9 bytes is too many messages. Checked before anything is allocated.
    MpiCommunicator one_byte_messages(CommOptions{kTestTimeoutSeconds, 1});
    const int64_t started_before = one_byte_messages.collectives_started();
    expect_error(
        [&] { one_byte_messages.all_gather(nullptr, 3000000000LL, nullptr); }, ErrorCode::kInvalidArgument,
        {"rank " + std::to_string(rank_) + ": all_gather would need 3000000000 MPI messages of at most 1",
         "raise max_message_bytes"});
    expect_error([&] { one_byte_messages.broadcast(nullptr, 3000000000LL, 0); }, ErrorCode::kInvalidArgument,
                 {"broadcast would need 3000000000 MPI messages"});
    if (size_ > 1) {
      const int peer = (rank_ + 1) % size_;
      std::vector<int64_t> huge(size_, 0);
      huge[peer] = 3000000000LL;
      expect_error([&] { one_byte_messages.all_to_all_v(nullptr, huge, zeros, buffer.data(), zeros, zeros); },
                   ErrorCode::kInvalidArgument, {"all_to_all_v would need 3000000000 MPI messages"});
    }
    EXPECT_EQ(one_byte_messages.collectives_started(), started_before);
  }
  expect_error(
      [&] {
        MpiCommunicator never_built(CommOptions{kTestTimeoutSeconds, 0});
      },
      ErrorCode::kInvalidArgument,
      {"CommOptions::max_message_bytes must be 1 to 2147483647 bytes (MPI counts are int), got 0"});
  expect_error(
      [&] {
        MpiCommunicator never_built(CommOptions{kTestTimeoutSeconds, 2147483648LL});
      },
      ErrorCode::kInvalidArgument, {"got 2147483648"});
  expect_error([&] { comm().set_timeout_seconds(0.0); }, ErrorCode::kInvalidArgument, {"timeout_seconds"});
  expect_error([&] { MpiCommunicator never_built(CommOptions{-1.0}); }, ErrorCode::kInvalidArgument,
               {"timeout_seconds must be a positive number of seconds, got -1"});
  EXPECT_EQ(comm().options().timeout_seconds, kTestTimeoutSeconds);
  EXPECT_FALSE(comm().has_pending_operation());
  EXPECT_EQ(sent_in_test(), 0u);
  EXPECT_EQ(received_in_test(), 0u);
}

TEST_F(MpiCommTest, MpiCheckNamesStatementPlaceRankAndMpiError) {
  // A negative count is rejected by MPI itself; the communicator's MPI_ERRORS_RETURN hands it back to us.
  expect_error([&] { EPIC_MPI_CHECK(MPI_Send(nullptr, -1, MPI_BYTE, 0, 0, comm().mpi_comm())); },
               ErrorCode::kCommunication,
               {"MPI_Send(nullptr, -1, MPI_BYTE, 0, 0, comm().mpi_comm())",
                "mpi_communicator_test.cpp:", "rank " + std::to_string(rank_), "MPI_ERR_COUNT"});
}

TEST_F(MpiCommTest, TimeoutNamesRankAndOperationThenRanksResynchronise) {
  if (size_ < 2) GTEST_SKIP() << "needs a peer that stays away";
  // Its own communicator with a short timeout (a separate MPI context, so the main one is unaffected).
  // Rank 0, which joins late, keeps a long timeout: only the others are meant to time out.
  MpiCommunicator short_comm(CommOptions{rank_ == 0 ? kTestTimeoutSeconds : kShortTimeoutSeconds});
  std::vector<int64_t> send_counts;
  // Every pair non-empty: MPI may complete a collective locally when a rank needs nothing from the
  // missing peer, and then there would be nothing to time out.
  const std::vector<int32_t> send = pair_send_data(&send_counts, full_pair_count);
  std::vector<int64_t> recv_counts(size_);
  for (int source = 0; source < size_; ++source) recv_counts[source] = full_pair_count(source, rank_);
  const std::string me = "rank " + std::to_string(rank_) + ": ";

  // 1. Rank 0 stays away from an all_to_all_v the others enter: they time out.
  if (rank_ != 0) {
    {
      // Buffers that die with this scope: the pending operation may touch only the communicator's copies.
      const std::vector<int32_t> scoped_send = send;
      const auto start = std::chrono::steady_clock::now();
      const Communicator::Activity activity(short_comm, "test exchange");
      // Numbered and labelled; the rank that stayed away is named with what it does instead (it waits in
      // a barrier of the first communicator), seen through the host's PeerMonitor.
      expect_error(
          [&] {
            short_comm.all_to_all_v_known(std::span<const int32_t>(scoped_send), send_counts, recv_counts);
          },
          ErrorCode::kTimeout,
          {me + "all_to_all_v #1 (test exchange) did not complete within 0.5 s", "stuck or dead",
           "rank 0 (pid ", "waiting in barrier #", "of communicator 0"});
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_GE(waited, kShortTimeoutSeconds * 0.9);
      EXPECT_LT(waited, kShortTimeoutSeconds + 5.0);
    }
    EXPECT_EQ(short_comm.activity(), "") << "Activity restores the previous name";
    EXPECT_TRUE(short_comm.has_pending_operation());
    // The next collective first waits for the stuck one, and says which one.
    expect_error([&] { short_comm.barrier(); }, ErrorCode::kTimeout,
                 {me + "barrier could not start: the earlier all_to_all_v"});
  }
  // The resynchronisation must not depend on how fast an oversubscribed machine schedules rank 0.
  short_comm.set_timeout_seconds(kTestTimeoutSeconds);
  comm().barrier();  // rank 0 waits here until every other rank has timed out twice
  // 2. Rank 0 joins late; its call completes the others' pending operation and gets their real data.
  if (rank_ == 0) {
    const std::vector<int32_t> received =
        short_comm.all_to_all_v_known(std::span<const int32_t>(send), send_counts, recv_counts);
    EXPECT_EQ(count_wrong_received(received, full_pair_count), 0);
  }
  short_comm.barrier();  // the others complete their pending all_to_all_v first
  EXPECT_FALSE(short_comm.has_pending_operation());
  // The late operation moved its bytes, so the counters include it on every rank.
  EXPECT_EQ(short_comm.bytes_sent(), pair_bytes_sent(sizeof(int32_t), full_pair_count));
  EXPECT_EQ(short_comm.bytes_received(), pair_bytes_received(sizeof(int32_t), full_pair_count));

  // 3. The same with a barrier, the operation without buffers.
  if (rank_ != 0) {
    short_comm.set_timeout_seconds(kShortTimeoutSeconds);
    expect_error([&] { short_comm.barrier(); }, ErrorCode::kTimeout,
                 {me + "barrier #3 did not complete within 0.5 s", "rank 0 (pid "});
  }
  short_comm.set_timeout_seconds(kTestTimeoutSeconds);
  comm().barrier();
  if (rank_ == 0) short_comm.barrier();  // the late partner of the others' pending barrier
  short_comm.barrier();
  EXPECT_FALSE(short_comm.has_pending_operation());
}

}  // namespace
}  // namespace epic

int main(int argc, char** argv) {
  return epic::testing::run_mpi_gtests(argc, argv, epic::kTestTimeoutSeconds);
}
