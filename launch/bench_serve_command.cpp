// `epic bench-serve`: load on a running epic serve (issue 11's serving benchmark): C concurrent streaming
// clients (launch/serve_load_client.h, one thread, never the bottleneck) send R completions each of the
// prompts in a file, back to back; prints requests/s, completion tokens/s, time to first token and
// inter-token latency (p50, p99) and errors, and writes them as JSON. Exit 1 when any request failed.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "coordinator/worker_link.h"
#include "kernels/error.h"
#include "kernels/file_io.h"
#include "launch/cli_commands.h"
#include "launch/flag_checks.h"
#include "launch/id_list.h"
#include "launch/serve_load_client.h"

namespace epic::cli {

int bench_serve_command(const BenchServeArgs& args) {
  check_int_flag("--clients", args.clients, 1, 100000);
  check_int_flag("--requests", args.requests_per_client, 1, 1000000);
  check_int_flag("--max-tokens", args.max_tokens, 1, int64_t{1} << 20);
  std::string address = args.url;
  if (address.rfind("http://", 0) == 0) address = address.substr(7);
  while (!address.empty() && address.back() == '/') address.pop_back();
  const auto [host, port] = parse_host_port(address, "--url");
  ServeLoadOptions options;
  options.host = host;
  options.port = port;
  options.model = args.model_name;
  options.clients = static_cast<int>(args.clients);
  options.requests_per_client = args.requests_per_client;
  options.max_tokens = args.max_tokens;
  options.temperature = args.temperature;
  // Prompts: one a line, text (--prompts-file) or token ids such as 1,2,3 (--prompt-ids-file).
  const bool ids = !args.prompt_ids_file.empty();
  EPIC_CHECK(ids != !args.prompts_file.empty(), ErrorCode::kInvalidArgument,
             "give one of --prompts-file (text, one prompt a line) or --prompt-ids-file (1,2,3 a line)");
  const std::string& path = ids ? args.prompt_ids_file : args.prompts_file;
  const std::string flag = ids ? "--prompt-ids-file" : "--prompts-file";
  const std::string text = files::read_file(path, flag, uint64_t{1} << 30);
  size_t line_number = 0;
  for (size_t start = 0; start < text.size();) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(start, end - start);
    ++line_number;
    if (!line.empty())
      options.prompts_json.push_back(
          ids ? nlohmann::json(parse_id_list(line, flag + " line " + std::to_string(line_number))).dump()
              : nlohmann::json(line).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    start = end + 1;
  }
  EPIC_CHECK(!options.prompts_json.empty(), ErrorCode::kInvalidArgument, flag + " " + path + " holds no prompts");
  const ServeLoadResult result = run_serve_load(options);
  const double p50_ttft = quantile(result.first_token_seconds, 0.5), p99_ttft = quantile(result.first_token_seconds, 0.99);
  const double p50_itl = quantile(result.inter_token_seconds, 0.5), p99_itl = quantile(result.inter_token_seconds, 0.99);
  std::printf("epic bench-serve: %lld clients x %lld requests, max_tokens %lld, %zu prompts\n",
              static_cast<long long>(args.clients), static_cast<long long>(args.requests_per_client),
              static_cast<long long>(args.max_tokens), options.prompts_json.size());
  std::printf("  %lld requests in %.3f s: %.2f requests/s, %.1f tokens/s, %lld errors\n",
              static_cast<long long>(result.requests), result.wall_seconds,
              static_cast<double>(result.requests) / result.wall_seconds,
              static_cast<double>(result.completion_tokens) / result.wall_seconds, static_cast<long long>(result.errors));
  std::printf("  time to first token p50 %.2f ms, p99 %.2f ms; inter-token p50 %.3f ms, p99 %.3f ms\n", p50_ttft * 1e3,
              p99_ttft * 1e3, p50_itl * 1e3, p99_itl * 1e3);
  for (const std::string& sample : result.error_samples) std::printf("  error: %s\n", sample.c_str());
  if (!args.json_out.empty()) {
    const nlohmann::json json = {{"clients", args.clients},
                                 {"requests_per_client", args.requests_per_client},
                                 {"max_tokens", args.max_tokens},
                                 {"requests", result.requests},
                                 {"errors", result.errors},
                                 {"completion_tokens", result.completion_tokens},
                                 {"wall_seconds", result.wall_seconds},
                                 {"requests_per_second", static_cast<double>(result.requests) / result.wall_seconds},
                                 {"tokens_per_second", static_cast<double>(result.completion_tokens) / result.wall_seconds},
                                 {"ttft_p50_seconds", p50_ttft},
                                 {"ttft_p99_seconds", p99_ttft},
                                 {"itl_p50_seconds", p50_itl},
                                 {"itl_p99_seconds", p99_itl}};
    files::write_file_atomically(args.json_out, json.dump(2) + "\n", "--json");
  }
  return result.errors == 0 ? 0 : 1;
}

}  // namespace epic::cli
