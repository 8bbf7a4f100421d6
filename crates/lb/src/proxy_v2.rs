//! PROXY protocol version 2 headers, so backends see the client's address
//! (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>).

use std::net::SocketAddr;

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest header [`header`] writes: IPv6 addresses, no TLVs.
pub const MAX_LEN: usize = 16 + 36;

/// Transport of the proxied connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Stream,
    Datagram,
}

/// The header for a connection from `client` to `local` (our frontend address). Mixed address
/// families (an IPv4 client on an IPv6 frontend) are sent as IPv6, the IPv4 address mapped.
pub fn header(client: SocketAddr, local: SocketAddr, transport: Transport) -> Vec<u8> {
    let proto = match transport {
        Transport::Stream => 0x1,
        Transport::Datagram => 0x2,
    };
    let mut out = Vec::with_capacity(MAX_LEN);
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            out.push(0x10 | proto);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c.ip().octets());
            out.extend_from_slice(&l.ip().octets());
        }
        _ => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(a) => a.ip().to_ipv6_mapped().octets(),
                SocketAddr::V6(a) => a.ip().octets(),
            };
            out.push(0x20 | proto);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(client));
            out.extend_from_slice(&v6(local));
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_stream_header() {
        let h = header(
            "192.0.2.1:40000".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
            Transport::Stream,
        );
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(&h[14..16], &[0, 12]);
        assert_eq!(&h[16..20], &[192, 0, 2, 1]);
        assert_eq!(&h[20..24], &[198, 51, 100, 2]);
        assert_eq!(&h[24..28], &[0x9c, 0x40, 0x01, 0xbb]);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn ipv6_and_mixed_families() {
        let h = header(
            "[2001:db8::1]:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            Transport::Datagram,
        );
        assert_eq!(h[13], 0x22);
        assert_eq!(h.len(), MAX_LEN);
        assert_eq!(&h[32 + 10..32 + 16], &[0xff, 0xff, 127, 0, 0, 1]);
    }
}
