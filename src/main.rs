//! The `wraith` binary: parse the command line, run the subcommand, exit with its code.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// mimalloc: per-request allocations (header maps, bodies, ids) are a visible share of a
/// proxy's CPU; mimalloc's thread-local free lists make them cheaper than glibc malloc.
#[global_allocator]
static ALLOC: MiMalloc = MiMalloc;

/// mimalloc as the global allocator, like the `mimalloc` crate's `MiMalloc` but with its
/// plain entry points for what needs no more than word alignment (nearly every allocation):
/// the crate sends everything through `mi_malloc_aligned`, whose alignment checks cost ~10
/// instructions on each of the ~13 allocations of a proxied request.
struct MiMalloc;

/// What every mimalloc block is aligned to, whatever its size: one machine word (its
/// smallest size class is a word, and every class is a multiple of it).
const WORD: usize = std::mem::size_of::<usize>();

// SAFETY: mimalloc is a thread-safe allocator; the layout contract is kept by sending any
// alignment above what every mimalloc block has to its `_aligned` entry points.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

fn main() -> std::process::ExitCode {
    wraith::cli::run()
}
