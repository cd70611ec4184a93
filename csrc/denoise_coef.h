// The columns of the per-row denoising coefficient table, for the CPU and CUDA kernels alike.
// pyserve.kernels.types.Coef is the definition they follow; both extensions export this layout
// (DENOISE_COEF) and a test holds them to it.
#pragma once

namespace pyserve {

enum DenoiseCoef : int {
  GUIDANCE, X0_X, X0_OUT, EPS_X, EPS_OUT, CLIP, NEXT_X, NEXT_X0, NEXT_EPS, NEXT_PREV_X0, NOISE,
  NUM_COEF  // the table's width
};

// name -> column, for the extensions' DENOISE_COEF dicts
constexpr struct {
  const char* name;
  int column;
} kDenoiseCoefNames[] = {{"GUIDANCE", GUIDANCE}, {"X0_X", X0_X}, {"X0_OUT", X0_OUT}, {"EPS_X", EPS_X},
                         {"EPS_OUT", EPS_OUT}, {"CLIP", CLIP}, {"NEXT_X", NEXT_X}, {"NEXT_X0", NEXT_X0},
                         {"NEXT_EPS", NEXT_EPS}, {"NEXT_PREV_X0", NEXT_PREV_X0}, {"NOISE", NOISE},
                         {"COUNT", NUM_COEF}};

}  // namespace pyserve
