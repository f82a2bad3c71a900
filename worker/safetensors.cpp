// safetensors reading (header validation, counted reads of single tensors) and writing
// (temp file + rename), plus the bf16/f16 <-> f32 scalar conversions.
#include "worker/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>

#include "kernels/error.h"
#include "kernels/file_io.h"

namespace epic {

// The format is little-endian; tensor data is copied to and from memory without byte swaps.
static_assert(std::endian::native == std::endian::little,
              "epic's safetensors code assumes a little-endian host");

namespace {

using nlohmann::json;

// A corrupt header must not make us allocate gigabytes; real headers are a few MB at most
// (the reference implementation caps them at 100 MB too).
constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;
// A safetensors header nests at most 3 levels ({name: {shape: [..]}}); deeper JSON is corrupt, and
// bounding it keeps the parser's memory and the json destructor's recursion small.
constexpr int kMaxHeaderDepth = 8;

const char* const kFixHint = "re-download or re-convert the shard";

std::string in_quotes(const std::string& text) { return "'" + text + "'"; }

[[noreturn]] void throw_invalid(const std::filesystem::path& path, const std::string& what) {
  throw Error(ErrorCode::kInvalidCheckpoint,
              "invalid safetensors file " + path.string() + ": " + what + "; " + kFixHint);
}

[[noreturn]] void throw_io(const std::filesystem::path& path, const std::string& operation, int error_number,
                           const char* hint = "check that the path exists and is readable") {
  throw Error(ErrorCode::kIo,
              "cannot " + operation + " " + path.string() + ": " + std::strerror(error_number) + "; " + hint);
}

const char* const kWriteHint = "check that the directory exists, is writable and has free space";

// Owns a POSIX file descriptor for the duration of one open() or read_raw().
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  int get() const { return fd_; }
  // Closes now and reports the result (a write error may only show up at close).
  int close() {
    int result = ::close(fd_);
    fd_ = -1;
    return result;
  }

 private:
  int fd_;
};

// O_NONBLOCK: a FIFO put where a shard was expected must not make open() wait for a writer; on a
// regular file the flag changes nothing.
FileDescriptor open_for_reading(const std::filesystem::path& path) {
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) throw_io(path, "open", errno);
  return FileDescriptor(fd);
}

// Reads exactly num_bytes at offset, or throws: a short read means the file changed under us.
void pread_exact(int fd, const std::filesystem::path& path, void* dst, uint64_t num_bytes, uint64_t offset) {
  auto* out = static_cast<uint8_t*>(dst);
  uint64_t done = 0;
  while (done < num_bytes) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(num_bytes - done, 1ull << 30));
    const ssize_t got = ::pread(fd, out + done, chunk, static_cast<off_t>(offset + done));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw_io(path,
               "read " + std::to_string(num_bytes) + " bytes at offset " + std::to_string(offset) + " of",
               errno);
    }
    if (got == 0) {
      throw Error(ErrorCode::kIo, "unexpected end of file reading " + std::to_string(num_bytes) +
                                      " bytes at offset " + std::to_string(offset) + " of " + path.string() +
                                      " (the file shrank after it was opened?); " + kFixHint);
    }
    done += static_cast<uint64_t>(got);
  }
}

void write_all(int fd, const std::filesystem::path& path, const void* src, size_t num_bytes) {
  const auto* in = static_cast<const uint8_t*>(src);
  size_t done = 0;
  while (done < num_bytes) {
    const ssize_t put = ::write(fd, in + done, std::min<size_t>(num_bytes - done, 1u << 30));
    if (put < 0) {
      if (errno == EINTR) continue;
      throw_io(path, "write", errno, kWriteHint);
    }
    done += static_cast<size_t>(put);
  }
}

bool parse_dtype(const std::string& text, DType* dtype) {
  static const std::pair<const char*, DType> kNames[] = {
      {"F32", DType::kF32}, {"F16", DType::kF16},   {"BF16", DType::kBF16},      {"F64", DType::kF64},
      {"I64", DType::kI64}, {"I32", DType::kI32},   {"I16", DType::kI16},        {"I8", DType::kI8},
      {"U8", DType::kU8},   {"BOOL", DType::kBool}, {"F8_E4M3", DType::kF8E4M3}, {"F8_E5M2", DType::kF8E5M2},
  };
  for (const auto& [name, value] : kNames) {
    if (text == name) {
      *dtype = value;
      return true;
    }
  }
  return false;
}

