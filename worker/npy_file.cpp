// The .npy format, version 1.0: magic, a Python-dict header padded to 64 bytes, then the data.
#include "worker/npy_file.h"

#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>

#include "kernels/error.h"

namespace epic {

void write_npy_f32(const std::filesystem::path& path, const std::vector<int64_t>& shape,
                   const std::vector<float>& values) {
  int64_t count = 1;
  std::ostringstream dims;
  for (size_t i = 0; i < shape.size(); ++i) {
    count *= shape[i];
    dims << shape[i] << (shape.size() == 1 || i + 1 < shape.size() ? "," : "");
    if (i + 1 < shape.size()) dims << " ";
  }
  EPIC_CHECK(count == static_cast<int64_t>(values.size()), ErrorCode::kInternal,
             "write_npy_f32: shape does not match the value count");
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims.str() + "), }";
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  const std::filesystem::path temp = path.string() + ".partial";
  {
    std::ofstream file(temp, std::ios::binary | std::ios::trunc);
    if (!file)
      throw Error(ErrorCode::kIo,
                  path.string() + ": cannot open for writing; check the folder exists and is writable");
    const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
    const uint16_t header_len = static_cast<uint16_t>(header.size());
    file.write(magic, 8);
    file.write(reinterpret_cast<const char*>(&header_len), 2);
    file.write(header.data(), header.size());
    file.write(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
    if (!file) throw Error(ErrorCode::kIo, path.string() + ": write failed (disk full?)");
  }
  std::filesystem::rename(temp, path);
}

NpyArray read_npy_f32(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw Error(ErrorCode::kIo, path.string() + ": cannot open");
  char magic[10];
  file.read(magic, 10);
  if (!file || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    throw Error(ErrorCode::kInvalidArgument, path.string() + ": not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    header_len = static_cast<uint8_t>(magic[8]) | (static_cast<uint8_t>(magic[9]) << 8);
  } else {
    char more[2];
    file.read(more, 2);
    header_len = static_cast<uint8_t>(magic[8]) | (static_cast<uint8_t>(magic[9]) << 8) |
                 (static_cast<uint8_t>(more[0]) << 16) | (static_cast<uint8_t>(more[1]) << 24);
  }
  std::string header(header_len, '\0');
  file.read(header.data(), header_len);
  if (header.find("'descr': '<f4'") == std::string::npos ||
      header.find("'fortran_order': False") == std::string::npos)
    throw Error(ErrorCode::kInvalidArgument,
                path.string() + ": expected a C-order float32 array, header is " + header);
  std::smatch match;
  if (!std::regex_search(header, match, std::regex(R"('shape': \(([0-9, ]*)\))")))
    throw Error(ErrorCode::kInvalidArgument, path.string() + ": no shape in header " + header);
  NpyArray array;
  std::stringstream dims(match[1].str());
  std::string dim;
  int64_t count = 1;
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_not_of(' ') == std::string::npos) continue;
    array.shape.push_back(std::stoll(dim));
    count *= array.shape.back();
  }
  array.values.resize(count);
  file.read(reinterpret_cast<char*>(array.values.data()), count * sizeof(float));
  if (!file) throw Error(ErrorCode::kInvalidArgument, path.string() + ": truncated data");
  return array;
}

}  // namespace epic
