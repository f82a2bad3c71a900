// Regular-file checks, bounded whole-file reads and atomic, fully checked writes (POSIX).
#include "kernels/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "kernels/error.h"

namespace epic::files {
namespace {

namespace fs = std::filesystem;

std::string type_of_mode(mode_t mode) {
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISLNK(mode)) return "a dangling symbolic link";
  return "not a regular file";
}

std::string errno_text(int error_number) { return std::strerror(error_number); }

}  // namespace

std::string describe_file_type(const fs::path& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) == 0) return type_of_mode(info.st_mode);
  const int stat_errno = errno;
  if (::lstat(path.c_str(), &info) == 0) return type_of_mode(info.st_mode);  // a dangling link
  if (stat_errno == ENOENT) return "missing";
  return "not accessible (" + errno_text(stat_errno) + ")";
}

void require_regular_file(const fs::path& path, const std::string& what) {
  struct stat info {};
  if (::stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode)) return;
  const std::string type = describe_file_type(path);
  if (type == "missing")
    throw Error(ErrorCode::kInvalidArgument, what + " " + path.string() + ": no such file");
  throw Error(ErrorCode::kInvalidArgument,
              what + " " + path.string() + " is " + type + ", not a regular file; give the path of a file");
}

std::string read_file(const fs::path& path, const std::string& what, uint64_t max_bytes) {
  require_regular_file(path, what);
  // O_NONBLOCK: should the path be swapped for a FIFO after the check, open() still returns.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    throw Error(ErrorCode::kIo, what + " " + path.string() + ": cannot open for reading (" + errno_text(errno) + ")");
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    throw Error(ErrorCode::kInvalidArgument, what + " " + path.string() + " is not a regular file");
  }
  if (static_cast<uint64_t>(info.st_size) > max_bytes) {
    ::close(fd);
    throw Error(ErrorCode::kInvalidArgument, what + " " + path.string() + " is " + std::to_string(info.st_size) +
                                                 " bytes, more than the " + std::to_string(max_bytes) +
                                                 " bytes such a file may hold; check the path");
  }
  std::string bytes;
  char buffer[1 << 16];
  for (;;) {
    const ssize_t got = ::read(fd, buffer, sizeof buffer);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int saved = errno;
      ::close(fd);
      throw Error(ErrorCode::kIo, what + " " + path.string() + ": read failed (" + errno_text(saved) + ")");
    }
    if (got == 0) break;
    if (bytes.size() + static_cast<uint64_t>(got) > max_bytes) {
      ::close(fd);
      throw Error(ErrorCode::kInvalidArgument,
                  what + " " + path.string() + " grew past " + std::to_string(max_bytes) + " bytes while read");
    }
    bytes.append(buffer, static_cast<size_t>(got));
  }
  ::close(fd);
  return bytes;
}

void check_output_path(const fs::path& path, const std::string& what) {
  if (path.empty()) throw Error(ErrorCode::kInvalidArgument, what + " needs a file path, got an empty one");
  struct stat info {};
  if (::stat(path.c_str(), &info) == 0) {
    if (!S_ISREG(info.st_mode))
      throw Error(ErrorCode::kInvalidArgument,
                  what + " " + path.string() + " is " + type_of_mode(info.st_mode) +
                      "; epic writes its outputs atomically to regular files only: give a file path");
  } else if (errno != ENOENT) {
    throw Error(ErrorCode::kInvalidArgument,
                what + " " + path.string() + ": cannot be checked (" + errno_text(errno) + ")");
  }
  const fs::path folder = fs::absolute(path).parent_path();
  struct stat folder_info {};
  if (::stat(folder.c_str(), &folder_info) != 0)
    throw Error(ErrorCode::kInvalidArgument,
                what + " " + path.string() + ": folder " + folder.string() + " does not exist; create it first");
  if (!S_ISDIR(folder_info.st_mode))
    throw Error(ErrorCode::kInvalidArgument,
                what + " " + path.string() + ": " + folder.string() + " is " + type_of_mode(folder_info.st_mode) +
                    ", not a folder");
  if (::access(folder.c_str(), W_OK | X_OK) != 0)
    throw Error(ErrorCode::kInvalidArgument, what + " " + path.string() + ": folder " + folder.string() +
                                                 " is not writable (" + errno_text(errno) + ")");
}

