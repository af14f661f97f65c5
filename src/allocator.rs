//! The allocator of moera's binaries (the CLI, the training benchmark); the library leaves
//! the choice to its users. With glibc's, every freed large tensor goes back to the OS and
//! returns as fresh zeroed pages: 15 % of a LoRA training step on flex went to clearing
//! pages. mimalloc, told to keep what is freed, reuses it (BENCHMARKS.md).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in `mimalloc.h` (v2 and v3), which libmimalloc-sys does not name.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never hands freed memory back to the OS: the process keeps its peak footprint and
/// reuses it. Call first thing in `main`, before any thread starts.
pub fn keep_freed_memory() {
    // SAFETY: sets a plain option before other threads exist (mimalloc's options are not
    // synchronized).
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}
