// A test-only Backend that has memory and nothing else (every math op throws), for testing the
// weight loader without the real backends. As kDevice it imitates a GPU: its memory is still host
// memory (the test can look at it), but copy_from_host only queues the copy and runs it at
// synchronize(), reading the source then, as an asynchronous copy would; so a loader that refills
// a staging buffer before synchronising, or returns before its copies ran, loads wrong bytes. It
// also records which threads called it and how often it synchronised.
#pragma once

#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kernels/backend.h"
#include "kernels/error.h"

namespace epic::testing {

class HostMemoryBackend final : public Backend {
 public:
  explicit HostMemoryBackend(MemorySpace space = MemorySpace::kHost) : space_(space) {}

  std::string name() const override { return space_ == MemorySpace::kHost ? "host-memory" : "fake-device"; }
  MemorySpace memory_space() const override { return space_; }

  std::unique_ptr<Buffer> allocate(size_t bytes) override {
    return std::make_unique<MallocBuffer>(bytes, space_);
  }
  std::unique_ptr<Buffer> allocate_staging(size_t bytes) override {
    note_caller();
    std::lock_guard<std::mutex> lock(mutex_);
    ++num_staging_buffers_;
    return std::make_unique<MallocBuffer>(bytes, MemorySpace::kHost);
  }

  void copy_from_host(const Tensor& dst, size_t dst_offset, const void* src, size_t bytes) override {
    note_caller();
    EPIC_CHECK(dst.space == space_, ErrorCode::kInvalidArgument, "copy_from_host into " + dst.describe());
    EPIC_CHECK(dst_offset <= dst.bytes() && bytes <= dst.bytes() - dst_offset, ErrorCode::kInvalidArgument,
               "copy_from_host past the end of " + dst.describe());
    char* target = static_cast<char*>(dst.data) + dst_offset;
    if (space_ == MemorySpace::kHost) {
      std::memcpy(target, src, bytes);
      return;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.push_back({target, src, bytes});
  }
  void copy_to_host(const Tensor& src, size_t src_offset, void* dst, size_t bytes) override {
    synchronize();
    std::memcpy(dst, static_cast<const char*>(src.data) + src_offset, bytes);
  }
  void copy(const Tensor& src, const Tensor& dst) override {
    synchronize();
    std::memcpy(dst.data, src.data, src.bytes());
  }
  void synchronize() override {
    note_caller();
    std::lock_guard<std::mutex> lock(mutex_);
    for (const PendingCopy& copy : pending_) std::memcpy(copy.dst, copy.src, copy.bytes);
    pending_.clear();
    ++num_synchronize_;
  }

  // The threads that called copy_from_host, synchronize or allocate_staging.
  std::set<std::thread::id> callers() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return callers_;
  }
  size_t num_pending_copies() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return pending_.size();
  }
  int num_staging_buffers() const { return num_staging_buffers_; }

  void embed(const Tensor&, const Tensor&, const Tensor&) override { no_math("embed"); }
  void linear(const Tensor&, const Tensor&, const Tensor&) override { no_math("linear"); }
  void rms_norm(const Tensor&, const Tensor&, const Tensor&, float) override { no_math("rms_norm"); }
  void add_rms_norm(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                    float) override {
    no_math("add_rms_norm");
  }
  void qk_norm_rope(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const AttentionShape&, float,
                    double) override {
    no_math("qk_norm_rope");
  }
  void store_kv(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const AttentionShape&) override {
    no_math("store_kv");
  }
  void attention(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                 const AttentionShape&, const Tensor&) override {
    no_math("attention");
  }
  void silu_mul(const Tensor&, const Tensor&) override { no_math("silu_mul"); }
  void add(const Tensor&, const Tensor&) override { no_math("add"); }
  void gather_rows(const Tensor&, const Tensor&, const Tensor&) override { no_math("gather_rows"); }
  void argmax(const Tensor&, const Tensor&) override { no_math("argmax"); }
  void log_softmax(const Tensor&, const Tensor&) override { no_math("log_softmax"); }
  void score_rows(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&) override {
    no_math("score_rows");
  }
  void route_top_k(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, const Tensor&) override {
    no_math("route_top_k");
  }
  void group_by_expert(const Tensor&, int64_t, int64_t, const Tensor&, const Tensor&,
                       const Tensor&) override {
    no_math("group_by_expert");
  }
  void expert_ffn(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                  const Tensor&) override {
    no_math("expert_ffn");
  }
  void count_routed_slots(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&) override {
    no_math("count_routed_slots");
  }
  void combine_top_k(const Tensor&, const Tensor&, const Tensor&, const Tensor&) override {
    no_math("combine_top_k");
  }

 private:
  // malloc'd, never zeroed: the loader must write every byte it claims to.
  class MallocBuffer final : public Buffer {
   public:
    MallocBuffer(size_t bytes, MemorySpace space) : Buffer(std::malloc(bytes ? bytes : 1), bytes, space) {
      if (!data()) throw Error(ErrorCode::kUnsupported, "out of memory allocating " + std::to_string(bytes));
    }
    ~MallocBuffer() override { std::free(data()); }
  };
  struct PendingCopy {
    char* dst;
    const void* src;
    size_t bytes;
  };
  [[noreturn]] static void no_math(const char* op) {
    throw Error(ErrorCode::kUnsupported,
                std::string("HostMemoryBackend has no ") + op + ": it is for loader tests");
  }
  void note_caller() {
    std::lock_guard<std::mutex> lock(mutex_);
    callers_.insert(std::this_thread::get_id());
  }

  MemorySpace space_;
  mutable std::mutex mutex_;
  std::vector<PendingCopy> pending_;
  std::set<std::thread::id> callers_;
  int num_staging_buffers_ = 0;
  int num_synchronize_ = 0;
};

}  // namespace epic::testing
