// `epic tokenize` / `epic detokenize`: only DIR/tokenizer.json is needed (detokenize also reads
// DIR/config.json, when there is one, for the model's vocabulary size).
#include <cstdio>
#include <filesystem>

#include "coordinator/tokenizer.h"
#include "kernels/error.h"
#include "kernels/file_io.h"
#include "launch/cli_commands.h"
#include "launch/id_list.h"
#include "worker/model_config.h"
#include "worker/model_runner.h"

namespace epic::cli {
namespace {

namespace fs = std::filesystem;

Tokenizer load_tokenizer(const std::string& model_dir) {
  const fs::path path = fs::path(model_dir) / "tokenizer.json";
  if (files::describe_file_type(path) == "missing")
    throw Error(ErrorCode::kInvalidArgument,
                path.string() + " does not exist; --model must name a directory holding tokenizer.json");
  return Tokenizer::load(path);
}

}  // namespace

int tokenize_command(const TokenizeArgs& args) {
  if (args.text.has_value() == args.file.has_value())
    throw Error(ErrorCode::kInvalidArgument, "give exactly one of --text TEXT or --file FILE");
  // A FIFO, directory or device given as --file is refused at once, never read or waited on.
  const std::string text = args.text ? *args.text : files::read_file(*args.file, "--file");
  const Tokenizer tokenizer = load_tokenizer(args.model_dir);
  std::printf("%s\n", join_ids(tokenizer.encode(text)).c_str());
  return 0;
}

int detokenize_command(const DetokenizeArgs& args) {
  const Tokenizer tokenizer = load_tokenizer(args.model_dir);
  const std::vector<int32_t> ids = parse_id_list(args.ids, "--ids");
  // Ids inside the model's vocabulary decode (to nothing where the tokenizer has no text for them:
  // Qwen3's vocabulary has 267 rows past its tokenizer's last id); ids outside it are an error.
  // Without a config.json the tokenizer's own range is the vocabulary.
  const fs::path config_json = fs::path(args.model_dir) / "config.json";
  const bool has_config = files::describe_file_type(config_json) != "missing";
  const int64_t vocab_size =
      has_config ? ModelConfig::load(args.model_dir).vocab_size : tokenizer.vocab_size();
  check_token_ids(ids, vocab_size, "--ids: ");
  std::printf("%s\n", tokenizer.decode(ids).c_str());
  return 0;
}

}  // namespace epic::cli
