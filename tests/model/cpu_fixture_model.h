// A test suite's base holding the committed qwen3_moe_f32 golden fixture loaded once for the whole suite: its
// config, a CPU backend and the weights in that backend's memory (the generation loop and engine tests).
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <memory>

#include "kernels/backend.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/weight_source.h"

namespace epic::testing {

class CpuFixtureModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::filesystem::path dir = std::filesystem::path(EPIC_GOLDEN_DIR) / "qwen3_moe_f32";
    config_ = new ModelConfig(ModelConfig::load(dir));
    backend_ = make_cpu_backend().release();
    const std::unique_ptr<WeightSource> source = open_checkpoint_source(dir);
    weights_ = new ModelWeights(load_model_weights(*config_, *source, *backend_, LoadOptions{}));
  }
  static void TearDownTestSuite() {
    delete weights_;
    delete backend_;
    delete config_;
  }

  inline static ModelConfig* config_ = nullptr;
  inline static Backend* backend_ = nullptr;  // the weights live in its memory
  inline static ModelWeights* weights_ = nullptr;
};

}  // namespace epic::testing
