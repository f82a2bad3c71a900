// This process's resident-memory high-water mark, for the run report: the figure that shows memory
// stays bounded as the number of prompts grows.
#pragma once

#include <cstdint>

namespace epic::cli {

// VmHWM of /proc/self/status in bytes; 0 where the kernel does not provide it (not Linux).
uint64_t peak_resident_bytes();

}  // namespace epic::cli
