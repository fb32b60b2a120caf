// Programmatic dependent launch (kernels/build.py launch): a kernel launched as a programmatic
// dependent may start while the kernel before it on the stream runs; sm_90 and later, no-ops below.
#pragma once

// Wait until the kernel before this one has completed and its writes are visible (a no-op when
// this kernel was launched plainly). Every thread of a dependent kernel calls it before it reads
// what an earlier kernel wrote, or writes what a later one reads, and before it exits.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Let the dependent kernel after this one be scheduled now (its blocks then wait in pdl_wait);
// without it that happens as this kernel's blocks exit. It orders nothing: the dependent still
// sees this kernel's writes only after pdl_wait.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