// Element count of a shape, or nullopt when it overflows (a corrupt header can claim anything).
// Every partial product must fit int64_t, so TensorInfo::num_elements() (which multiplies the
// dims in the same order in int64_t) cannot overflow on a shape this accepted, zeros included.
std::optional<uint64_t> checked_num_elements(const std::vector<int64_t>& shape) {
  constexpr uint64_t kMaxCount = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  uint64_t count = 1;
  for (int64_t dim : shape) {
    if (dim < 0) return std::nullopt;
    if (dim != 0 && count > kMaxCount / static_cast<uint64_t>(dim)) return std::nullopt;
    count *= static_cast<uint64_t>(dim);
  }
  return count;
}

std::optional<uint64_t> checked_num_bytes(const std::vector<int64_t>& shape, DType dtype) {
  auto count = checked_num_elements(shape);
  if (!count) return std::nullopt;
  const uint64_t size = dtype_size(dtype);
  if (*count > std::numeric_limits<uint64_t>::max() / size) return std::nullopt;
  return *count * size;
}

// A JSON number that is a non-negative integer (nlohmann keeps 3 and 3.0 apart).
std::optional<uint64_t> as_unsigned(const json& value) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer() && value.get<int64_t>() >= 0)
    return static_cast<uint64_t>(value.get<int64_t>());
  return std::nullopt;
}

// NaN/Inf detection that rides on the pass converting the values: a value is NaN or Inf exactly
// when its exponent is all ones, which is exactly when adding one exponent ulp to its magnitude
// carries into the sign bit. So the check is an and/add/or per value, OR-ed over the chunk, and
// the loops run over blocks of a fixed length, which GCC vectorises at -O2 (a loop of unknown
// length it does not): the checked conversion runs faster than the old unchecked scalar loop.
constexpr size_t kBlock = 64;

bool has_non_finite_f32(const float* values, size_t count) {
  uint32_t carries = 0;
  size_t i = 0;
  for (; i + kBlock <= count; i += kBlock)
    for (size_t j = 0; j < kBlock; ++j)
      carries |= (std::bit_cast<uint32_t>(values[i + j]) & 0x7FFFFFFFu) + 0x00800000u;
  for (; i < count; ++i) carries |= (std::bit_cast<uint32_t>(values[i]) & 0x7FFFFFFFu) + 0x00800000u;
  return (carries & 0x80000000u) != 0;
}

// Converts BF16 or F16 values to f32 into out, and says (in the same pass) whether any is NaN or Inf.
template <float (*kToF32)(uint16_t), uint16_t kExponentUlp>
bool convert_16_bit(const uint16_t* halves, size_t count, float* out) {
  uint16_t carries = 0;
  size_t i = 0;
  for (; i + kBlock <= count; i += kBlock) {
    for (size_t j = 0; j < kBlock; ++j) {
      out[i + j] = kToF32(halves[i + j]);
      carries |= static_cast<uint16_t>((halves[i + j] & 0x7FFFu) + kExponentUlp);
    }
  }
  for (; i < count; ++i) {
    out[i] = kToF32(halves[i]);
    carries |= static_cast<uint16_t>((halves[i] & 0x7FFFu) + kExponentUlp);
  }
  return (carries & 0x8000u) != 0;
}

bool convert_16_bit_chunk(DType dtype, const uint16_t* halves, size_t count, float* out) {
  return dtype == DType::kBF16 ? convert_16_bit<bf16_to_f32, 0x0080>(halves, count, out)
                               : convert_16_bit<f16_to_f32, 0x0400>(halves, count, out);
}

