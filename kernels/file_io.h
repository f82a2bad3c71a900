// Files in and out, the one way every layer does it: inputs must be regular files (a FIFO, a
// directory or a device is refused at once, never read and never waited on), outputs are checked
// before any work and written atomically (a temporary file in the target's folder, every write,
// flush and close checked, then renamed over a regular file or an absent one, never over a device,
// FIFO or directory). Lives beside error.h because every layer above uses it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace epic::files {

// "a directory", "a FIFO (named pipe)", "a character device", "a socket", "a regular file",
// "missing", ... for messages; does not follow the path past a dangling link.
std::string describe_file_type(const std::filesystem::path& path);

// Throws Error(kInvalidArgument) naming `what` (e.g. "--prompts-file", "config.json"), the path and
// what it is, unless path names a regular file (links to one are fine). Never opens the path.
void require_regular_file(const std::filesystem::path& path, const std::string& what);

// The whole file; refuses non-regular files first (no blocking open of a FIFO) and files over
// max_bytes (a clear error instead of exhausting memory).
std::string read_file(const std::filesystem::path& path, const std::string& what,
                      uint64_t max_bytes = uint64_t{1} << 32);

// Checks, before any work, that `path` can be the target of an atomic write: it is absent or a
// regular file, and its folder exists, is a folder and is writable. Throws Error(kInvalidArgument)
// naming `what` (the flag), the path and the fix.
void check_output_path(const std::filesystem::path& path, const std::string& what);

// An atomic output file: bytes go to a temporary file beside the target; commit() checks every
// write, flushes, closes and renames it over the target. Dropped without commit(), the temporary
// file is removed and the target is untouched. A full disk or any failed write is Error(kIo).
class AtomicFileWriter {
 public:
  AtomicFileWriter(const std::filesystem::path& path, const std::string& what);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(std::string_view bytes);
  void write(const void* data, size_t num_bytes);
  // Writes at a byte offset of the file (a region reserved in advance, e.g. rows of a .npy whose
  // shape is known up front, filled as results arrive); does not move the append position.
  void write_at(uint64_t offset, const void* data, size_t num_bytes);
  void commit();
  const std::filesystem::path& path() const { return path_; }

 private:
  [[noreturn]] void fail(const std::string& operation, int error_number);
  std::filesystem::path path_;
  std::filesystem::path temp_path_;
  std::string what_;
  int fd_ = -1;
  bool committed_ = false;
};

// check_output_path + AtomicFileWriter + commit for a whole buffer.
void write_file_atomically(const std::filesystem::path& path, std::string_view bytes, const std::string& what);

}  // namespace epic::files
