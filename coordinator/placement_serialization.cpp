// Placement plans as JSON (for people and `epic plan` files) and as versioned cereal bytes (for the
// coordinator -> worker wire). Both readers apply the same rules as the planner's self-check and
// rebuild the derived figures (expert_workers, worker_load) instead of trusting them.
#include <algorithm>
#include <cereal/archives/portable_binary.hpp>
#include <cereal/cereal.hpp>
#include <cmath>
#include <limits>
#include <sstream>

#include "coordinator/placement.h"
#include "coordinator/placement_rules.h"
#include "coordinator/placement_traffic.h"
#include "kernels/error.h"

namespace epic {
namespace {

using nlohmann::json;
using nlohmann::ordered_json;

constexpr const char* kPlanFormat = "epic-placement-v1";
// Bumped whenever the byte layout below changes; coordinator and workers must agree.
constexpr uint32_t kCerealVersion = 1;
// Far above any real model or cluster, low enough that a corrupt count cannot exhaust memory.
constexpr int64_t kMaxExperts = int64_t{1} << 20;
constexpr int64_t kMaxWorkers = int64_t{1} << 20;

std::string describe(const json& value) {
  std::string text = value.dump();
  if (text.size() > 120) text = text.substr(0, 120) + "...";
  return text;
}

// Reads one placement JSON document; every failure names the source, the layer and the field.
class PlanJsonReader {
 public:
  explicit PlanJsonReader(std::string source) : source_(std::move(source)) {}

  PlacementPlan read(const std::string& text) {
    json root;
    try {
      root = json::parse(text);
    } catch (const json::exception& error) {  // syntax, or a number out of double range
      fail("", std::string("not valid JSON (") + error.what() + ")");
    }
    if (!root.is_object()) fail("", "the document must be a JSON object, not " + describe(root));
    const json& format = field(root, "format", "");
    if (!format.is_string() || format.get<std::string>() != kPlanFormat) {
      fail("", "format is " + describe(format) + ", expected \"" + kPlanFormat +
                   "\" (a placement plan written by `epic plan`)");
    }
    PlacementPlan plan;
    plan.num_workers = static_cast<int>(integer(root, "num_workers", "", 1, kMaxWorkers));
    // Optional (plans made for one node have neither): the node of each worker and the model's top-k.
    if (root.contains("worker_nodes")) {
      const json& nodes = root.at("worker_nodes");
      if (!nodes.is_array() || static_cast<int>(nodes.size()) != plan.num_workers)
        fail("", "worker_nodes must be an array of " + std::to_string(plan.num_workers) +
                     " node numbers (one per worker), not " + describe(nodes));
      for (const json& node : nodes)
        plan.worker_node.push_back(
            static_cast<int>(integer_value(node, "a worker_nodes entry", "", 0, plan.num_workers - 1)));
      plan.experts_per_token = integer(root, "experts_per_token", "", 1, 1 << 20);
    }
    const json& layers = field(root, "layers", "");
    if (!layers.is_array()) fail("", "layers must be an array, not " + describe(layers));
    for (const json& entry : layers) {
      if (!entry.is_object()) fail("", "each entry of layers must be an object, not " + describe(entry));
      LayerPlacement layer = read_layer(entry, plan.num_workers);
      if (!plan.layers.empty() && plan.layers.back().layer >= layer.layer) {
        fail("", "layer " + std::to_string(layer.layer) + " follows layer " +
                     std::to_string(plan.layers.back().layer) +
                     "; layers must be listed once each, in ascending order");
      }
      plan.layers.push_back(std::move(layer));
    }
    return plan;
  }

 private:
  [[noreturn]] void fail(const std::string& where, const std::string& what) const {
    throw Error(ErrorCode::kInvalidArgument,
                "placement plan '" + source_ + "': " + (where.empty() ? "" : where + ": ") + what);
  }