json parse_header(const std::filesystem::path& path, const std::string& text) {
  std::set<std::string> seen_names;
  std::string duplicate;
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) {
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
        depth >= kMaxHeaderDepth) {
      throw_invalid(path, "the JSON header nests deeper than " + std::to_string(kMaxHeaderDepth) +
                              " levels, which no safetensors header does");
    }
    // nlohmann keeps only the last of two equal keys; a tensor named twice is corrupt.
    if (event == json::parse_event_t::key && depth == 1 && parsed.is_string()) {
      if (!seen_names.insert(parsed.get<std::string>()).second && duplicate.empty()) {
        duplicate = parsed.get<std::string>();
      }
    }
    return true;
  };
  json header;
  try {
    header = json::parse(text, callback, /*allow_exceptions=*/true);
  } catch (const json::exception& error) {
    throw_invalid(
        path, "the " + std::to_string(text.size()) + "-byte header is not valid JSON (" + error.what() + ")");
  }
  if (!header.is_object()) {
    throw_invalid(path, std::string("the header is JSON of type ") + header.type_name() +
                            " but must be an object mapping tensor names to {dtype, shape, data_offsets}");
  }
  if (!duplicate.empty()) throw_invalid(path, "the header names tensor " + in_quotes(duplicate) + " twice");
  return header;
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kF64:
      return "F64";
    case DType::kI64:
      return "I64";
    case DType::kI32:
      return "I32";
    case DType::kI16:
      return "I16";
    case DType::kI8:
      return "I8";
    case DType::kU8:
      return "U8";
    case DType::kBool:
      return "BOOL";
    case DType::kF8E4M3:
      return "F8_E4M3";
    case DType::kF8E5M2:
      return "F8_E5M2";
  }
  return "UNKNOWN";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF64:
    case DType::kI64:
      return 8;
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
    case DType::kI16:
      return 2;
    case DType::kI8:
    case DType::kU8:
    case DType::kBool:
    case DType::kF8E4M3:
    case DType::kF8E5M2:
      return 1;
  }
  return 1;
}

bool dtype_is_float_storage(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16;
}

float bf16_to_f32(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

uint16_t f32_to_bf16(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  // Rounding could carry a NaN's payload into the exponent; keep it a quiet NaN of the same sign.
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  // Round to nearest even: add just under half an ulp, plus one when the kept lsb is odd.
  // Overflow past the largest bf16 carries into the exponent and gives Inf, as it should.
  const uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

float f16_to_f32(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  const uint32_t mantissa = bits & 0x3FFu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa x 2^-24, exact in f32.
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(magnitude));
  }
  if (exponent == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));  // Inf / NaN
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

uint16_t f32_to_f16(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) {
    // NaN: keep the top payload bits and force the quiet bit so the result stays a NaN.
    return static_cast<uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));
  }
  // 65520 lies halfway between 65504 (the largest f16) and 65536; the tie goes to the even
  // neighbour, which is 2^16 = Inf. So everything from 65520 up (Inf included) is Inf.
  if (magnitude >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  const uint32_t f32_exponent = magnitude >> 23;
  if (magnitude < 0x38800000u) {
    // Below 2^-14: an f16 subnormal (or zero), round(value x 2^24) in units of 2^-24.
    if (f32_exponent < 102) return sign;  // below 2^-25: rounds to zero (f32 subnormals too)
    const uint32_t full_mantissa = (magnitude & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - f32_exponent;  // 14..24
    uint32_t result = full_mantissa >> shift;
    const uint32_t remainder = full_mantissa & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (remainder > half || (remainder == half && (result & 1u))) ++result;  // may reach 0x400: 2^-14
    return static_cast<uint16_t>(sign | result);
  }
  uint32_t result = ((f32_exponent - 112u) << 10) | ((magnitude >> 13) & 0x3FFu);
  const uint32_t remainder = magnitude & 0x1FFFu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (result & 1u)))
    ++result;  // carry into exponent is right
  return static_cast<uint16_t>(sign | result);
}

