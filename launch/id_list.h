// Parsing "1,2,3" id lists from the command line strictly: every element an integer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace epic::cli {

// Throws Error(kInvalidArgument) naming the flag and the bad element.
std::vector<int32_t> parse_id_list(const std::string& text, const std::string& flag);
std::string join_ids(const std::vector<int32_t>& ids);

}  // namespace epic::cli
