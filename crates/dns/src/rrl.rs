//! Response-rate limiting (RRL): a sans-IO limiter of UDP responses per client prefix and
//! response class, so the server cannot be used to amplify a flood toward a spoofed source.
//!
//! The rules follow BIND 9's `rate-limit` (`responses-per-second`, `slip`,
//! `ipv4-prefix-length 24`, `ipv6-prefix-length 56`) and Knot DNS's `mod-rrl` (a fixed table of
//! hashed buckets, `table-size`, `slip`):
//!
//! - A response is charged to a bucket keyed by the client's prefix and the response's
//!   [`Class`] (BIND's classification: answers by name and type, NXDOMAIN by zone, every error
//!   alike), hashed with a random key into a table of `table_size` buckets fixed at start.
//!   Keys that collide share a bucket (as in Knot): a flood of spoofed sources can only drain
//!   buckets, never refill one or grow the table.
//! - A bucket is a token bucket: it refills at `responses_per_second` and holds at most one
//!   second's worth, so a client may burst that many responses, then that many per second.
//! - Over the limit a response is dropped, except every `slip`-th limited response of the
//!   bucket, which is sent truncated ([`Verdict::Slip`]: TC, no records) so that a real client
//!   behind the spoofed address retries over TCP. Slip 0 drops them all; slip 1 truncates all.
//! - Clients in `exempt` are never limited; TCP is never limited (the server does not ask).
//!
//! Time is passed in (a [`Duration`] since any fixed origin); the limiter reads no clock.
//! Buckets are atomics: the UDP threads share one limiter without a lock.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use model::Rrl;
use model::units::Cidr;

/// What a response is, for rate limiting (BIND 9's classes, simplified).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class<'a> {
    /// A NOERROR response: the question's name (lower-case wire format) and type; type 0 for
    /// NODATA (no records), which BIND keys by name alone.
    Answer { name: &'a [u8], qtype: u16 },
    /// NXDOMAIN: the zone's apex (lower-case wire format), so that random names under a zone
    /// share one bucket per client prefix.
    NxDomain { zone: &'a [u8] },
    /// Every error (REFUSED, FORMERR, SERVFAIL, NOTIMP, BADVERS): one bucket per client prefix.
    Error,
}

/// What to do with a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit: send it.
    Send,
    /// Over the limit, and this one slips: send it truncated (TC, no records).
    Slip,
    /// Over the limit: send nothing.
    Drop,
}

/// One response's worth of credit: credit is kept in thousandths of a response.
const UNIT: u64 = 1000;
/// How far a bucket's stamp may lie in the future of the time given: threads read the clock
/// before they reach the bucket, so a slightly older time is normal. Further behind, the
/// millisecond stamp has wrapped (a bucket idle for more than 24.8 days): it is full.
const RACE_MS: i32 = 1000;

/// A bucket: the millisecond stamp of its last charge (high 32 bits, wrapping) and its credit
/// in thousandths of a response (low 32 bits); and how many of its responses were limited.
#[derive(Debug)]
struct Bucket {
    state: AtomicU64,
    limited: AtomicU32,
}

/// The limiter: configuration, the hash key and the table of buckets (`table_size` × 16
/// bytes, allocated once).
#[derive(Debug)]
pub struct Limiter<S = RandomState> {
    rate: u64,
    slip: u32,
    v4_mask: u32,
    v6_mask: u128,
    exempt: Vec<Cidr>,
    hasher: S,
    buckets: Box<[Bucket]>,
}

impl Limiter<RandomState> {
    /// A limiter for `[dns.rrl]`, hashing with a random key (an attacker cannot aim
    /// collisions at a victim's bucket).
    pub fn new(config: &Rrl) -> Self {
        Self::with_hasher(config, RandomState::new())
    }
}