int64_t TensorInfo::num_elements() const {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  return count;
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  SafetensorsFile file;
  file.path_ = path;
  // A directory, FIFO or device is refused by type before any open (a missing file is left to
  // open(), whose errno names the cause); fstat below catches one swapped in after the check.
  std::error_code ignored;
  if (std::filesystem::exists(path, ignored)) files::require_regular_file(path, "safetensors file");
  FileDescriptor fd = open_for_reading(path);
  struct stat file_status {};
  if (::fstat(fd.get(), &file_status) != 0) throw_io(path, "stat", errno);
  if (!S_ISREG(file_status.st_mode)) {
    throw Error(ErrorCode::kInvalidArgument,
                "safetensors file " + path.string() + " is " + files::describe_file_type(path) +
                    ", not a regular file; give the path of a .safetensors file");
  }
  file.file_size_ = static_cast<uint64_t>(file_status.st_size);
  if (file.file_size_ < 8) {
    throw_invalid(path,
                  "the file is truncated: it is " + std::to_string(file.file_size_) +
                      " bytes, shorter than the 8-byte header length that starts every safetensors file");
  }

  uint8_t length_bytes[8];
  pread_exact(fd.get(), path, length_bytes, 8, 0);
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | length_bytes[i];
  if (header_length > file.file_size_ - 8) {
    throw_invalid(path, "the header length field says " + std::to_string(header_length) +
                            " bytes, past the end of the file (the file is " +
                            std::to_string(file.file_size_) + " bytes, so at most " +
                            std::to_string(file.file_size_ - 8) +
                            " are left for the header): the file is truncated or not safetensors");
  }
  if (header_length > kMaxHeaderBytes) {
    throw_invalid(path, "the header length field says " + std::to_string(header_length) +
                            " bytes, more than the " + std::to_string(kMaxHeaderBytes) +
                            "-byte limit for a safetensors header");
  }
  std::string header_text(static_cast<size_t>(header_length), '\0');
  pread_exact(fd.get(), path, header_text.data(), header_length, 8);
  const json header = parse_header(path, header_text);

  const uint64_t data_start = 8 + header_length;
  const uint64_t data_size = file.file_size_ - data_start;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        throw_invalid(path, std::string("\"__metadata__\" is JSON of type ") + entry.type_name() +
                                " but must be an object of string values");
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          throw_invalid(path, "\"__metadata__\" key " + in_quotes(key) + " has a value of type " +
                                  value.type_name() + " but metadata values must be strings");
        }
        file.metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor " + in_quotes(name);
    if (!entry.is_object()) {
      throw_invalid(path, where + " has a header entry of type " + entry.type_name() +
                              " but must be an object with dtype, shape and data_offsets");
    }
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(key)) throw_invalid(path, where + " has no \"" + key + "\" in its header entry");
    }
    TensorInfo info;
    info.name = name;

    const json& dtype_json = entry.at("dtype");
    if (!dtype_json.is_string()) {
      throw_invalid(path,
                    where + " has a dtype of JSON type " + dtype_json.type_name() + ", expected a string");
    }
    if (!parse_dtype(dtype_json.get<std::string>(), &info.dtype)) {
      throw_invalid(path,
                    where + " has unknown dtype " + in_quotes(dtype_json.get<std::string>()) +
                        " (epic reads F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2)");
    }

    const json& shape_json = entry.at("shape");
    if (!shape_json.is_array()) {
      throw_invalid(path,
                    where + " has a shape of JSON type " + shape_json.type_name() + ", expected an array");
    }
    for (const json& dim : shape_json) {
      if (dim.is_number_integer() && !dim.is_number_unsigned() && dim.get<int64_t>() < 0) {
        throw_invalid(path, where + " has a negative dimension " + std::to_string(dim.get<int64_t>()) +
                                " in shape " + shape_json.dump());
      }
      auto value = as_unsigned(dim);
      if (!value || *value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        throw_invalid(path, where + " has shape " + shape_json.dump() + ", expected non-negative integers");
      }
      info.shape.push_back(static_cast<int64_t>(*value));
    }

    const json& offsets_json = entry.at("data_offsets");
    std::optional<uint64_t> begin, end;
    if (offsets_json.is_array() && offsets_json.size() == 2) {
      begin = as_unsigned(offsets_json[0]);
      end = as_unsigned(offsets_json[1]);
    }
    if (!begin || !end || *begin > *end) {
      throw_invalid(path, where + " has data_offsets " + offsets_json.dump() +
                              ", expected two non-negative integers [begin, end] with begin <= end");
    }
    if (*end > data_size) {
      throw_invalid(path, where + " has data_offsets [" + std::to_string(*begin) + ", " +
                              std::to_string(*end) + "] that end past the data section, which is " +
                              std::to_string(data_size) + " bytes: the file is truncated");
    }
    const auto expected_bytes = checked_num_bytes(info.shape, info.dtype);
    if (!expected_bytes || *expected_bytes != *end - *begin) {
      throw_invalid(
          path, where + " has data_offsets [" + std::to_string(*begin) + ", " + std::to_string(*end) +
                    "] spanning " + std::to_string(*end - *begin) + " bytes, but shape " +
                    shape_to_string(info.shape) + " of " + dtype_name(info.dtype) + " needs " +
                    (expected_bytes ? std::to_string(*expected_bytes) + " bytes"
                                    : std::string("over 2^63 elements or 2^64 bytes, which no file holds")) +
                    " (byte length != element count x dtype size)");
    }
    info.data_begin = data_start + *begin;
    info.data_end = data_start + *end;
    file.tensors_.push_back(std::move(info));
  }

  // The tensors must tile the data section exactly, as the reference implementation requires: a
  // gap or bytes after the last tensor mean the header length or the offsets are wrong. (A header
  // length one byte short still parses, but shifts every tensor by one byte and turns every
  // weight into garbage; only this check catches it.) File order, empty tensors first at equal
  // offsets; every offset is <= the file size here, so nothing below can overflow.
  std::sort(file.tensors_.begin(), file.tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    if (a.data_begin != b.data_begin) return a.data_begin < b.data_begin;
    return a.data_end < b.data_end;
  });
  auto offsets_of = [&](const TensorInfo& tensor) {
    return in_quotes(tensor.name) + " (data_offsets [" + std::to_string(tensor.data_begin - data_start) +
           ", " + std::to_string(tensor.data_end - data_start) + "])";
  };
  const std::string layout_cause =
      "; the header length field (" + std::to_string(header_length) + ") or the header's offsets are wrong";
  const TensorInfo* previous = nullptr;
  uint64_t covered_end = data_start;  // absolute: the data bytes [data_start, covered_end) belong to tensors
  for (const TensorInfo& tensor : file.tensors_) {
    if (tensor.data_begin < covered_end) {
      throw_invalid(path, "tensors " + offsets_of(*previous) + " and " + offsets_of(tensor) + " overlap");
    }
    if (tensor.data_begin > covered_end) {
      const std::string before = previous ? "after tensor " + offsets_of(*previous)
                                          : std::string("at the start of the data section");
      throw_invalid(path, std::to_string(tensor.data_begin - covered_end) + " bytes " + before +
                              " belong to no tensor: the next tensor is " + offsets_of(tensor) +
                              " (the tensors must cover the data section without gaps" + layout_cause + ")");
    }
    covered_end = tensor.data_end;
    previous = &tensor;
  }
  if (covered_end != file.file_size_) {
    throw_invalid(path,
                  "the file is " + std::to_string(file.file_size_) + " bytes but 8 + header length " +
                      std::to_string(header_length) + " + the tensors' " +
                      std::to_string(covered_end - data_start) + " bytes = " + std::to_string(covered_end) +
                      ": " + std::to_string(file.file_size_ - covered_end) +
                      " trailing bytes belong to no tensor" +
                      (previous ? " (the last tensor is " + offsets_of(*previous) + ")" : std::string()) +
                      layout_cause);
  }
  for (size_t i = 0; i < file.tensors_.size(); ++i) file.index_by_name_[file.tensors_[i].name] = i;
  return file;
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = index_by_name_.find(std::string(name));
  return it == index_by_name_.end() ? nullptr : &tensors_[it->second];
}

