// Moves tensors from a WeightSource into backend memory, fast: reader threads pread chunks of the
// shards into pinned staging buffers while the backend copies earlier chunks to the device
// asynchronously; dtype conversion and the NaN/Inf check run on the staged chunk (no extra pass
// over memory). For host backends with no conversion the bytes go straight to their destination.
// A process reads only the tensors its plan names (a worker: the dense weights and its experts).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "worker/weight_source.h"

namespace epic {

// One tensor to load: checked against expected_shape and written, converted to dst.type, at byte
// offset dst_offset of dst (several tensors may fill one destination: the experts of a layer are
// stacked, q/k/v projections fused).
struct TensorLoad {
  std::string name;
  std::vector<int64_t> expected_shape;
  Tensor dst;
  size_t dst_offset = 0;
};

struct WeightLoadOptions {
  bool allow_nonfinite_weights = false;  // else a NaN/Inf weight is Error(kInvalidCheckpoint)
  int num_threads = 0;                    // reader threads; <= 0: min(8, hardware threads)
  size_t chunk_bytes = size_t{16} << 20;  // one staging buffer
};

struct WeightLoadStats {
  uint64_t bytes_read = 0;     // source bytes read
  uint64_t bytes_written = 0;  // destination bytes written (differs when converting)
  double seconds = 0;
};

// Throws Error(kInvalidCheckpoint) for an absent tensor, a shape other than expected_shape or a
// dtype that is not F32/F16/BF16 (naming the file, tensor, found and expected shape), and, unless
// allowed, a NaN or Inf value (naming tensor, location and element index); Error(kInvalidArgument)
// when a destination range falls outside its tensor. Conversions: any of F32/F16/BF16 to F32 or
// BF16 (round to nearest even).
WeightLoadStats load_tensors(WeightSource& source, Backend& backend, const std::vector<TensorLoad>& loads,
                             const WeightLoadOptions& options);

}  // namespace epic
