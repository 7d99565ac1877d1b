/* A stand-in for the CUDA driver (libcuda.so.1) for scripts/mosaic_sass_stats.py on a machine
   without a GPU. Mosaic GPU's compiler (MosaicGpuCompile in the CUDA plugin) asks the driver only
   for the current device's compute capability before it runs its pipeline (MLIR passes, NVPTX,
   ptxas); this answers 9.0 (sm_90a; FAKECUDA_CC="10.0" for another), and every other entry
   point is missing, so loading the compiled module fails afterwards, once the dumps are printed. */
#include <stdio.h>
#include <stdlib.h>

typedef int CUresult;

CUresult cuInit(unsigned int flags) { (void)flags; return 0; }
CUresult cuDriverGetVersion(int *version) { *version = 13000; return 0; }
CUresult cuCtxGetDevice(int *device) { *device = 0; return 0; }

CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
  int major = 9, minor = 0;
  const char *cc = getenv("FAKECUDA_CC");
  (void)device;
  if (cc) sscanf(cc, "%d.%d", &major, &minor);
  if (attribute == 75) { *value = major; return 0; }  /* COMPUTE_CAPABILITY_MAJOR */
  if (attribute == 76) { *value = minor; return 0; }  /* COMPUTE_CAPABILITY_MINOR */
  return 1;  /* CUDA_ERROR_INVALID_VALUE */
}