  const json& field(const json& object, const char* key, const std::string& where) const {
    if (!object.contains(key)) fail(where, std::string("missing field \"") + key + "\"");
    return object.at(key);
  }

  int64_t integer_value(const json& value, const std::string& what, const std::string& where, int64_t minimum,
                        int64_t maximum) const {
    if (!value.is_number_integer()) fail(where, what + " must be an integer, not " + describe(value));
    if (value.is_number_unsigned() && value.get<uint64_t>() > static_cast<uint64_t>(maximum)) {
      fail(where, what + " is " + describe(value) + ", above the limit " + std::to_string(maximum));
    }
    const int64_t number = value.get<int64_t>();
    if (number < minimum || number > maximum) {
      fail(where, what + " is " + std::to_string(number) + ", outside [" + std::to_string(minimum) + ", " +
                      std::to_string(maximum) + "]");
    }
    return number;
  }

  int64_t integer(const json& object, const char* key, const std::string& where, int64_t minimum,
                  int64_t maximum) const {
    return integer_value(field(object, key, where), key, where, minimum, maximum);
  }

  LayerPlacement read_layer(const json& entry, int num_workers) const {
    LayerPlacement layer;
    layer.layer = integer(entry, "layer", "a layer entry", 0, std::numeric_limits<int64_t>::max());
    const std::string where = "layer " + std::to_string(layer.layer);
    layer.num_experts = integer(entry, "num_experts", where, 1, kMaxExperts);
    layer.slots_per_worker = integer(entry, "slots_per_worker", where, 0, kMaxExperts);

    std::vector<uint8_t> present(layer.num_experts, 1);
    if (entry.contains("masked_experts")) {
      const json& masked = entry.at("masked_experts");
      if (!masked.is_array()) fail(where, "masked_experts must be an array of expert ids");
      for (const json& id : masked) {
        const int64_t expert = integer_value(id, "masked expert id", where, 0, layer.num_experts - 1);
        if (!present[expert]) fail(where, "masked_experts lists expert " + std::to_string(expert) + " twice");
        present[expert] = 0;
      }
    }

    const json& workers = field(entry, "workers", where);
    if (!workers.is_array() || static_cast<int64_t>(workers.size()) != num_workers) {
      fail(where, "workers must be an array of " + std::to_string(num_workers) +
                      " expert lists (one per worker), not " + describe(workers));
    }
    layer.worker_experts.resize(num_workers);
    for (int worker = 0; worker < num_workers; ++worker) {
      const json& hosted = workers[worker];
      const std::string what = "an expert id of worker " + std::to_string(worker);
      if (!hosted.is_array())
        fail(where, "workers[" + std::to_string(worker) + "] must be an array of expert ids");
      for (const json& id : hosted) {
        // The expert range is checked with the other placement rules, which name the worker.
        layer.worker_experts[worker].push_back(integer_value(
            id, what, where, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()));
      }
    }

    const json& loads = field(entry, "expert_load", where);
    if (!loads.is_array() || static_cast<int64_t>(loads.size()) != layer.num_experts) {
      fail(where, "expert_load must be an array of " + std::to_string(layer.num_experts) + " numbers");
    }
    for (const json& load : loads) {
      if (!load.is_number()) fail(where, "expert_load entries must be numbers, not " + describe(load));
      layer.expert_load.push_back(load.get<double>());
    }
    // worker_load and max_over_mean_load are figures for people; they are recomputed below so a
    // hand-edited plan cannot carry stale ones.
    placement_rules::check_layer(layer, present, num_workers, "placement plan '" + source_ + "'");
    placement_rules::derive_layer_figures(layer, num_workers);
    return layer;
  }