impl<S: BuildHasher> Limiter<S> {
    /// A limiter hashing keys with `hasher` (a fixed one makes tests reproducible).
    pub fn with_hasher(config: &Rrl, hasher: S) -> Self {
        let rate = u64::from(config.responses_per_second.max(1));
        let full = pack(0, rate * UNIT);
        let buckets = (0..config.table_size.max(1))
            .map(|_| Bucket {
                state: AtomicU64::new(full),
                limited: AtomicU32::new(0),
            })
            .collect();
        Limiter {
            rate,
            slip: config.slip,
            v4_mask: u32::MAX
                .checked_shl(32 - u32::from(config.ipv4_prefix.min(32)))
                .unwrap_or(0),
            v6_mask: u128::MAX
                .checked_shl(128 - u32::from(config.ipv6_prefix.min(128)))
                .unwrap_or(0),
            exempt: config.exempt.clone(),
            hasher,
            buckets,
        }
    }

    /// Buckets in the table: fixed at construction, whatever the traffic.
    pub fn table_len(&self) -> usize {
        self.buckets.len()
    }

    /// Bytes the table takes: [`Limiter::table_len`] × 16.
    pub fn table_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buckets)
    }

    /// Charges one response of `class` to `client` at `now` and says what to do with it.
    pub fn check(&self, client: IpAddr, class: Class<'_>, now: Duration) -> Verdict {
        if self.exempt.iter().any(|c| c.contains(client)) {
            return Verdict::Send;
        }
        let bucket = &self.buckets[self.index(client, class)];
        // Wrapping milliseconds: a u32 stamp keeps the bucket in one atomic word.
        let now_ms = now.as_millis() as u32;
        let cap = self.rate * UNIT;
        let mut cur = bucket.state.load(Ordering::Relaxed);
        let passed = loop {
            let (stamp, credit) = unpack(cur);
            let since = now_ms.wrapping_sub(stamp) as i32;
            let (stamp, credit) = if since >= 0 {
                (now_ms, cap.min(credit + since as u64 * self.rate))
            } else if since >= -RACE_MS {
                (stamp, credit)
            } else {
                (now_ms, cap)
            };
            let (credit, passed) = match credit.checked_sub(UNIT) {
                Some(left) => (left, true),
                None => (credit, false),
            };
            let next = pack(stamp, credit);
            if next == cur {
                break passed;
            }
            match bucket.state.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break passed,
                Err(actual) => cur = actual,
            }
        };
        if passed {
            return Verdict::Send;
        }
        let n = bucket
            .limited
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        if self.slip != 0 && n.is_multiple_of(self.slip) {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }

    /// The bucket of a client prefix and class.
    fn index(&self, client: IpAddr, class: Class<'_>) -> usize {
        let mut h = self.hasher.build_hasher();
        match client {
            IpAddr::V4(a) => {
                h.write_u8(4);
                h.write_u32(u32::from(a) & self.v4_mask);
            }
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                // A v4-mapped client (a dual-stack socket) is the IPv4 client it is.
                Some(v4) => {
                    h.write_u8(4);
                    h.write_u32(u32::from(v4) & self.v4_mask);
                }
                None => {
                    h.write_u8(6);
                    h.write_u128(u128::from(a) & self.v6_mask);
                }
            },
        }
        match class {
            Class::Answer { name, qtype } => {
                h.write_u8(1);
                h.write(name);
                h.write_u16(qtype);
            }
            Class::NxDomain { zone } => {
                h.write_u8(2);
                h.write(zone);
            }
            Class::Error => h.write_u8(3),
        }
        // Multiply-shift maps the hash onto the table without a division.
        ((u128::from(h.finish()) * self.buckets.len() as u128) >> 64) as usize
    }
}

fn pack(stamp_ms: u32, credit: u64) -> u64 {
    (u64::from(stamp_ms) << 32) | (credit & u64::from(u32::MAX))
}

