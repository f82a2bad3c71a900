// Shared by the test suites: assert that a call throws epic::Error with a given code and a
// message naming every expected word (file, tensor, field, fix).
#pragma once

#include <gtest/gtest.h>

#include <initializer_list>
#include <string>

#include "kernels/error.h"

namespace epic::testing {

// Runs body and checks it throws epic::Error with `code` and a message containing every word.
template <typename Body>
void expect_error(Body&& body, ErrorCode code, std::initializer_list<std::string> words) {
  try {
    body();
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_EQ(code, error.code()) << "got code " << error_code_name(error.code())
                                  << " with message: " << message;
    for (const std::string& word : words) {
      EXPECT_NE(std::string::npos, message.find(word)) << "message lacks '" << word << "': " << message;
    }
    return;
  } catch (const std::exception& other) {
    ADD_FAILURE() << "expected epic::Error(" << error_code_name(code)
                  << "), got another exception: " << other.what();
    return;
  }
  ADD_FAILURE() << "expected epic::Error(" << error_code_name(code) << "), but nothing was thrown";
}

}  // namespace epic::testing
