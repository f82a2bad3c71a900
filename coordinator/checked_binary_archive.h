// A cereal input archive for bytes from another process (a rank, a worker, a coordinator): it reads what
// cereal::BinaryOutputArchive wrote, trusting nothing. Shared by the run plan messages (launch/run_wire.h)
// and the worker protocol (coordinator/worker_protocol.h).
#pragma once

#include <cereal/cereal.hpp>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>

namespace epic::wire {

// cereal's own BinaryInputArchive resizes a container to whatever count the bytes claim before reading an element, so a few corrupt
// bytes could make a rank allocate and construct billions of elements. Here a count above the bytes
// left is refused (every element takes at least one byte), and a bool must be 0 or 1 (any other
// byte is not a bool value; loading it would be undefined behaviour).
class CheckedBinaryInputArchive
    : public cereal::InputArchive<CheckedBinaryInputArchive, cereal::AllowEmptyClassElision> {
 public:
  explicit CheckedBinaryInputArchive(std::string_view bytes) : InputArchive(this), bytes_(bytes) {}

  void loadBinary(void* data, size_t size) {
    if (size > bytes_left()) {
      throw cereal::Exception("truncated: needs " + std::to_string(size) + " bytes at offset " +
                              std::to_string(position_) + " of " + std::to_string(bytes_.size()));
    }
    if (size != 0) std::memcpy(data, bytes_.data() + position_, size);
    position_ += size;
  }
  void check_count(uint64_t count) const {
    if (count > bytes_left()) {
      throw cereal::Exception("a count of " + std::to_string(count) + " elements at offset " +
                              std::to_string(position_) + " exceeds the " + std::to_string(bytes_left()) +
                              " bytes left");
    }
  }
  size_t bytes_left() const { return bytes_.size() - position_; }

 private:
  std::string_view bytes_;
  size_t position_ = 0;
};

template <class T>
std::enable_if_t<std::is_arithmetic_v<T> && !std::is_same_v<T, bool>> CEREAL_LOAD_FUNCTION_NAME(
    CheckedBinaryInputArchive& archive, T& value) {
  archive.loadBinary(std::addressof(value), sizeof(value));
}
inline void CEREAL_LOAD_FUNCTION_NAME(CheckedBinaryInputArchive& archive, bool& value) {
  uint8_t byte = 0;
  archive.loadBinary(&byte, 1);
  if (byte > 1) throw cereal::Exception("a bool holds byte " + std::to_string(byte) + ", not 0 or 1");
  value = byte == 1;
}
template <class T>
void CEREAL_LOAD_FUNCTION_NAME(CheckedBinaryInputArchive& archive, cereal::NameValuePair<T>& pair) {
  archive(pair.value);
}
template <class T>
void CEREAL_LOAD_FUNCTION_NAME(CheckedBinaryInputArchive& archive, cereal::SizeTag<T>& tag) {
  archive(tag.size);
  archive.check_count(static_cast<uint64_t>(tag.size));
}
template <class T>
void CEREAL_LOAD_FUNCTION_NAME(CheckedBinaryInputArchive& archive, cereal::BinaryData<T>& data) {
  archive.loadBinary(data.data, static_cast<size_t>(data.size));
}

}  // namespace epic::wire
