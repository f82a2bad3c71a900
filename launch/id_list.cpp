// Strict "1,2,3" parsing: no empty elements, no signs other than a leading '-', no overflow.
#include "launch/id_list.h"

#include <charconv>
#include <sstream>

#include "kernels/error.h"

namespace epic::cli {

std::vector<int32_t> parse_id_list(const std::string& text, const std::string& flag) {
  std::vector<int32_t> ids;
  size_t start = 0;
  if (text.find_first_not_of(" \t\n") == std::string::npos)
    throw Error(ErrorCode::kInvalidArgument,
                flag + " is empty; give comma-separated token ids, e.g. " + flag + " 1,2,3");
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    std::string element = text.substr(start, end - start);
    const size_t first = element.find_first_not_of(" \t\n"), last = element.find_last_not_of(" \t\n");
    element = first == std::string::npos ? "" : element.substr(first, last - first + 1);
    int64_t value = 0;
    auto [ptr, ec] = std::from_chars(element.data(), element.data() + element.size(), value);
    if (element.empty() || ec != std::errc() || ptr != element.data() + element.size() || value < 0 ||
        value > INT32_MAX) {
      throw Error(ErrorCode::kInvalidArgument,
                  flag + ": \"" + element + "\" (element " + std::to_string(ids.size() + 1) +
                      ") is not a token id; ids are non-negative integers separated by commas");
    }
    ids.push_back(static_cast<int32_t>(value));
    start = end + 1;
  }
  return ids;
}

std::string join_ids(const std::vector<int32_t>& ids) {
  std::ostringstream out;
  for (size_t i = 0; i < ids.size(); ++i) out << (i ? "," : "") << ids[i];
  return out.str();
}

}  // namespace epic::cli
