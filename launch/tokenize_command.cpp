// `epic tokenize` / `epic detokenize`: only DIR/tokenizer.json is needed.
#include <cstdio>
#include <fstream>
#include <sstream>

#include "coordinator/tokenizer.h"
#include "kernels/error.h"
#include "launch/cli_commands.h"
#include "launch/id_list.h"

namespace epic::cli {
namespace {

Tokenizer load_tokenizer(const std::string& model_dir) {
  const std::filesystem::path path = std::filesystem::path(model_dir) / "tokenizer.json";
  if (!std::filesystem::exists(path))
    throw Error(ErrorCode::kInvalidArgument,
                path.string() + " does not exist; --model must name a directory holding tokenizer.json");
  return Tokenizer::load(path);
}

}  // namespace

int tokenize_command(const TokenizeArgs& args) {
  if (args.text.has_value() == args.file.has_value())
    throw Error(ErrorCode::kInvalidArgument, "give exactly one of --text TEXT or --file FILE");
  std::string text;
  if (args.text) {
    text = *args.text;
  } else {
    std::ifstream file(*args.file, std::ios::binary);
    if (!file) throw Error(ErrorCode::kIo, *args.file + ": cannot open for reading");
    std::stringstream buffer;
    buffer << file.rdbuf();
    text = buffer.str();
  }
  const Tokenizer tokenizer = load_tokenizer(args.model_dir);
  std::printf("%s\n", join_ids(tokenizer.encode(text)).c_str());
  return 0;
}

int detokenize_command(const DetokenizeArgs& args) {
  const Tokenizer tokenizer = load_tokenizer(args.model_dir);
  const std::vector<int32_t> ids = parse_id_list(args.ids, "--ids");
  std::printf("%s\n", tokenizer.decode(ids).c_str());
  return 0;
}

}  // namespace epic::cli
