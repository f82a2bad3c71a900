// Load profiles (tokens per layer and expert) as JSON files: written by `epic run
// --load-profile-out`, read by `epic plan`. Whether a layer's count list fits the model is checked
// by the planner, which knows the model's expert counts.
#include <cmath>

#include "coordinator/placement.h"
#include "coordinator/placement_rules.h"
#include "kernels/error.h"
#include "kernels/file_io.h"

namespace epic {
namespace {

using nlohmann::json;

constexpr const char* kProfileFormat = "epic-load-profile-v1";

[[noreturn]] void fail_profile(const std::string& source, const std::string& what) {
  throw Error(ErrorCode::kInvalidArgument, "load profile '" + source + "': " + what +
                                               " (write profiles with `epic run --load-profile-out`)");
}

std::string describe(const json& value) {
  std::string text = value.dump();
  if (text.size() > 120) text = text.substr(0, 120) + "...";
  return text;
}

// A layer key is a decimal layer index with no sign, spaces or leading zeros ("0", "17").
int64_t parse_layer_key(const std::string& key, const std::string& source) {
  const bool digits = !key.empty() && key.size() <= 18 &&
                      key.find_first_not_of("0123456789") == std::string::npos &&
                      (key == "0" || key[0] != '0');
  if (!digits) fail_profile(source, "layer key \"" + key + "\" is not a layer index (\"0\", \"1\", ...)");
  return std::stoll(key);
}

}  // namespace

std::string LoadProfile::to_json_text() const {
  nlohmann::ordered_json root;
  root["format"] = kProfileFormat;
  root["layers"] = nlohmann::ordered_json::object();
  for (const auto& [layer, counts] : load) root["layers"][std::to_string(layer)] = counts;
  return placement_rules::readable_json(root);
}

LoadProfile LoadProfile::from_json_text(const std::string& text, const std::string& source) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& error) {  // syntax, or a number out of double range
    fail_profile(source, std::string("not valid JSON (") + error.what() + ")");
  }
  if (!root.is_object()) fail_profile(source, "the document must be a JSON object, not " + describe(root));
  if (!root.contains("format") || !root.at("format").is_string() ||
      root.at("format").get<std::string>() != kProfileFormat) {
    fail_profile(source, "format is " + (root.contains("format") ? describe(root.at("format")) : "missing") +
                             ", expected \"" + kProfileFormat + "\"");
  }
  if (!root.contains("layers") || !root.at("layers").is_object()) {
    fail_profile(source, "\"layers\" must be an object mapping layer index to token counts");
  }
  LoadProfile profile;
  for (const auto& [key, counts] : root.at("layers").items()) {
    const int64_t layer = parse_layer_key(key, source);
    const std::string where = "layer " + key + ": ";
    if (!counts.is_array())
      fail_profile(source, where + "counts must be an array of numbers, not " + describe(counts));
    std::vector<double>& values = profile.load[layer];
    for (size_t expert = 0; expert < counts.size(); ++expert) {
      const json& count = counts[expert];
      if (!count.is_number()) {
        fail_profile(source, where + "count of expert " + std::to_string(expert) + " is " + describe(count) +
                                 ", not a number");
      }
      const double value = count.get<double>();
      if (!std::isfinite(value) || value < 0) {
        fail_profile(source, where + "count of expert " + std::to_string(expert) + " is " + describe(count) +
                                 "; counts must be finite and non-negative");
      }
      values.push_back(value);
    }
  }
  return profile;
}

// Through epic::files: a FIFO, directory or device is refused at once (never read or waited on),
// and the profile is written atomically, every write checked (a full disk is an error, not an
// empty file).
LoadProfile LoadProfile::load_file(const std::filesystem::path& path) {
  // A missing profile stays Error(kIo) "cannot open", as callers and tests expect.
  if (files::describe_file_type(path) == "missing")
    throw Error(ErrorCode::kIo, "load profile '" + path.string() +
                                    "': cannot open (no such file); check the path, or record one with "
                                    "`epic run --load-profile-out`");
  // A profile holds one count per (layer, expert): 64 MiB is thousands of times a real one.
  return from_json_text(files::read_file(path, "load profile", uint64_t{64} << 20), path.string());
}

void LoadProfile::save_file(const std::filesystem::path& path) const {
  files::write_file_atomically(path, to_json_text(), "load profile");
}

}  // namespace epic
