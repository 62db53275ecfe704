//! The binary's allocator: mimalloc, counting the bytes the process holds
//! (and their peak, a stage's peak memory in the run manifest), with an
//! optional hard cap for `ward query`.
//!
//! DataFusion's memory pool (`--memory-limit`) bounds what its operators
//! account for — hash tables, sort buffers, the result — but not what a
//! scalar or table function allocates (`repeat('x', 1500000000)`,
//! `range(1, 1e9)`, a `string_agg` of large strings). The cap bounds the
//! process instead: an allocation that would take the bytes held past it
//! writes a fixed message to stderr and ends the process with exit code 3,
//! before the allocation happens. Nothing is written to `--out` then (the
//! output file is created only after the query has finished).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The process's allocator (see the module documentation).
pub struct Capped;

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`, the same in v2 and v3;
/// libmimalloc-sys does not name it).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory settings of the batch commands (all but `ward serve`). Keeps
/// the memory the process frees for its own reuse instead of
/// returning it to the system a second after it is freed (mimalloc's
/// default). The stages allocate and free batches and buffers over and
/// over, and each page returned and taken again is faulted in and zeroed
/// by the kernel anew: at 1M persons that was 25–31 s of system time in a
/// 126 s `ward run --full` (10 s kept, 114–117 s wall; `ward ingest` and
/// `ward measure` alone about 10 % faster too). The price: the process
/// holds its largest stage's memory until it ends (peak 3.7 GB instead of
/// 2.5–2.7 GB), and a stage's peak in the manifest includes what earlier
/// stages left free. Not for `ward serve`, which would hold one large
/// query's memory for as long as it serves.
///
/// The same for the C allocator, which libzstd uses for its workspace of
/// several megabytes, allocated anew for every Parquet page compressed:
/// glibc served blocks that large with a fresh `mmap` and unmapped them
/// when freed, so the kernel zeroed their pages again for every page
/// written (87 % of ingest's page faults, 8 % of its CPU). Blocks up to
/// 32 MB (glibc's largest threshold) now come from its heap, which keeps
/// up to 256 MB freed before returning memory.
///
/// And no transparent huge pages: mimalloc asks for them, and a huge page
/// is zeroed whole by the kernel the first time any byte of it is touched.
/// A night's memory is touched fresh once per process, and on a virtual
/// machine whose host backs guest memory lazily each fresh page costs
/// more than zeroing it. At 1M persons on the 2-core VM (interleaved
/// pairs): the 1 %-new night 16.4-16.6 s -> 14.5-14.6 s (system time 8 ->
/// 4-5 s), a `--full` night 115 -> 108 s.
pub fn batch_memory_settings() {
    // SAFETY: sets one of mimalloc's documented options (-1: never purge).
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(2) with documented arguments; it only sets a flag of
    // this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt(3) with documented parameters, before other threads
    // allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Bytes currently allocated through [`Capped`].
static HELD: AtomicUsize = AtomicUsize::new(0);
/// The most [`HELD`] has been since [`reset_peak`].
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The cap in bytes; 0: none.
static CAP: AtomicUsize = AtomicUsize::new(0);
/// What to print when the cap is reached (formatted in [`set_cap`], since
/// the allocator must not allocate to report).
static MESSAGE: OnceLock<Box<[u8]>> = OnceLock::new();

/// Exit code of a process stopped at its cap (a failed run, like any other
/// query that cannot finish).
const EXIT: i32 = 3;

/// Bytes the process holds now.
pub fn held() -> usize {
    HELD.load(Relaxed)
}

/// The most bytes the process has held at once since [`reset_peak`].
pub fn peak() -> u64 {
    PEAK.load(Relaxed) as u64
}

/// Starts a new [`peak`] from the bytes held now.
pub fn reset_peak() {
    PEAK.store(HELD.load(Relaxed), Relaxed);
}

/// From now on, an allocation that would take the process past `bytes`
/// prints `message` (one line) and exits with code 3. Set once.
pub fn set_cap(bytes: usize, message: String) {
    let mut line = message.into_bytes();
    line.push(b'\n');
    if MESSAGE.set(line.into_boxed_slice()).is_ok() {
        CAP.store(bytes, Relaxed);
    }
}

#[cold]
fn exceeded() -> ! {
    let message = MESSAGE.get().map(|m| &m[..]).unwrap_or(b"out of memory\n");
    // SAFETY: write(2) on stderr from a static buffer and _exit(2) neither
    // allocate nor run destructors, so they are safe inside the allocator.
    unsafe {
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(EXIT)
    }
}

/// Counts `size` more bytes held; stops the process past the cap.
fn grow(size: usize) {
    let now = HELD.fetch_add(size, Relaxed).saturating_add(size);
    if now > PEAK.load(Relaxed) {
        PEAK.fetch_max(now, Relaxed);
    }
    let cap = CAP.load(Relaxed);
    if cap != 0 && now > cap {
        exceeded();
    }
}

// SAFETY: every call is forwarded to mimalloc unchanged; only counters are
// kept around it.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        // SAFETY: the caller's contract is mimalloc's.
        let p = unsafe { mimalloc::MiMalloc.alloc(layout) };
        if p.is_null() {
            HELD.fetch_sub(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        // SAFETY: as for `alloc`.
        let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
        if p.is_null() {
            HELD.fetch_sub(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old {
            grow(new_size - old);
        }
        // SAFETY: as for `alloc`.
        let p = unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > old {
                HELD.fetch_sub(new_size - old, Relaxed);
            }
        } else if new_size < old {
            HELD.fetch_sub(old - new_size, Relaxed);
        }
        p
    }
}
