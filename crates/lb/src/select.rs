//! Choosing a backend for a flow: weighted rendezvous hashing over the flow's key, so every
//! flow with the same key lands on the same backend, and a pool change moves only the flows of
//! the backends that came or went (about 1/n of them).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;

use model::Distribution;

/// What identifies a flow for the distribution mode.
pub fn flow_key(mode: Distribution, client: SocketAddr, local: SocketAddr, udp: bool) -> u64 {
    // DefaultHasher::new() has fixed keys: the same key in every process and run.
    let mut h = DefaultHasher::new();
    client.ip().hash(&mut h);
    match mode {
        Distribution::SourceIp => {}
        Distribution::SourceIpProtocol => udp.hash(&mut h),
        Distribution::FiveTuple => {
            udp.hash(&mut h);
            client.port().hash(&mut h);
            local.hash(&mut h);
        }
    }
    h.finish()
}

/// The score of a backend for a flow: the highest wins. Weight scales the chance of winning.
pub fn score(key: u64, backend: SocketAddr, weight: u32) -> f64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    backend.hash(&mut h);
    // A uniform draw in (0, 1]; -weight / ln(u) is the weighted rendezvous score.
    let u = ((h.finish() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    -f64::from(weight.max(1)) / u.ln().min(-f64::MIN_POSITIVE)
}

/// The best of `candidates` (address, weight) for `key`, skipping those in `exclude`.
pub fn pick(
    key: u64,
    candidates: impl Iterator<Item = (usize, SocketAddr, u32)>,
    exclude: &[usize],
) -> Option<usize> {
    candidates
        .filter(|(i, _, _)| !exclude.contains(i))
        .map(|(i, addr, w)| (i, score(key, addr, w)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)))
            .collect()
    }

    fn choose(key: u64, pool: &[SocketAddr], weights: &[u32]) -> usize {
        let c = pool.iter().enumerate().map(|(i, a)| (i, *a, weights[i]));
        pick(key, c, &[]).unwrap()
    }

    #[test]
    fn weights_shape_the_split() {
        let pool = addrs(2);
        let mut counts = [0u32; 2];
        for k in 0..20_000u64 {
            counts[choose(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), &pool, &[1, 3])] += 1;
        }
        // Expect 15,000 of 20,000 on the weight-3 backend.
        assert!((14_400..15_600).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn removing_a_backend_moves_only_its_flows() {
        let pool = addrs(5);
        let smaller: Vec<SocketAddr> = pool[..4].to_vec();
        let mut moved = 0;
        for k in 0..10_000u64 {
            let before = pool[choose(k, &pool, &[1; 5])];
            let after = smaller[choose(k, &smaller, &[1; 4])];
            if before != after {
                assert_eq!(before, pool[4], "only flows of the removed backend move");
                moved += 1;
            }
        }
        assert!(
            (1_600..2_400).contains(&moved),
            "about a fifth moved: {moved}"
        );
    }

    #[test]
    fn source_ip_ignores_ports_and_five_tuple_does_not() {
        let local: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:2000".parse().unwrap();
        let m = Distribution::SourceIp;
        assert_eq!(flow_key(m, a, local, false), flow_key(m, b, local, false));
        let m = Distribution::FiveTuple;
        assert_ne!(flow_key(m, a, local, false), flow_key(m, b, local, false));
        let m = Distribution::SourceIpProtocol;
        assert_ne!(flow_key(m, a, local, false), flow_key(m, a, local, true));
    }
}