  std::string source_;
};

void write_readable(const ordered_json& value, int indent, std::string& out) {
  const std::string inner(indent + 2, ' ');
  if (value.is_object() && !value.empty()) {
    out += "{\n";
    size_t index = 0;
    for (const auto& [key, item] : value.items()) {
      out += inner + ordered_json(key).dump() + ": ";
      write_readable(item, indent + 2, out);
      out += ++index < value.size() ? ",\n" : "\n";
    }
    out += std::string(indent, ' ') + "}";
    return;
  }
  if (value.is_array() && !value.empty()) {
    const bool flat = std::none_of(value.begin(), value.end(), [](const ordered_json& item) {
      return item.is_structured() && !item.empty();
    });
    out += flat ? "[" : "[\n";
    for (size_t index = 0; index < value.size(); ++index) {
      if (!flat) out += inner;
      write_readable(value[index], indent + 2, out);
      if (index + 1 < value.size()) out += flat ? ", " : ",\n";
    }
    out += flat ? "]" : "\n" + std::string(indent, ' ') + "]";
    return;
  }
  out += value.dump();
}

// Reads the cereal layout written by to_cereal_bytes, bounding every count by the bytes left.
class PlanBytesReader {
 public:
  explicit PlanBytesReader(const std::string& bytes) : bytes_(bytes), stream_(bytes), archive_(stream_) {}

  PlacementPlan read() {
    uint32_t version = 0;
    archive_(version);
    if (version != kCerealVersion) {
      throw Error(ErrorCode::kCommunication,
                  "placement bytes have format version " + std::to_string(version) +
                      ", but this build reads version " + std::to_string(kCerealVersion) +
                      "; run the same epic build on the coordinator and the workers");
    }
    PlacementPlan plan;
    int32_t num_workers = 0;
    archive_(num_workers);
    if (num_workers < 1 || num_workers > kMaxWorkers) {
      throw Error(ErrorCode::kInvalidArgument, "placement bytes: num_workers is " +
                                                   std::to_string(num_workers) + ", outside [1, " +
                                                   std::to_string(kMaxWorkers) + "]");
    }
    plan.num_workers = num_workers;
    const uint64_t num_layers = count(3 * sizeof(int64_t), "layers");
    for (uint64_t i = 0; i < num_layers; ++i) {
      LayerPlacement layer;
      archive_(layer.layer, layer.num_experts, layer.slots_per_worker);
      const std::string where = "placement bytes: layer " + std::to_string(layer.layer) + ": ";
      if (layer.num_experts < 1 || layer.num_experts > kMaxExperts) {
        throw Error(ErrorCode::kInvalidArgument, where + "num_experts " + std::to_string(layer.num_experts) +
                                                     " is outside [1, " + std::to_string(kMaxExperts) + "]");
      }
      if (!plan.layers.empty() && plan.layers.back().layer >= layer.layer) {
        throw Error(ErrorCode::kInvalidArgument, where + "layers are not in ascending order");
      }
      std::vector<uint8_t> present(count(1, "present flags"));
      for (uint8_t& flag : present) archive_(flag);
      layer.worker_experts.resize(num_workers);
      for (std::vector<int64_t>& hosted : layer.worker_experts) {
        hosted.resize(count(sizeof(int64_t), "expert ids"));
        for (int64_t& expert : hosted) archive_(expert);
      }
      layer.expert_load.resize(count(sizeof(double), "expert loads"));
      for (double& load : layer.expert_load) archive_(load);
      placement_rules::check_layer(layer, present, num_workers, "placement bytes");
      placement_rules::derive_layer_figures(layer, num_workers);
      plan.layers.push_back(std::move(layer));
    }
    const uint64_t left = remaining();
    if (left != 0) {
      throw Error(ErrorCode::kCommunication, "placement bytes: " + std::to_string(left) +
                                                 " unexpected bytes after the plan (corrupt or not a plan)");
    }
    return plan;
  }

 private:
  uint64_t remaining() {
    const std::streamoff position = stream_.tellg();
    return position < 0 ? 0 : bytes_.size() - static_cast<uint64_t>(position);
  }

