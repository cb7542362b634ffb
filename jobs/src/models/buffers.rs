//! Recycled buffers for the CPU kernels' large intermediates.
//!
//! Each training step allocates the same few dozen buffers of megabytes again. Fresh from the
//! system, a buffer costs a page fault per 4 KiB at its first write: measured on a 2-core
//! machine, about 8 ms for the first pass over a 16 MiB one, as long as the pass itself. Kept
//! here between steps (up to [`MAX_BYTES`]), they are reused warm, as PyTorch's caching
//! allocator reuses its blocks.

use std::sync::Mutex;

/// Below this many values a buffer comes from malloc's heap, warm anyway.
const MIN_LEN: usize = 1 << 16;
/// What the pool keeps at most: beyond it, the oldest buffers go back to the system.
const MAX_BYTES: usize = 2 << 30;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `len` values, left as an earlier use wrote them: for outputs written whole.
pub(crate) fn take(len: usize) -> Vec<f32> {
    if len >= MIN_LEN {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let best = pool.iter().enumerate().filter(|(_, b)| b.len() >= len).min_by_key(|(_, b)| b.len());
        if let Some((i, _)) = best {
            let mut buffer = pool.swap_remove(i);
            buffer.truncate(len);
            return buffer;
        }
    }
    vec![0.0; len]
}

/// Hands a buffer back for a later [`take`].
pub(crate) fn give(buffer: Vec<f32>) {
    if buffer.len() < MIN_LEN {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    pool.push(buffer);
    let mut bytes: usize = pool.iter().map(|b| b.len() * 4).sum();
    while bytes > MAX_BYTES {
        bytes -= pool.remove(0).len() * 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_at_its_length_or_shorter() {
        let mut b = take(MIN_LEN * 3);
        b[0] = 7.0;
        let at = b.as_ptr();
        give(b);
        let again = take(MIN_LEN * 2);
        // Other tests may take it first; when this one gets it, it is the same memory.
        if again.as_ptr() == at {
            assert_eq!((again.len(), again[0]), (MIN_LEN * 2, 7.0));
        }
        assert_eq!(take(10), vec![0.0; 10], "small buffers are fresh");
    }
}
