//! Process-wide tuning of the runtime libraries, applied first thing in `main` (of the `ecic`
//! binary and of the benchmarks) while the process has one thread.

/// Allocator and thread-pool settings; see [`crate::alloc::keep_freed_memory`] and below.
pub fn init() {
    crate::alloc::keep_freed_memory();
    // candle 0.11 runs its elementwise binary ops (and quantized kernels) on a pool of its own,
    // `CANDLE_NUM_THREADS` - 1 workers (default: the rayon thread count) besides rayon's, whose
    // workers spin 25,000 times after each op before they sleep. A stage's thread budget is
    // then spent twice: at 2 threads on 2 cores a candle-bp worker was 17% of all samples of a
    // training step, spinning, and the main thread waited on it after every small add. With
    // that pool off (the ops run on the calling thread; matmuls and our fused ops still use
    // rayon), 2-thread training ran faster in every case, median of 3 runs of
    // `bench_candle CASE --patch 8 --steps 20`: LoRA 110 -> 128 samples/s, adapter 130 -> 144,
    // QLoRA 109 -> 128, full 2+2 124 -> 136 (against a pool that spins 200 times; the
    // default 25,000 was slower still). A value the user set is left alone.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
