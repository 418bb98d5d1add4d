//! Smooth weighted round-robin: the order in which a service's backends take new
//! connections, laid out as the slot table the data plane walks.
//!
//! Smooth WRR (the interleaving nginx made popular) spreads each backend's turns evenly over
//! the cycle: weights 5,1,1 give `a a b a c a a`, not `a a a a a b c`. A backend with weight
//! `w` of a total `W` gets exactly `w` of every `W` consecutive slots.
//!
//! A table has at most [`SLOTS_PER_TABLE`] slots. Weights are first divided by their greatest
//! common divisor; if their sum still exceeds the table, they are scaled down in proportion
//! (largest remainder, every non-zero weight keeping at least one slot), so shares are exact
//! whenever the reduced weights fit and within one slot in 256 otherwise.

use orch_common::SLOTS_PER_TABLE;

/// Returns the slot sequence as indices into `weights`. Empty when every weight is 0.
pub fn slot_order(weights: &[u32]) -> Vec<usize> {
    let slots = fit_to_table(weights, SLOTS_PER_TABLE as u64);
    let total: u64 = slots.iter().sum();
    let mut current = vec![0i64; slots.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best: Option<usize> = None;
        for (i, &w) in slots.iter().enumerate() {
            if w == 0 {
                continue;
            }
            current[i] += w as i64;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        // `total > 0` implies some weight is non-zero.
        let best = best.expect("a non-zero weight");
        current[best] -= total as i64;
        order.push(best);
    }
    order
}

/// Reduces weights by their gcd, then scales them to at most `cap` slots in total.
fn fit_to_table(weights: &[u32], cap: u64) -> Vec<u64> {
    let g = weights.iter().fold(0u64, |g, &w| gcd(g, w as u64));
    if g == 0 {
        return vec![0; weights.len()];
    }
    let reduced: Vec<u64> = weights.iter().map(|&w| w as u64 / g).collect();
    let sum: u64 = reduced.iter().sum();
    if sum <= cap {
        return reduced;
    }
    let nonzero = reduced.iter().filter(|&&w| w > 0).count() as u64;
    assert!(
        nonzero <= cap,
        "more weighted backends ({nonzero}) than slots ({cap}); config validation prevents this"
    );
    // Every non-zero weight keeps one slot; the rest are shared in proportion.
    let spare = cap - nonzero;
    let mut out: Vec<u64> = reduced.iter().map(|&w| u64::from(w > 0)).collect();
    let mut remainders: Vec<(u64, usize)> = Vec::new();
    let mut given = 0;
    for (i, &w) in reduced.iter().enumerate() {
        let exact = w * spare; // share = exact / sum
        out[i] += exact / sum;
        given += exact / sum;
        remainders.push((exact % sum, i));
    }
    // Largest remainders first; ties to the earlier backend, for a stable result.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take((spare - given) as usize) {
        out[i] += 1;
    }
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(order: &[usize], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in order {
            c[i] += 1;
        }
        c
    }

    #[test]
    fn equal_weights_alternate() {
        assert_eq!(slot_order(&[1, 1, 1]), vec![0, 1, 2]);
        // Common factors are removed: the table stays short and exact.
        assert_eq!(slot_order(&[100, 100, 100]), vec![0, 1, 2]);
    }

    #[test]
    fn smooth_interleaving() {
        assert_eq!(slot_order(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(slot_order(&[2, 1]), vec![0, 1, 0]);
    }

    #[test]
    fn zero_weight_gets_no_slot() {
        assert_eq!(slot_order(&[1, 0, 1]), vec![0, 2]);
        assert!(slot_order(&[0, 0]).is_empty());
        assert!(slot_order(&[]).is_empty());
    }

    #[test]
    fn shares_are_exact_within_a_cycle() {
        let w = [3, 7, 2, 11];
        let order = slot_order(&w);
        assert_eq!(order.len(), 23);
        assert_eq!(counts(&order, 4), vec![3, 7, 2, 11]);
        // Smooth: no backend takes more than ceil(w/W * k) + 1 of any first k slots.
        for k in 1..=order.len() {
            let c = counts(&order[..k], 4);
            for (i, &wi) in w.iter().enumerate() {
                let ideal = wi as f64 * k as f64 / 23.0;
                assert!((c[i] as f64 - ideal).abs() < 1.5, "prefix {k}: {c:?}");
            }
        }
    }

    #[test]
    fn large_weights_are_scaled_into_the_table() {
        let w = [1000, 1, 999, 500];
        let order = slot_order(&w);
        assert_eq!(order.len(), SLOTS_PER_TABLE as usize);
        let c = counts(&order, 4);
        assert!(c[1] >= 1, "a non-zero weight keeps a slot: {c:?}");
        let total: u32 = w.iter().sum();
        for (i, &wi) in w.iter().enumerate() {
            let ideal = wi as f64 / total as f64 * SLOTS_PER_TABLE as f64;
            assert!((c[i] as f64 - ideal).abs() <= 1.5, "{i}: {c:?}");
        }
    }

    #[test]
    fn as_many_backends_as_slots() {
        let w: Vec<u32> = (1..=SLOTS_PER_TABLE).collect();
        let order = slot_order(&w);
        assert_eq!(order.len(), SLOTS_PER_TABLE as usize);
        assert!(counts(&order, w.len()).iter().all(|&c| c == 1));
    }
}
