//! Server selection: smooth weighted round robin, least connections and consistent
//! hashing. Each picks among the servers a caller says are eligible; none of them
//! waits or claims anything (that is [`super::Pool::acquire`]'s job).

use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Smooth weighted round robin (nginx's algorithm): over any sequence of picks each
/// eligible server is chosen in proportion to its weight, interleaved rather than in
/// bursts, and an ineligible server simply sits out.
#[derive(Debug)]
pub struct SmoothWrr {
    current: Mutex<Vec<i64>>,
}

impl SmoothWrr {
    pub fn new(n: usize) -> Self {
        SmoothWrr {
            current: Mutex::new(vec![0; n]),
        }
    }

    pub fn pick(&self, weights: &[u32], eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let mut cur = self.current.lock();
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (i, &w) in weights.iter().enumerate() {
            if w == 0 || !eligible(i) {
                continue;
            }
            cur[i] += w as i64;
            total += w as i64;
            if best.is_none_or(|b| cur[i] > cur[b]) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            cur[b] -= total;
        }
        best
    }
}

/// Least connections: the eligible server with the fewest in-flight requests per unit
/// of weight; ties go round robin so equal servers share the load.
#[derive(Debug, Default)]
pub struct LeastConn {
    start: AtomicUsize,
}

impl LeastConn {
    pub fn pick(
        &self,
        weights: &[u32],
        in_flight: impl Fn(usize) -> u32,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = weights.len();
        if n == 0 {
            return None;
        }
        let start = self.start.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, u64, u64)> = None; // (index, in_flight, weight)
        for k in 0..n {
            let i = (start + k) % n;
            let w = weights[i] as u64;
            if w == 0 || !eligible(i) {
                continue;
            }
            let f = in_flight(i) as u64;
            // compare f/w < bf/bw without division
            if best.is_none_or(|(_, bf, bw)| f * bw < bf * w) {
                best = Some((i, f, w));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

/// A ketama-style ring: 160 points per unit of weight (fewer when the pool's total
/// weight would make the ring larger than [`MAX_RING_POINTS`]); a key maps to the
/// first point at or after its hash, walking on past ineligible servers. Adding or
/// removing one server moves only about 1/n of the keys.
#[derive(Debug)]
pub struct HashRing {
    points: Vec<(u64, usize)>,
}

const POINTS_PER_WEIGHT: u64 = 160;

/// Most points of one ring (16 bytes each: 16 MiB). A pool whose servers' weights
/// add up past `MAX_RING_POINTS / 160` gets fewer points per unit of weight (at
/// least one), so a long server list (a name resolving to many addresses) cannot
/// blow the ring up.
pub const MAX_RING_POINTS: u64 = 1 << 20;

impl HashRing {
    /// `labels[i]` identifies server i (its configured address), `weights[i]` its weight.
    pub fn new(labels: &[String], weights: &[u32]) -> Self {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let per_weight = (MAX_RING_POINTS / total.max(1)).clamp(1, POINTS_PER_WEIGHT);
        let mut points = Vec::with_capacity((total * per_weight).min(MAX_RING_POINTS) as usize);
        for (i, (label, &w)) in labels.iter().zip(weights).enumerate() {
            for p in 0..u64::from(w) * per_weight {
                let h = hash64(format!("{label}-{p}").as_bytes());
                points.push((h, i));
            }
        }
        points.sort_unstable();
        HashRing { points }
    }

    pub fn pick(&self, key: &[u8], eligible: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let h = hash64(key);
        let start = self.points.partition_point(|&(p, _)| p < h);
        let n = self.points.len();
        let mut tried: u64 = 0; // bitset for small pools; fall back to walking everything
        for k in 0..n {
            let (_, i) = self.points[(start + k) % n];
            if i < 64 {
                if tried & (1 << i) != 0 {
                    continue;
                }
                tried |= 1 << i;
            }
            if eligible(i) {
                return Some(i);
            }
        }
        None
    }
}

/// FNV-1a followed by a 64-bit finalizer: stable across processes and builds, so
/// every edge instance maps a key to the same server.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finalizer for a good spread on the ring
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_wrr_follows_weights_and_interleaves() {
        let wrr = SmoothWrr::new(3);
        let weights = [5, 1, 1];
        let picks: Vec<usize> = (0..7)
            .map(|_| wrr.pick(&weights, |_| true).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 5);
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn smooth_wrr_skips_ineligible_and_zero_weight_servers() {
        let wrr = SmoothWrr::new(3);
        for _ in 0..10 {
            assert_eq!(wrr.pick(&[1, 0, 1], |i| i != 2), Some(0));
        }
        assert_eq!(wrr.pick(&[1, 1], |_| false), None);
    }

    #[test]
    fn least_conn_prefers_fewest_in_flight_per_weight() {
        let lc = LeastConn::default();
        let flights = [4u32, 1, 3];
        assert_eq!(lc.pick(&[1, 1, 1], |i| flights[i], |_| true), Some(1));
        // weight 4 with 3 in flight beats weight 1 with 1 in flight
        assert_eq!(lc.pick(&[1, 1, 4], |i| flights[i], |_| true), Some(2));
        assert_eq!(lc.pick(&[1, 1, 1], |i| flights[i], |i| i == 0), Some(0));
    }

    #[test]
    fn least_conn_spreads_ties() {
        let lc = LeastConn::default();
        let mut seen = [0; 3];
        for _ in 0..30 {
            seen[lc.pick(&[1, 1, 1], |_| 0, |_| true).unwrap()] += 1;
        }
        assert_eq!(seen, [10, 10, 10]);
    }

    #[test]
    fn a_heavy_pool_gets_a_bounded_ring_with_every_server_on_it() {
        let labels: Vec<String> = (0..40).map(|i| format!("10.0.0.{i}:80")).collect();
        let ring = HashRing::new(&labels, &[1000; 40]);
        assert!(ring.points.len() as u64 <= MAX_RING_POINTS);
        let mut on_ring = [false; 40];
        ring.points.iter().for_each(|&(_, i)| on_ring[i] = true);
        assert!(on_ring.iter().all(|&x| x));
        // far past the bound: one point per unit of weight, no more
        let labels: Vec<String> = (0..3).map(|i| format!("10.0.1.{i}:80")).collect();
        let ring = HashRing::new(&labels, &[u32::MAX / 4096, 1, 0]);
        assert_eq!(ring.points.len() as u64, u64::from(u32::MAX / 4096) + 1);
    }

    #[test]
    fn hash_ring_is_sticky_and_moves_few_keys_when_a_server_leaves() {
        let labels: Vec<String> = (0..4).map(|i| format!("10.0.0.{i}:80")).collect();
        let ring = HashRing::new(&labels, &[1, 1, 1, 1]);
        let keys: Vec<String> = (0..2000).map(|i| format!("client-{i}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| ring.pick(k.as_bytes(), |_| true).unwrap())
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .map(|k| ring.pick(k.as_bytes(), |_| true).unwrap())
            .collect();
        assert_eq!(before, again);
        let mut counts = [0usize; 4];
        before.iter().for_each(|&i| counts[i] += 1);
        assert!(counts.iter().all(|&c| c > 300), "uneven spread {counts:?}");
        // server 3 goes down: only its keys move
        let after: Vec<usize> = keys
            .iter()
            .map(|k| ring.pick(k.as_bytes(), |i| i != 3).unwrap())
            .collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 3 {
                assert_eq!(b, a);
            } else {
                assert_ne!(*a, 3);
            }
        }
    }
}
