// The compiled KV-cached sampler (mingpt._C.KVSampler), bound from the module init in extension.cpp.
#pragma once

#include <torch/extension.h>

void init_sampler(pybind11::module& m);
