// Reads VmHWM ("VmHWM:    123456 kB") from /proc/self/status.
#include "launch/peak_memory.h"

#include <fstream>
#include <sstream>
#include <string>

namespace epic::cli {

uint64_t peak_resident_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) != 0) continue;
    std::istringstream fields(line.substr(6));
    uint64_t kib = 0;
    fields >> kib;
    return kib * 1024;
  }
  return 0;
}

}  // namespace epic::cli