  // A count of elements that each take at least element_bytes: more than the bytes left means
  // truncated or corrupt input, caught before anything is allocated.
  uint64_t count(uint64_t element_bytes, const char* what) {
    uint64_t value = 0;
    archive_(value);
    if (value > remaining() / element_bytes) {
      throw Error(ErrorCode::kCommunication,
                  "placement bytes are truncated or corrupt: " + std::to_string(value) + " " + what +
                      " announced, but only " + std::to_string(remaining()) + " bytes are left");
    }
    return value;
  }

  const std::string& bytes_;
  std::istringstream stream_;
  cereal::PortableBinaryInputArchive archive_;
};

}  // namespace

namespace placement_rules {

std::string readable_json(const ordered_json& value) {
  std::string out;
  write_readable(value, 0, out);
  out += "\n";
  return out;
}

}  // namespace placement_rules

std::string PlacementPlan::to_json_text() const {
  ordered_json root;
  root["format"] = kPlanFormat;
  root["num_workers"] = num_workers;
  const bool traffic = !worker_node.empty() && experts_per_token > 0;
  if (traffic) {
    root["worker_nodes"] = worker_node;
    root["experts_per_token"] = experts_per_token;
  }
  root["layers"] = ordered_json::array();
  for (const LayerPlacement& layer : layers) {
    ordered_json entry;
    entry["layer"] = layer.layer;
    entry["num_experts"] = layer.num_experts;
    entry["slots_per_worker"] = layer.slots_per_worker;
    ordered_json masked = ordered_json::array();
    const std::vector<uint8_t> present = placement_rules::present_mask(layer);
    for (int64_t expert = 0; expert < layer.num_experts; ++expert) {
      if (!present[expert]) masked.push_back(expert);
    }
    entry["masked_experts"] = masked;
    entry["workers"] = layer.worker_experts;
    entry["expert_load"] = layer.expert_load;
    entry["worker_load"] = layer.worker_load;
    entry["max_over_mean_load"] = layer.max_over_mean_load();
    if (traffic) {
      // Figures for people, like worker_load: recomputed from the lists by the reader's caller.
      const InterNodeTraffic expected = expected_inter_node_traffic(layer, worker_node, experts_per_token);
      ordered_json rows;
      rows["flat"] = expected.flat_rows_per_token;
      rows["hierarchical"] = expected.hierarchical_rows_per_token;
      entry["inter_node_rows_per_token"] = rows;
    }
    root["layers"].push_back(std::move(entry));
  }
  return placement_rules::readable_json(root);
}

PlacementPlan PlacementPlan::from_json_text(const std::string& text, const std::string& source) {
  return PlanJsonReader(source).read(text);
}

std::string PlacementPlan::to_cereal_bytes() const {
  std::ostringstream stream;
  {
    cereal::PortableBinaryOutputArchive archive(stream);
    archive(kCerealVersion, static_cast<int32_t>(num_workers), static_cast<uint64_t>(layers.size()));
    for (const LayerPlacement& layer : layers) {
      archive(layer.layer, layer.num_experts, layer.slots_per_worker);
      const std::vector<uint8_t> present = placement_rules::present_mask(layer);
      archive(static_cast<uint64_t>(present.size()));
      for (uint8_t flag : present) archive(flag);
      for (const std::vector<int64_t>& hosted : layer.worker_experts) {
        archive(static_cast<uint64_t>(hosted.size()));
        for (int64_t expert : hosted) archive(expert);
      }
      archive(static_cast<uint64_t>(layer.expert_load.size()));
      for (double load : layer.expert_load) archive(load);
    }
  }
  return stream.str();
}

PlacementPlan PlacementPlan::from_cereal_bytes(const std::string& bytes) {
  try {
    return PlanBytesReader(bytes).read();
  } catch (const cereal::Exception& error) {
    throw Error(ErrorCode::kCommunication, std::string("placement bytes are truncated or corrupt (") +
                                               error.what() + "); " + std::to_string(bytes.size()) +
                                               " bytes received; resend the plan");
  }
}

}  // namespace epic
