//! A global allocator for training binaries that keeps large freed blocks for reuse.
//!
//! candle allocates a fresh buffer for every op's output. A training step of the `d256-l3`
//! preset (16 × 512 tokens) creates activations of 8–67 MB (MLP hidden states, attention
//! scores); the system allocator serves blocks that large with a fresh `mmap` and returns them
//! with `munmap`, so every page of every activation faults in again at every step. Measured on
//! that preset (one thread), page faults took about half of the process's CPU time. Keeping
//! the freed blocks, keyed by exact size, lets the next step reuse them: a step allocates the
//! same shapes every time.
//!
//! Blocks of at least [`MIN_BLOCK`] bytes are cached, up to [`SLOTS`] blocks and the byte limit
//! given to [`ReuseLargeBlocks::new`]; when a freed block does not fit, the oldest cached
//! blocks are released first. Smaller requests go straight to the system allocator. The cache
//! is guarded by a spin lock (allocation is rare relative to the work on each block, and the
//! lock is never held while calling anything that could allocate).
//!
//! ```no_run
//! #[global_allocator]
//! static GLOBAL: optlab::runner::alloc::ReuseLargeBlocks =
//!     optlab::runner::alloc::ReuseLargeBlocks::new(8 << 30);
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Smallest block size that is cached (1 MiB).
pub const MIN_BLOCK: usize = 1 << 20;
/// Most blocks cached at once.
pub const SLOTS: usize = 256;

#[derive(Clone, Copy)]
struct Slot {
    ptr: *mut u8,
    size: usize,
    align: usize,
    /// When it was cached (a counter), for oldest-first release.
    age: u64,
}

const EMPTY: Slot = Slot {
    ptr: std::ptr::null_mut(),
    size: 0,
    align: 0,
    age: 0,
};

struct Cache {
    slots: [Slot; SLOTS],
    bytes: usize,
    clock: u64,
}

/// Counters of a [`ReuseLargeBlocks`] allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocStats {
    /// Large allocations served from the cache.
    pub hits: u64,
    /// Large allocations passed to the system allocator.
    pub misses: u64,
    /// Cached blocks released to make room (or too large to cache).
    pub released: u64,
}

/// The system allocator, plus a cache of large freed blocks (see the module docs).
pub struct ReuseLargeBlocks {
    max_bytes: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    released: AtomicU64,
    lock: AtomicBool,
    cache: UnsafeCell<Cache>,
}

// SAFETY: the cache is only touched while `lock` is held.
unsafe impl Sync for ReuseLargeBlocks {}

impl ReuseLargeBlocks {
    /// An allocator caching at most `max_bytes` of freed blocks.
    pub const fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            released: AtomicU64::new(0),
            lock: AtomicBool::new(false),
            cache: UnsafeCell::new(Cache {
                slots: [EMPTY; SLOTS],
                bytes: 0,
                clock: 0,
            }),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> AllocStats {
        AllocStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
        }
    }

    /// Runs `f` on the cache under the spin lock.
    fn with_cache<R>(&self, f: impl FnOnce(&mut Cache) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: the lock gives exclusive access until it is released below.
        let out = f(unsafe { &mut *self.cache.get() });
        self.lock.store(false, Ordering::Release);
        out
    }

    /// A cached block of exactly this layout, if any.
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        let got = self.with_cache(|c| {
            let slot = c.slots.iter_mut().find(|s| {
                !s.ptr.is_null() && s.size == layout.size() && s.align == layout.align()
            })?;
            let ptr = slot.ptr;
            *slot = EMPTY;
            c.bytes -= layout.size();
            Some(ptr)
        });
        let counter = if got.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        got
    }

    /// Caches a freed block; returns the blocks to release to the system (the block itself
    /// when it cannot be cached, or older blocks evicted to make room).
    fn put(&self, ptr: *mut u8, layout: Layout, evicted: &mut [Slot; 8]) -> usize {
        if layout.size() > self.max_bytes {
            evicted[0] = Slot {
                ptr,
                size: layout.size(),
                align: layout.align(),
                age: 0,
            };
            return 1;
        }
        self.with_cache(|c| {
            let mut n = 0;
            loop {
                let full = c.slots.iter().all(|s| !s.ptr.is_null());
                if !full && c.bytes + layout.size() <= self.max_bytes {
                    break;
                }
                if n + 1 == evicted.len() {
                    // Too much to evict at once: release the new block as well.
                    evicted[n] = Slot {
                        ptr,
                        size: layout.size(),
                        align: layout.align(),
                        age: 0,
                    };
                    return n + 1;
                }
                let oldest = c
                    .slots
                    .iter_mut()
                    .filter(|s| !s.ptr.is_null())
                    .min_by_key(|s| s.age)
                    .expect("the cache is not empty when over its limits");
                c.bytes -= oldest.size;
                evicted[n] = *oldest;
                *oldest = EMPTY;
                n += 1;
            }
            c.clock += 1;
            let free = c
                .slots
                .iter_mut()
                .find(|s| s.ptr.is_null())
                .expect("checked above");
            *free = Slot {
                ptr,
                size: layout.size(),
                align: layout.align(),
                age: c.clock,
            };
            c.bytes += layout.size();
            n
        })
    }
}

