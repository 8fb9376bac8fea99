// Shim of the c10 CUDA header for the emulator build (see ../../../cuda.h).
#pragma once
#include "../../../cuda.h"
