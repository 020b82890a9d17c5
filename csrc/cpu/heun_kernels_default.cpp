// cpu/heun_kernels.h for any CPU (at::vec's portable Vectorized).
#define CPU_CAPABILITY DEFAULT
#define VDMPP_KERNELS_FN kernels_default
#include "heun_kernels.h"
