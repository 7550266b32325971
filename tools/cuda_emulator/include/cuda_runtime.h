// Stand-in for the CUDA runtime header: the emulator (tools/cuda_emulator/emu.h).
#pragma once
#include "../emu.h"