fn unpack(state: u64) -> (u32, u64) {
    ((state >> 32) as u32, state & u64::from(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasherDefault, DefaultHasher};

    type Fixed = BuildHasherDefault<DefaultHasher>;

    const WWW: &[u8] = b"\x03www\x04shop\x04test\x00";
    const API: &[u8] = b"\x03api\x04shop\x04test\x00";
    const A: Class<'static> = Class::Answer {
        name: WWW,
        qtype: 1,
    };

    fn config(rate: u32, slip: u32) -> Rrl {
        Rrl {
            responses_per_second: rate,
            slip,
            exempt: Vec::new(),
            ..Rrl::default()
        }
    }

    fn limiter(rate: u32, slip: u32) -> Limiter<Fixed> {
        Limiter::with_hasher(&config(rate, slip), Fixed::default())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Verdicts for `n` responses at one instant.
    fn burst(
        l: &Limiter<Fixed>,
        client: &str,
        class: Class<'_>,
        n: usize,
        at: Duration,
    ) -> Vec<Verdict> {
        (0..n).map(|_| l.check(ip(client), class, at)).collect()
    }

    fn sent(v: &[Verdict]) -> usize {
        v.iter().filter(|v| **v == Verdict::Send).count()
    }

    #[test]
    fn a_burst_of_one_second_then_the_rate() {
        let l = limiter(20, 0);
        let first = burst(&l, "192.0.2.1", A, 50, ms(10_000));
        assert_eq!(sent(&first), 20, "one second's worth at once");
        assert!(first[20..].iter().all(|v| *v == Verdict::Drop));
        // 100 ms later: 2 more (20/s); 1 s later the bucket is full again, never fuller.
        assert_eq!(sent(&burst(&l, "192.0.2.1", A, 10, ms(10_100))), 2);
        assert_eq!(sent(&burst(&l, "192.0.2.1", A, 50, ms(11_100))), 20);
        assert_eq!(sent(&burst(&l, "192.0.2.1", A, 50, ms(20_000))), 20);
        // Spread evenly at the rate, every response goes through.
        let l = limiter(20, 0);
        burst(&l, "192.0.2.1", A, 20, ms(0));
        let steady: Vec<Verdict> = (1..=100)
            .map(|i| l.check(ip("192.0.2.1"), A, ms(i * 50)))
            .collect();
        assert_eq!(sent(&steady), 100);
    }

    #[test]
    fn fractions_of_a_response_accumulate() {
        // 3 per second: one every 333.3 ms; 1 ms steps must not lose the remainders.
        let l = limiter(3, 0);
        burst(&l, "192.0.2.1", A, 3, ms(0));
        let got = (1..=3000)
            .filter(|t| l.check(ip("192.0.2.1"), A, ms(*t)) == Verdict::Send)
            .count();
        assert_eq!(got, 9, "3 per second over 3 s");
    }

    #[test]
    fn slip_sends_every_nth_limited_response_truncated() {
        for (slip, expect) in [(0, 0), (1, 30), (2, 15), (3, 10)] {
            let l = limiter(5, slip);
            let v = burst(&l, "192.0.2.1", A, 35, ms(0));
            assert_eq!(sent(&v), 5);
            let limited = &v[5..];
            let slipped: Vec<usize> = limited
                .iter()
                .enumerate()
                .filter(|(_, v)| **v == Verdict::Slip)
                .map(|(i, _)| i + 1)
                .collect();
            assert_eq!(slipped.len(), expect, "slip {slip}");
            if slip > 0 {
                assert!(
                    slipped.iter().all(|n| n % slip as usize == 0),
                    "every {slip}th: {slipped:?}"
                );
            }
            assert!(limited.iter().all(|v| *v != Verdict::Send));
        }
    }

    #[test]
    fn clients_of_one_prefix_share_a_bucket_and_other_prefixes_do_not() {
        let l = limiter(10, 0);
        assert_eq!(sent(&burst(&l, "192.0.2.1", A, 10, ms(0))), 10);
        // Same /24: already spent.
        assert_eq!(sent(&burst(&l, "192.0.2.200", A, 5, ms(0))), 0);
        // Next /24, and IPv4-mapped IPv6 of the first /24 is the same client.
        assert_eq!(sent(&burst(&l, "192.0.3.1", A, 10, ms(0))), 10);
        assert_eq!(sent(&burst(&l, "::ffff:192.0.2.9", A, 5, ms(0))), 0);
        // IPv6: one /56, whatever the host bits.
        assert_eq!(sent(&burst(&l, "2001:db8:0:1::1", A, 10, ms(0))), 10);
        assert_eq!(sent(&burst(&l, "2001:db8:0:ff:ffff::9", A, 5, ms(0))), 0);
        assert_eq!(sent(&burst(&l, "2001:db8:0:100::1", A, 10, ms(0))), 10);
    }

    #[test]
    fn classes_are_limited_apart() {
        let l = limiter(10, 0);
        let c = "192.0.2.1";
        assert_eq!(sent(&burst(&l, c, A, 20, ms(0))), 10);
        let aaaa = Class::Answer {
            name: WWW,
            qtype: 28,
        };
        let api = Class::Answer {
            name: API,
            qtype: 1,
        };
        assert_eq!(sent(&burst(&l, c, aaaa, 20, ms(0))), 10);
        assert_eq!(sent(&burst(&l, c, api, 20, ms(0))), 10);
        // Random names under a zone: one NXDOMAIN bucket; errors: one bucket.
        let nx = Class::NxDomain { zone: &WWW[4..] };
        assert_eq!(sent(&burst(&l, c, nx, 20, ms(0))), 10);
        assert_eq!(sent(&burst(&l, c, Class::Error, 20, ms(0))), 10);
    }

    #[test]
    fn exempt_clients_are_never_limited() {
        let l = Limiter::with_hasher(
            &Rrl {
                responses_per_second: 1,
                ..Rrl::default()
            },
            Fixed::default(),
        );
        assert_eq!(sent(&burst(&l, "127.0.0.2", A, 100, ms(0))), 100);
        assert_eq!(sent(&burst(&l, "::1", A, 100, ms(0))), 100);
        assert_eq!(sent(&burst(&l, "192.0.2.1", A, 100, ms(0))), 1);
    }

    #[test]
    fn the_table_is_bounded_and_spoofed_sources_never_refill_a_bucket() {
        let l = Limiter::with_hasher(
            &Rrl {
                table_size: 1024,
                ..config(5, 0)
            },
            Fixed::default(),
        );
        assert_eq!(l.table_len(), 1024);
        assert_eq!(l.table_bytes(), 1024 * 16);
        let victim = "198.51.100.7";
        assert_eq!(sent(&burst(&l, victim, A, 10, ms(0))), 5);
        // 100,000 spoofed prefixes, far more than buckets: the table stays as it was made,
        // and the victim's bucket (shared by the colliding ones) is still empty.
        for i in 0..100_000u32 {
            let spoofed = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8)));
            l.check(spoofed, A, ms(0));
        }
        assert_eq!(l.table_len(), 1024);
        assert_eq!(l.table_bytes(), 1024 * 16);
        assert_eq!(sent(&burst(&l, victim, A, 10, ms(0))), 0);
        // Time refills it as usual.
        assert_eq!(sent(&burst(&l, victim, A, 10, ms(1000))), 5);
    }

    #[test]
    fn a_slightly_older_time_from_another_thread_is_no_refill() {
        let l = limiter(10, 0);
        assert_eq!(sent(&burst(&l, "192.0.2.1", A, 10, ms(5000))), 10);
        // Another thread read the clock 3 ms earlier: nothing refills, nothing wraps.
        assert_eq!(sent(&burst(&l, "192.0.2.1", A, 5, ms(4997))), 0);
        assert_eq!(sent(&burst(&l, "192.0.2.1", A, 5, ms(5100))), 1);
    }

    #[test]
    fn a_bucket_idle_past_the_stamps_wrap_is_full() {
        let l = limiter(10, 0);
        let t0 = ms(1000);
        assert_eq!(sent(&burst(&l, "192.0.2.1", A, 10, t0)), 10);
        // 30 days later the 32-bit millisecond stamp looks far in the future.
        let later = t0 + Duration::from_secs(30 * 86_400);
        assert_eq!(sent(&burst(&l, "192.0.2.1", A, 20, later)), 10);
    }
}
