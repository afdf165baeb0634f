// Shared by the C++ tests: a CHECK that counts failures without stopping, and
// the Problem the kernels read, built from a test case's settings (any struct
// with the fields used below) and its host or device buffers.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "boxloss/sparse_crf/problem.h"

inline int64_t g_checks = 0;
inline int64_t g_failures = 0;

inline void check_impl(bool ok, const char* expr, const char* file, int line, const std::string& context) {
  ++g_checks;
  if (ok) return;
  ++g_failures;
  if (g_failures <= 40) {
    std::fprintf(stderr, "FAILED %s:%d: %s\n    %s\n", file, line, expr, context.c_str());
  } else if (g_failures == 41) {
    std::fprintf(stderr, "(further failures not printed)\n");
  }
}

#define CHECK(cond, context) check_impl(static_cast<bool>(cond), #cond, __FILE__, __LINE__, (context))

template <typename Config>
boxloss::sparse_crf::Problem make_problem(const Config& config, const void* probs, const void* image,
                                          const uint8_t* valid, const int32_t* channels) {
  boxloss::sparse_crf::Problem p;
  p.probs = probs;
  p.image = image;
  p.valid = valid;
  p.channels = config.channels.empty() ? nullptr : channels;
  p.batch = config.batch;
  p.num_channels = config.num_channels;
  p.height = config.height;
  p.width = config.width;
  p.image_channels = config.image_channels;
  p.num_selected = config.channels.empty() ? config.num_channels : static_cast<int64_t>(config.channels.size());
  p.neighbourhood = config.neighbourhood;
  p.dilation = config.dilation;
  p.sigma = config.sigma;
  p.kind = config.kind;
  return p;
}