unsafe impl GlobalAlloc for ReuseLargeBlocks {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_BLOCK {
            if let Some(p) = self.take(layout) {
                return p;
            }
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_BLOCK {
            if let Some(p) = self.take(layout) {
                // SAFETY: `p` holds `layout.size()` writable bytes.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                return p;
            }
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() < MIN_BLOCK {
            // SAFETY: `ptr` came from `System` with this layout.
            unsafe { System.dealloc(ptr, layout) };
            return;
        }
        let mut release = [EMPTY; 8];
        let n = self.put(ptr, layout, &mut release);
        self.released.fetch_add(n as u64, Ordering::Relaxed);
        for s in &release[..n] {
            // SAFETY: every cached block came from `System` with the size and alignment it
            // was cached with.
            unsafe {
                System.dealloc(s.ptr, Layout::from_size_align_unchecked(s.size, s.align));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_exact_sizes_and_respects_the_limit() {
        let a = ReuseLargeBlocks::new(3 * MIN_BLOCK);
        let big = Layout::from_size_align(MIN_BLOCK, 8).unwrap();
        let bigger = Layout::from_size_align(2 * MIN_BLOCK, 8).unwrap();
        let small = Layout::from_size_align(64, 8).unwrap();
        unsafe {
            let p = a.alloc(big);
            p.write(7);
            a.dealloc(p, big);
            let q = a.alloc(big);
            assert_eq!(p, q, "the freed block is reused");
            let z = {
                a.dealloc(q, big);
                a.alloc_zeroed(big)
            };
            assert_eq!(z, p);
            assert!(std::slice::from_raw_parts(z, MIN_BLOCK)
                .iter()
                .all(|&b| b == 0));
            // A different size is not served from the cache.
            let r = a.alloc(bigger);
            assert_ne!(r, z);
            a.dealloc(z, big);
            a.dealloc(r, bigger);
            a.with_cache(|c| assert_eq!(c.bytes, 3 * MIN_BLOCK));
            // Over the limit: older blocks are released to make room.
            let s = a.alloc(big);
            assert_eq!(s, z);
            let t = a.alloc(big);
            a.dealloc(s, big);
            a.dealloc(t, big);
            a.with_cache(|c| assert!(c.bytes <= 3 * MIN_BLOCK));
            // Larger than the whole cache: released at once.
            let huge = Layout::from_size_align(4 * MIN_BLOCK, 8).unwrap();
            let h = a.alloc(huge);
            a.dealloc(h, huge);
            a.with_cache(|c| assert!(c.slots.iter().all(|s| s.ptr != h)));
            let m = a.alloc(small);
            a.dealloc(m, small);
        }
    }
}
