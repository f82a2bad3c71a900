// kernels/file_io.h: inputs must be regular files (a FIFO, directory, device or dangling link is
// refused at once, never opened), outputs are checked before any work, and AtomicFileWriter never
// leaves a partial file or a temporary behind and never renames over a device, FIFO or directory.
#include "tests/support/file_contents.h"
#include "kernels/file_io.h"

#include <gtest/gtest.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "kernels/error.h"
#include "tests/model/temp_dir.h"

namespace epic::files {
namespace {

namespace fs = std::filesystem;

// Runs action, which must throw Error(code); returns its message.
template <typename Action>
std::string error_of(Action action, ErrorCode code) {
  try {
    action();
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), code) << error.what();
    return error.what();
  }
  ADD_FAILURE() << "no epic::Error was thrown";
  return "";
}

void write_plain(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

class FileIo : public ::testing::Test {
 protected:
  void SetUp() override {
    regular_ = dir() / "regular.txt";
    write_plain(regular_, "contents");
    fifo_ = dir() / "pipe";
    ASSERT_EQ(::mkfifo(fifo_.c_str(), 0600), 0);
    folder_ = dir() / "folder";
    fs::create_directory(folder_);
    dangling_ = dir() / "dangling";
    fs::create_symlink(dir() / "nowhere", dangling_);
    link_to_regular_ = dir() / "link";
    fs::create_symlink(regular_, link_to_regular_);
  }
  const fs::path& dir() const { return temp_.path(); }
  testing::TempDir temp_;
  fs::path regular_, fifo_, folder_, dangling_, link_to_regular_;
};

TEST_F(FileIo, DescribesEachKindOfFile) {
  EXPECT_EQ(describe_file_type(regular_), "a regular file");
  EXPECT_EQ(describe_file_type(link_to_regular_), "a regular file");
  EXPECT_EQ(describe_file_type(fifo_), "a FIFO (named pipe)");
  EXPECT_EQ(describe_file_type(folder_), "a directory");
  EXPECT_EQ(describe_file_type("/dev/null"), "a character device");
  EXPECT_EQ(describe_file_type(dangling_), "a dangling symbolic link");
  EXPECT_EQ(describe_file_type(dir() / "absent"), "missing");
}

TEST_F(FileIo, RequireRegularFileRefusesEverythingElseNamingPathAndKind) {
  require_regular_file(regular_, "--input");
  require_regular_file(link_to_regular_, "--input");
  const std::pair<fs::path, std::string> refused[] = {{fifo_, "FIFO"},
                                                      {folder_, "directory"},
                                                      {"/dev/null", "character device"},
                                                      {dangling_, "dangling symbolic link"},
                                                      {dir() / "absent", "no such file"}};
  for (const auto& [path, kind] : refused) {
    SCOPED_TRACE(path.string());
    const std::string message =
        error_of([&] { require_regular_file(path, "--input"); }, ErrorCode::kInvalidArgument);
    EXPECT_NE(message.find("--input"), std::string::npos) << message;
    EXPECT_NE(message.find(path.string()), std::string::npos) << message;
    EXPECT_NE(message.find(kind), std::string::npos) << message;
  }
}

// A FIFO with no writer would block an open() for reading forever: it is refused before any open
// (this test would hang, and ctest time it out, without the check).
TEST_F(FileIo, ReadFileReadsRegularFilesAndRefusesAFifoWithoutBlocking) {
  EXPECT_EQ(read_file(regular_, "--input"), "contents");
  EXPECT_EQ(read_file(link_to_regular_, "--input"), "contents");
  const std::string message =
      error_of([&] { read_file(fifo_, "--prompts-file"); }, ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("FIFO"), std::string::npos) << message;
  error_of([&] { read_file("/dev/zero", "--input"); }, ErrorCode::kInvalidArgument);  // endless otherwise
  error_of([&] { read_file(folder_, "--input"); }, ErrorCode::kInvalidArgument);
}

TEST_F(FileIo, ReadFileRefusesFilesOverTheLimit) {
  const std::string message =
      error_of([&] { read_file(regular_, "--input", 3); }, ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("more than the 3 bytes"), std::string::npos) << message;
  EXPECT_EQ(read_file(regular_, "--input", 8), "contents");
}

TEST_F(FileIo, CheckOutputPathAcceptsAbsentOrRegularTargetsInAWritableFolder) {
  check_output_path(dir() / "new.bin", "--out");
  check_output_path(regular_, "--out");
  check_output_path(link_to_regular_, "--out");
}

TEST_F(FileIo, CheckOutputPathRefusesDevicesFifosFoldersAndMissingFolders) {
  const std::pair<fs::path, std::string> refused[] = {
      {"/dev/full", "character device"},
      {fifo_, "FIFO"},
      {folder_, "directory"},
      {dir() / "no_such_folder" / "out.npy", "does not exist"},
      {regular_ / "out.npy", "Not a directory"},  // a "folder" that is a regular file
      {"", "empty"}};
  for (const auto& [path, words] : refused) {
    SCOPED_TRACE(path.string());
    const std::string message =
        error_of([&] { check_output_path(path, "--logits-out"); }, ErrorCode::kInvalidArgument);
    EXPECT_NE(message.find("--logits-out"), std::string::npos) << message;
    EXPECT_NE(message.find(words), std::string::npos) << message;
  }
  EXPECT_TRUE(fs::is_character_file("/dev/full"));
  EXPECT_TRUE(fs::is_fifo(fifo_));
}

// Root passes access(W_OK) on any folder, so the permission check only bites for other users;
// root's writes there really succeed, so accepting them is right.
TEST_F(FileIo, CheckOutputPathRefusesAReadOnlyFolderUnlessRoot) {
  const fs::path read_only = dir() / "read_only";
  fs::create_directory(read_only);
  fs::permissions(read_only, fs::perms::owner_read | fs::perms::owner_exec | fs::perms::group_read |
                                 fs::perms::group_exec | fs::perms::others_read | fs::perms::others_exec);
  if (::geteuid() == 0) {
    check_output_path(read_only / "out.json", "--report-out");
    GTEST_SKIP() << "running as root: a 0555 folder is writable for root, nothing to refuse";
  }
  const std::string message = error_of([&] { check_output_path(read_only / "out.json", "--report-out"); },
                                       ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("not writable"), std::string::npos) << message;
}

TEST_F(FileIo, AtomicWriterCommitRenamesIntoPlaceAndLeavesNoTemporary) {
  const fs::path target = dir() / "out.bin";
  {
    AtomicFileWriter writer(target, "--out");
    writer.write("hello ");
    writer.write("world", 5);
    const char patch[] = "H";
    writer.write_at(0, patch, 1);
    EXPECT_FALSE(fs::exists(target)) << "visible before commit";
    EXPECT_EQ(testing::count_atomic_writer_temporaries(dir()), 1);
    writer.commit();
  }
  EXPECT_EQ(testing::read_whole_file(target), "Hello world");
  EXPECT_EQ(testing::count_atomic_writer_temporaries(dir()), 0);
  write_file_atomically(target, "replaced", "--out");  // over a regular file
  EXPECT_EQ(testing::read_whole_file(target), "replaced");
  EXPECT_EQ(testing::count_atomic_writer_temporaries(dir()), 0);
}

TEST_F(FileIo, AtomicWriterDroppedLeavesTheTargetUntouchedAndRemovesItsTemporary) {
  {
    AtomicFileWriter writer(regular_, "--out");
    writer.write("half of a new file");
  }
  EXPECT_EQ(testing::read_whole_file(regular_), "contents");
  EXPECT_EQ(testing::count_atomic_writer_temporaries(dir()), 0);
  try {
    AtomicFileWriter writer(dir() / "never.bin", "--out");
    writer.write("partial");
    throw std::runtime_error("the run failed");
  } catch (const std::runtime_error&) {
  }
  EXPECT_FALSE(fs::exists(dir() / "never.bin"));
  EXPECT_EQ(testing::count_atomic_writer_temporaries(dir()), 0);
}

// The regression of the issue: `--logits-out /dev/full` renamed a file over the device node.
TEST_F(FileIo, AtomicWriterNeverReplacesADeviceFifoOrFolder) {
  for (const fs::path& target : {fs::path("/dev/full"), fifo_, folder_}) {
    SCOPED_TRACE(target.string());
    error_of([&] { write_file_atomically(target, "bytes", "--logits-out"); }, ErrorCode::kInvalidArgument);
  }
  EXPECT_TRUE(fs::is_character_file("/dev/full"));
  EXPECT_TRUE(fs::is_fifo(fifo_));
  EXPECT_TRUE(fs::is_directory(folder_));
  EXPECT_EQ(testing::count_atomic_writer_temporaries(dir()), 0);
}

// The target turned into a FIFO between the check and the commit: nothing is renamed over it.
TEST_F(FileIo, AtomicWriterLooksAgainAtCommit) {
  const fs::path target = dir() / "late.bin";
  AtomicFileWriter writer(target, "--out");
  writer.write("bytes");
  ASSERT_EQ(::mkfifo(target.c_str(), 0600), 0);
  const std::string message = error_of([&] { writer.commit(); }, ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("FIFO"), std::string::npos) << message;
  EXPECT_TRUE(fs::is_fifo(target));
  EXPECT_EQ(testing::count_atomic_writer_temporaries(dir()), 0);
}

// A real full file system: a 64 KiB tmpfs mounted for the test (root only; skipped visibly
// otherwise). A write past its size must be Error(kIo) naming the cause, never a short file.
TEST_F(FileIo, FullDiskIsAnIoErrorAndLeavesNoFile) {
  const fs::path mount_point = dir() / "tiny_fs";
  fs::create_directory(mount_point);
  if (::geteuid() != 0 || ::mount("tmpfs", mount_point.c_str(), "tmpfs", 0, "size=64k") != 0)
    GTEST_SKIP() << "cannot mount a 64 KiB tmpfs (needs root and mount permission): full-disk case not run";
  struct Unmount {
    fs::path path;
    ~Unmount() { ::umount(path.c_str()); }
  } unmount{mount_point};
  const fs::path target = mount_point / "logits.npy";
  const std::string big(1 << 20, 'x');  // 1 MiB into 64 KiB
  const std::string message =
      error_of([&] { write_file_atomically(target, big, "--logits-out"); }, ErrorCode::kIo);
  EXPECT_NE(message.find("No space left on device"), std::string::npos) << message;
  EXPECT_NE(message.find("--logits-out"), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(target));
  EXPECT_EQ(testing::count_atomic_writer_temporaries(mount_point), 0);
  // A small file still fits once the failed one's temporary is gone.
  write_file_atomically(target, "fits", "--logits-out");
  EXPECT_EQ(testing::read_whole_file(target), "fits");
}

// A link to /dev/full is followed: the target is the device, refused before any byte is written,
// and neither the link nor the device is replaced.
TEST_F(FileIo, LinkToADeviceIsRefusedBeforeAnyWrite) {
  const fs::path link = dir() / "full_link";
  fs::create_symlink("/dev/full", link);
  const std::string message =
      error_of([&] { AtomicFileWriter writer(link, "--logits-out"); }, ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("character device"), std::string::npos) << message;
  EXPECT_TRUE(fs::is_character_file("/dev/full"));
  EXPECT_TRUE(fs::is_symlink(link));
}

}  // namespace
}  // namespace epic::files
