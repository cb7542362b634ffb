//! A tiny deterministic PRNG (splitmix64). Owning it, rather than using burn's backend RNG,
//! keeps weight init and data order independent of global state shared by every run in the
//! process (tests train concurrently) and of the version of any RNG crate.

pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A generator for one purpose (`stream`) of one seed, so that e.g. epoch 3's order does not
    /// overlap epoch 4's.
    pub(crate) fn for_stream(seed: u64, stream: u64) -> Self {
        let mut mix = SplitMix64(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        SplitMix64(mix.next_u64())
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 bits, exactly representable as f32.
    pub(crate) fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller; the second value is dropped to keep the stream simple).
    pub(crate) fn next_normal(&mut self) -> f32 {
        // 1 - u is in (0, 1], so the logarithm is finite.
        let (u, v) = (1.0 - self.next_f32(), self.next_f32());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }

    /// Uniform in 0..n (n > 0); the modulo bias is negligible for the small n used here.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Fisher-Yates shuffle.
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_streams_differ() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = SplitMix64::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let mut r = SplitMix64::new(7);
        assert_eq!(a, (0..4).map(|_| r.next_u64()).collect::<Vec<_>>());
        assert_ne!(SplitMix64::for_stream(1, 0).next_u64(), SplitMix64::for_stream(1, 1).next_u64());
        let x = SplitMix64::new(3).next_f32();
        assert!((0.0..1.0).contains(&x));
    }
}
