//! Human units of the topology file: durations (`"500ms"`, `"1m30s"`), sizes (`"1MB"`), port
//! ranges (`"20000-20099"`), HTTP status ranges (`"200-299"`) and CIDR prefixes.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// [`parse_duration`], longer than zero (a drill's length): `None` for `"0s"` too.
pub fn parse_positive_duration(s: &str) -> Option<Duration> {
    parse_duration(s).filter(|d| !d.is_zero())
}

/// Parses `"500ms"`, `"30s"`, `"4m"`, `"1h"`, `"2d"` and sums of them such as `"1m30s"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            "d" => Duration::from_secs(n.checked_mul(86_400)?),
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(unit)?;
    }
    Some(total)
}

/// Prints a duration the way the topology file writes it: `"500ms"`, `"30s"`, `"4m"`, `"1m30s"`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = ms;
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    if rest > 0 {
        out.push_str(&format!("{rest}ms"));
    }
    out
}

/// Parses a size in bytes: `"1MB"` (10^6), `"1MiB"` (2^20), `"512KB"`, `"4096"`, `"10B"`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let mult: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// An inclusive range of TCP/UDP ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// Parses `"8080"` or `"20000-20099"`; `None` when malformed, zero or reversed.
    pub fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: u16 = a.trim().parse().ok()?;
        let last: u16 = b.trim().parse().ok()?;
        (first >= 1 && first <= last).then_some(PortRange { first, last })
    }

    /// How many ports the range holds.
    pub fn len(self) -> u32 {
        u32::from(self.last - self.first) + 1
    }

    /// Never true: a range holds at least one port.
    pub fn is_empty(self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// An inclusive range of HTTP status codes, `100..=599`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRange {
    pub first: u16,
    pub last: u16,
}

impl StatusRange {
    /// The default expectation: any 2xx.
    pub const SUCCESS: StatusRange = StatusRange {
        first: 200,
        last: 299,
    };

    /// Parses `"200"` or `"200-299"`, each within 100–599 and in order.
    pub fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: u16 = a.trim().parse().ok()?;
        let last: u16 = b.trim().parse().ok()?;
        let ok = (100..=599).contains(&first) && (100..=599).contains(&last) && first <= last;
        ok.then_some(StatusRange { first, last })
    }

    pub fn contains(self, status: u16) -> bool {
        (self.first..=self.last).contains(&status)
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// An IP prefix such as `"10.1.0.0/16"` or `"2001:db8::/32"`; a bare address is a host prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Self> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    /// Whether `ip` falls inside the prefix (never across address families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("4m"), Some(Duration::from_secs(240)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        for bad in ["", "5", "s", "1.5s", "5 sec", "-1s", "1y"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(parse_positive_duration("0s"), None);
        assert_eq!(
            parse_positive_duration("2m"),
            Some(Duration::from_secs(120))
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MB"), Some(1_000_000));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1XB"), None);
        assert_eq!(parse_size("99999999999999999999TB"), None);
    }

    #[test]
    fn ranges_and_prefixes() {
        assert_eq!(PortRange::parse("20000-20099").map(|r| r.len()), Some(100));
        assert_eq!(PortRange::parse("9-8"), None);
        assert_eq!(PortRange::parse("0"), None);
        assert!(StatusRange::parse("200-299").unwrap().contains(204));
        assert_eq!(StatusRange::parse("600"), None);
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert_eq!(Cidr::parse("10.0.0.0/33"), None);
    }

    proptest! {
        #[test]
        fn duration_round_trips(ms in 0u64..10_000_000_000) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&format_duration(d)), Some(d));
        }

        #[test]
        fn parsers_never_panic(s in ".{0,40}") {
            let _ = parse_duration(&s);
            let _ = parse_size(&s);
            let _ = PortRange::parse(&s);
            let _ = StatusRange::parse(&s);
            let _ = Cidr::parse(&s);
        }
    }
}
