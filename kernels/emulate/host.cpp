// Host emulation of kernels/fused.cu: compiles the same kernel source as ordinary C++ and runs
// a launch as the GPU would (every block, every thread), so the kernels' arithmetic, indexing
// and the Rust side's arguments can be checked on a machine without a GPU
// (src/launch/emulate.rs, tests/kernel_emulation.rs). Built by build.rs only when
// OPTLAB_EMULATE_KERNELS=1.
//
// Launches are serialized (one mutex) and blocks run one after another, so a function-static
// array stands in for shared memory. Within a block, threads run one after another, except in
// kernels marked ENTRY_SYNC (they use __syncthreads): there each thread is a fiber (ucontext)
// and __syncthreads yields to a scheduler that resumes every thread only once all have reached
// the barrier (the kernels' barriers are reached by every thread, as CUDA requires).

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

struct dim3 {
    unsigned int x = 0, y = 0, z = 0;
};

static dim3 threadIdx;
static dim3 blockIdx;
static dim3 blockDim;
static dim3 gridDim;

// Fibers of the current block (ENTRY_SYNC kernels only).
static ucontext_t scheduler;
static std::vector<ucontext_t> fibers;
static std::vector<char> fiber_done;
static unsigned fiber_current = 0;
static void (*fiber_kernel)(const void*) = nullptr;
static const void* fiber_args = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
static inline void __syncthreads() { swapcontext(&fibers[fiber_current], &scheduler); }
static void fiber_main() {
    fiber_kernel(fiber_args);
    fiber_done[fiber_current] = 1;
    // Returning switches to uc_link, the scheduler.
}
using std::fmax;
using std::isfinite;
using std::sqrt;

struct Kernel {
    void (*f32)(const void*);
    void (*f64)(const void*);
    bool sync;
};
static std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> r;
    return r;
}
struct Register {
    Register(const char* name, Kernel k) { registry()[name] = k; }
};

template <typename T> struct Args;
#define ENTRY_IMPL(name, call_f32, call_f64, is_sync)                                     \
    static void name##_f32(const void* p) { call_f32(*static_cast<const Args<float>*>(p)); }   \
    static void name##_f64(const void* p) { call_f64(*static_cast<const Args<double>*>(p)); }  \
    static Register register_##name(#name, Kernel{name##_f32, name##_f64, is_sync});
#define ENTRY(name, body) ENTRY_IMPL(name, body<float>, body<double>, false)
#define ENTRY2(name, body, flag) ENTRY_IMPL(name, (body<float, flag>), (body<double, flag>), false)
#define ENTRY_SYNC(name, body) ENTRY_IMPL(name, body<float>, body<double>, true)

#include "../fused.cu"

// Runs `name` (with its _f32/_f64 suffix) over `grid` blocks of `block` threads with the
// argument block at `args`. Returns 0, or -1 for an unknown kernel.
extern "C" int optlab_emulate_launch(const char* name, const void* args, unsigned grid,
                                     unsigned block) {
    std::string full(name);
    bool f64;
    if (full.size() > 4 && full.compare(full.size() - 4, 4, "_f32") == 0) {
        f64 = false;
    } else if (full.size() > 4 && full.compare(full.size() - 4, 4, "_f64") == 0) {
        f64 = true;
    } else {
        return -1;
    }
    auto it = registry().find(full.substr(0, full.size() - 4));
    if (it == registry().end()) return -1;
    static std::mutex launch_lock;
    std::lock_guard<std::mutex> guard(launch_lock);
    const Kernel k = it->second;
    void (*f)(const void*) = f64 ? k.f64 : k.f32;
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    if (!k.sync) {
        // No __syncthreads: the threads may run one after another.
        for (unsigned b = 0; b < grid; ++b) {
            blockIdx = dim3{b, 0, 0};
            for (unsigned t = 0; t < block; ++t) {
                threadIdx = dim3{t, 0, 0};
                f(args);
            }
        }
        return 0;
    }
    const size_t stack_size = 64 * 1024;
    std::vector<char> stacks((size_t)block * stack_size);
    fibers.assign(block, ucontext_t{});
    fiber_kernel = f;
    fiber_args = args;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx = dim3{b, 0, 0};
        fiber_done.assign(block, 0);
        for (unsigned t = 0; t < block; ++t) {
            getcontext(&fibers[t]);
            fibers[t].uc_stack.ss_sp = stacks.data() + (size_t)t * stack_size;
            fibers[t].uc_stack.ss_size = stack_size;
            fibers[t].uc_link = &scheduler;
            makecontext(&fibers[t], fiber_main, 0);
        }
        // Each round runs every unfinished thread up to its next barrier (or its end).
        for (bool running = true; running;) {
            running = false;
            for (unsigned t = 0; t < block; ++t) {
                if (fiber_done[t]) continue;
                fiber_current = t;
                threadIdx = dim3{t, 0, 0};
                swapcontext(&scheduler, &fibers[t]);
                running = running || !fiber_done[t];
            }
        }
    }
    return 0;
}