void SafetensorsFile::require_inside_file(const TensorInfo& tensor) const {
  // The TensorInfo may come from another file; never read outside what this header validated.
  if (tensor.data_begin > tensor.data_end || tensor.data_end > file_size_) {
    throw Error(ErrorCode::kInvalidArgument, "tensor " + in_quotes(tensor.name) + " with byte range [" +
                                                 std::to_string(tensor.data_begin) + ", " +
                                                 std::to_string(tensor.data_end) + ") is not inside " +
                                                 path_.string() + " (" + std::to_string(file_size_) +
                                                 " bytes); pass a TensorInfo from this file's tensors()");
  }
}

void SafetensorsFile::read_raw(const TensorInfo& tensor, void* dst) const {
  require_inside_file(tensor);
  if (tensor.num_bytes() == 0) return;
  FileDescriptor fd = open_for_reading(path_);
  pread_exact(fd.get(), path_, dst, tensor.num_bytes(), tensor.data_begin);
  *bytes_read_ += tensor.num_bytes();
}

std::vector<float> SafetensorsFile::read_f32(const TensorInfo& tensor, NonFiniteWeights non_finite) const {
  if (!dtype_is_float_storage(tensor.dtype)) {
    throw Error(
        ErrorCode::kInvalidCheckpoint,
        "tensor " + in_quotes(tensor.name) + " in " + path_.string() + " has dtype " +
            dtype_name(tensor.dtype) +
            ", but epic reads weights only as F32, F16 or BF16; convert the checkpoint to one of these");
  }
  require_inside_file(tensor);
  const size_t element_size = dtype_size(tensor.dtype);
  const uint64_t num_elements = tensor.num_bytes() / element_size;
  std::vector<float> values(static_cast<size_t>(num_elements));
  if (num_elements == 0) return values;
  // Read in chunks small enough to stay in cache, and convert and check each chunk while it is
  // there: one pass over memory, and 16-bit tensors need no full-size staging copy.
  constexpr uint64_t kChunkElements = uint64_t{1} << 18;
  std::vector<uint16_t> halves(element_size == 2 ? static_cast<size_t>(std::min(num_elements, kChunkElements))
                                                 : 0);
  FileDescriptor fd = open_for_reading(path_);
  for (uint64_t first = 0; first < num_elements; first += kChunkElements) {
    const size_t count = static_cast<size_t>(std::min(kChunkElements, num_elements - first));
    float* out = values.data() + first;
    const uint64_t offset = tensor.data_begin + first * element_size;
    bool any_non_finite;
    if (tensor.dtype == DType::kF32) {
      pread_exact(fd.get(), path_, out, count * sizeof(float), offset);
      any_non_finite = has_non_finite_f32(out, count);
    } else {
      pread_exact(fd.get(), path_, halves.data(), count * 2, offset);
      any_non_finite = convert_16_bit_chunk(tensor.dtype, halves.data(), count, out);
    }
    if (any_non_finite && non_finite == NonFiniteWeights::kReject) {
      const size_t bad = static_cast<size_t>(
          std::find_if(out, out + count, [](float v) { return !std::isfinite(v); }) - out);
      const float value = out[bad];
      const char* kind = std::isnan(value) ? "NaN" : value > 0 ? "+Inf" : "-Inf";
      throw Error(
          ErrorCode::kInvalidCheckpoint,
          "tensor " + in_quotes(tensor.name) + " in " + path_.string() + " (" + dtype_name(tensor.dtype) +
              ", shape " + shape_to_string(tensor.shape) + ") holds non-finite weights: element " +
              std::to_string(first + bad) + " (flat index, of " + std::to_string(num_elements) + ") is " +
              kind +
              ", which would turn every output it reaches into NaN or Inf; re-export the checkpoint, or "
              "pass --allow-nonfinite-weights to load it anyway");
    }
    *bytes_read_ += count * element_size;
  }
  return values;
}

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                            std::vector<uint8_t> bytes) {
  EPIC_CHECK(name != "__metadata__", ErrorCode::kInvalidArgument,
             "a tensor cannot be named __metadata__: safetensors reserves that key for metadata");
  for (const Entry& entry : entries_) {
    EPIC_CHECK(entry.name != name, ErrorCode::kInvalidArgument,
               "tensor '" + name + "' was added twice to one safetensors file; tensor names must be unique");
  }
  const auto expected_bytes = checked_num_bytes(shape, dtype);
  EPIC_CHECK(expected_bytes && *expected_bytes == bytes.size(), ErrorCode::kInvalidArgument,
             "tensor '" + name + "' has shape " + shape_to_string(shape) + " of " + dtype_name(dtype) +
                 " but " + std::to_string(bytes.size()) +
                 " bytes of data; pass element count x dtype size bytes");
  entries_.push_back(Entry{name, dtype, std::move(shape), std::move(bytes)});
}

