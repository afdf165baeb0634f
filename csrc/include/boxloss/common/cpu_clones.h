// Function multi-versioning of the CPU kernels' hot loops: compiled for
// baseline x86-64 and again for AVX2+FMA and AVX-512 (x86-64-v3 / v4); the
// loader picks the widest the CPU supports.  Helpers called from a cloned
// function must be BOXLOSS_ALWAYS_INLINE, or they run the baseline build.
// Other architectures and compilers get the single default build.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BOXLOSS_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define BOXLOSS_CPU_CLONES
#endif
#define BOXLOSS_ALWAYS_INLINE inline __attribute__((always_inline))
