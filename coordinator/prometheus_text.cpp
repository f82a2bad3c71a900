// Prometheus text lines (prometheus_text.h).
#include "coordinator/prometheus_text.h"

#include <cmath>
#include <cstdio>

namespace epic {

void PrometheusText::family(const std::string& name, const char* type, const std::string& help) {
  text_ += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void PrometheusText::sample(const std::string& name, const std::string& labels, double value) {
  char number[64];
  if (std::isfinite(value) && value == std::floor(value) && std::fabs(value) < 9e15)
    std::snprintf(number, sizeof(number), "%.0f", value);
  else
    std::snprintf(number, sizeof(number), "%.17g", value);
  text_ += name + labels + " " + number + "\n";
}

void append_kv_cache_metrics(PrometheusText& out, const std::vector<int64_t>& tokens,
                             const std::vector<int64_t>& capacity) {
  out.family("epic_kv_cache_tokens", "gauge", "Positions held in each worker rank's KV caches after the last step.");
  for (size_t r = 0; r < tokens.size(); ++r)
    out.sample("epic_kv_cache_tokens", prometheus_label("rank", std::to_string(r)), double(tokens[r]));
  out.family("epic_kv_cache_capacity_tokens", "gauge", "Positions each worker rank's KV cache holds in all.");
  for (size_t r = 0; r < capacity.size(); ++r)
    out.sample("epic_kv_cache_capacity_tokens", prometheus_label("rank", std::to_string(r)), double(capacity[r]));
}

std::string prometheus_label(const std::string& name, const std::string& value) {
  std::string escaped;
  for (const char c : value) {
    if (c == '\\' || c == '"') escaped += '\\';
    if (c == '\n') {
      escaped += "\\n";
      continue;
    }
    escaped += c;
  }
  return "{" + name + "=\"" + escaped + "\"}";
}

}  // namespace epic