void SafetensorsWriter::add_f32(const std::string& name, DType storage, std::vector<int64_t> shape,
                                const std::vector<float>& values) {
  EPIC_CHECK(dtype_is_float_storage(storage), ErrorCode::kInvalidArgument,
             "tensor '" + name + "': add_f32 stores F32, F16 or BF16, not " + dtype_name(storage));
  const auto num_elements = checked_num_elements(shape);
  EPIC_CHECK(num_elements && *num_elements == values.size(), ErrorCode::kInvalidArgument,
             "tensor '" + name + "' has shape " + shape_to_string(shape) + " but " +
                 std::to_string(values.size()) + " values");
  std::vector<uint8_t> bytes(values.size() * dtype_size(storage));
  if (storage == DType::kF32) {
    if (!values.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  } else {
    for (size_t i = 0; i < values.size(); ++i) {
      const uint16_t half = storage == DType::kBF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
      std::memcpy(bytes.data() + 2 * i, &half, 2);
    }
  }
  add(name, storage, std::move(shape), std::move(bytes));
}

uint64_t SafetensorsWriter::data_bytes() const {
  uint64_t total = 0;
  for (const Entry& entry : entries_) total += entry.bytes.size();
  return total;
}

std::vector<std::string> SafetensorsWriter::names() const {
  std::vector<std::string> result;
  for (const Entry& entry : entries_) result.push_back(entry.name);
  return result;
}

void SafetensorsWriter::write(const std::filesystem::path& path) const {
  json header = json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const Entry& entry : entries_) {
    header[entry.name] = {{"dtype", dtype_name(entry.dtype)},
                          {"shape", entry.shape},
                          {"data_offsets", {offset, offset + entry.bytes.size()}}};
    offset += entry.bytes.size();
  }
  std::string header_text = header.dump();
  // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  uint8_t length_bytes[8];
  for (int i = 0; i < 8; ++i) length_bytes[i] = static_cast<uint8_t>(header_text.size() >> (8 * i));

  // Write beside the target and rename over it, so readers never see a half-written file.
  std::random_device random;
  std::filesystem::path temp_path = path;
  temp_path += ".tmp." + std::to_string(::getpid()) + "." + std::to_string(random());
  int raw_fd;
  do {
    raw_fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  } while (raw_fd < 0 && errno == EINTR);
  if (raw_fd < 0) throw_io(path, "create a temporary file to write", errno, kWriteHint);
  FileDescriptor fd(raw_fd);
  try {
    write_all(fd.get(), temp_path, length_bytes, 8);
    write_all(fd.get(), temp_path, header_text.data(), header_text.size());
    for (const Entry& entry : entries_)
      write_all(fd.get(), temp_path, entry.bytes.data(), entry.bytes.size());
    if (::fsync(fd.get()) != 0) throw_io(temp_path, "flush", errno, kWriteHint);
    if (fd.close() != 0) throw_io(temp_path, "close", errno, kWriteHint);
    if (::rename(temp_path.c_str(), path.c_str()) != 0)
      throw_io(path, "rename " + temp_path.string() + " to", errno, kWriteHint);
  } catch (const Error& error) {
    std::error_code ignored;
    std::filesystem::remove(temp_path, ignored);
    throw Error(ErrorCode::kIo, std::string("writing safetensors file ") + path.string() +
                                    " failed: " + error.what() + " (no file was written)");
  }
}

}  // namespace epic
