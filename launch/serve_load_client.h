// A load client for epic serve (issue 11's serving benchmark): C concurrent clients on one thread (Asio +
// Beast's parser), each sending streaming completions back to back over fresh connections and reading every
// server-sent event as it arrives, so the client is never what limits the server. Measures per request the
// time to the first token, the gaps between token chunks, the completion tokens (the usage chunk), and
// whether the stream ended with [DONE].
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace epic::cli {

struct ServeLoadOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 8000;
  std::string model = "model";
  int clients = 64;
  int64_t requests_per_client = 4;
  int64_t max_tokens = 64;
  double temperature = 0;
  // Request i sends prompts[i % size]: "text", or token ids as a JSON array.
  std::vector<std::string> prompts_json;
  std::chrono::seconds timeout{600};          // the whole run; past it the open requests count as errors
};

struct ServeLoadResult {
  int64_t requests = 0, errors = 0, completion_tokens = 0;
  double wall_seconds = 0;
  std::vector<double> first_token_seconds, inter_token_seconds;
  std::vector<std::string> error_samples;  // the first few errors, as text
};

ServeLoadResult run_serve_load(const ServeLoadOptions& options);

// The q-quantile (0..1) of `values` (nearest rank), NaN when empty.
double quantile(std::vector<double> values, double q);

}  // namespace epic::cli
