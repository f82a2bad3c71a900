// Prometheus' text exposition format (version 0.0.4), written by hand: /metrics has a few dozen families,
// each with HELP and TYPE once and then its samples. Numbers print exactly (integers plainly, others with
// 17 significant digits), so a counter never loses a unit.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace epic {

class PrometheusText {
 public:
  // Starts a family: its # HELP and # TYPE lines (type: counter, gauge, histogram).
  void family(const std::string& name, const char* type, const std::string& help);
  // One sample: name (with a suffix such as _bucket where the type has them), labels as `{a="b"}` or "".
  void sample(const std::string& name, const std::string& labels, double value);
  // A one-sample family.
  void single(const std::string& name, const char* type, const std::string& help, double value) {
    family(name, type, help);
    sample(name, "", value);
  }
  const std::string& text() const { return text_; }
  std::string take() { return std::move(text_); }

 private:
  std::string text_;
};

// The KV cache families every engine reports: positions held and the capacity, per worker rank.
void append_kv_cache_metrics(PrometheusText& out, const std::vector<int64_t>& tokens,
                             const std::vector<int64_t>& capacity);

// One label's `{name="value"}` (value escaped as the format asks: backslash, quote, newline).
std::string prometheus_label(const std::string& name, const std::string& value);

}  // namespace epic