AtomicFileWriter::AtomicFileWriter(const fs::path& path, const std::string& what) : path_(path), what_(what) {
  check_output_path(path, what);
  static std::atomic<uint64_t> counter{0};
  // Beside the target, so the final rename stays inside one file system. O_EXCL: never reuse a
  // name another writer holds.
  for (int attempt = 0; attempt < 100 && fd_ < 0; ++attempt) {
    temp_path_ = fs::path(path.string() + ".epic-tmp." + std::to_string(::getpid()) + "." +
                          std::to_string(counter.fetch_add(1)));
    fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ < 0 && errno != EEXIST) fail("create a temporary file " + temp_path_.string(), errno);
  }
  if (fd_ < 0) fail("find a free temporary name", EEXIST);
}

AtomicFileWriter::~AtomicFileWriter() {
  if (committed_) return;
  if (fd_ >= 0) ::close(fd_);
  ::unlink(temp_path_.c_str());
}

void AtomicFileWriter::fail(const std::string& operation, int error_number) {
  const std::string hint = error_number == ENOSPC || error_number == EDQUOT
                               ? "; free some space or write elsewhere"
                               : "; check the folder is writable and has space";
  throw Error(ErrorCode::kIo, what_ + " " + path_.string() + ": cannot " + operation + " (" +
                                  errno_text(error_number) + ")" + hint + ". Nothing was written there.");
}

void AtomicFileWriter::write(std::string_view bytes) { write(bytes.data(), bytes.size()); }

void AtomicFileWriter::write(const void* data, size_t num_bytes) {
  if (fd_ < 0 || committed_)
    throw Error(ErrorCode::kInternal, "AtomicFileWriter::write after commit for " + path_.string());
  const char* bytes = static_cast<const char*>(data);
  while (num_bytes > 0) {
    const ssize_t written = ::write(fd_, bytes, num_bytes);
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) fail("write", written < 0 ? errno : EIO);
    bytes += written;
    num_bytes -= static_cast<size_t>(written);
  }
}

void AtomicFileWriter::write_at(uint64_t offset, const void* data, size_t num_bytes) {
  if (fd_ < 0 || committed_)
    throw Error(ErrorCode::kInternal, "AtomicFileWriter::write_at after commit for " + path_.string());
  const char* bytes = static_cast<const char*>(data);
  while (num_bytes > 0) {
    const ssize_t written = ::pwrite(fd_, bytes, num_bytes, static_cast<off_t>(offset));
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) fail("write", written < 0 ? errno : EIO);
    bytes += written;
    offset += static_cast<uint64_t>(written);
    num_bytes -= static_cast<size_t>(written);
  }
}

void AtomicFileWriter::commit() {
  if (committed_) return;
  if (fd_ < 0) throw Error(ErrorCode::kInternal, "AtomicFileWriter::commit without a file for " + path_.string());
  // fsync: a rename that survives a crash must not point at data still in the page cache only.
  if (::fsync(fd_) != 0 && errno != EINVAL) fail("sync", errno);
  const int close_result = ::close(fd_);
  fd_ = -1;
  if (close_result != 0) fail("close", errno);
  // The target may have become a directory, FIFO or device since the check: look again.
  struct stat info {};
  if (::stat(path_.c_str(), &info) == 0 && !S_ISREG(info.st_mode)) {
    ::unlink(temp_path_.c_str());
    committed_ = true;  // nothing left to clean up
    throw Error(ErrorCode::kInvalidArgument, what_ + " " + path_.string() + " became " +
                                                 type_of_mode(info.st_mode) + " during the run; nothing written");
  }
  if (std::rename(temp_path_.c_str(), path_.c_str()) != 0) fail("rename the finished file into place", errno);
  committed_ = true;
}

void write_file_atomically(const fs::path& path, std::string_view bytes, const std::string& what) {
  AtomicFileWriter writer(path, what);
  writer.write(bytes);
  writer.commit();
}

}  // namespace epic::files
