//! Just enough HTTP/1.x for a probe: the response head (parsed by `httparse`) and the body's
//! framing (length, chunked, or until close). Every input is untrusted network data: malformed
//! input is a [`Failure::Http`], never a panic.

use crate::probe::Failure;

/// How the body of a response ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

const MAX_HEADERS: usize = 64;

/// Parses a response head from the start of `buf`: `Ok(None)` when more bytes are needed,
/// else the status, the head's length and the body framing.
pub fn parse_head(buf: &[u8]) -> Result<Option<(u16, usize, Framing)>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Failure::Http(e.to_string())),
    };
    let status = resp.code.unwrap_or(0);
    let mut framing = Framing::UntilClose;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let chunked = std::str::from_utf8(h.value)
                .is_ok_and(|v| v.to_ascii_lowercase().trim_end().ends_with("chunked"));
            if chunked {
                framing = Framing::Chunked;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Failure::Http("invalid Content-Length".into()))?;
            framing = Framing::Length(n);
        }
    }
    // No body, whatever the headers say.
    if matches!(status, 100..=199 | 204 | 304) {
        framing = Framing::Length(0);
    }
    Ok(Some((status, head_len, framing)))
}

/// The body bytes received so far, decoded, and whether the body is complete.
pub fn body(raw: &[u8], framing: Framing) -> Result<(Vec<u8>, bool), Failure> {
    match framing {
        Framing::Length(n) => Ok((raw[..raw.len().min(n)].to_vec(), raw.len() >= n)),
        Framing::UntilClose => Ok((raw.to_vec(), false)),
        Framing::Chunked => dechunk(raw),
    }
}

/// Decodes as much of a chunked body as has arrived.
fn dechunk(mut raw: &[u8]) -> Result<(Vec<u8>, bool), Failure> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return Ok((out, false));
        };
        let line = std::str::from_utf8(&raw[..eol]).map_err(|_| bad_chunk())?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad_chunk())?;
        if size == 0 {
            return Ok((out, true));
        }
        let data = &raw[eol + 2..];
        if data.len() < size {
            out.extend_from_slice(data);
            return Ok((out, false));
        }
        out.extend_from_slice(&data[..size]);
        let rest = &data[size..];
        if rest.len() < 2 {
            return Ok((out, false));
        }
        if &rest[..2] != b"\r\n" {
            return Err(bad_chunk());
        }
        raw = &rest[2..];
    }
}

fn bad_chunk() -> Failure {
    Failure::Http("invalid chunked encoding".into())
}

/// A header name is an RFC 9110 token.
pub fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A header value has no control characters (so no CR or LF to smuggle a header in).
pub fn valid_header_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// A request path starts with '/' and has no spaces or control characters.
pub fn valid_path(s: &str) -> bool {
    s.starts_with('/') && s.bytes().all(|b| b > 0x20 && b != 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn heads_and_framing() {
        let r = b"HTTP/1.1 503 Busy\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_head(r).unwrap(), Some((503, 40, Framing::Length(5))));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(parse_head(chunked).unwrap().unwrap().2, Framing::Chunked);
        assert!(parse_head(b"SMTP ready\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        let empty = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(parse_head(empty).unwrap().unwrap().2, Framing::Length(0));
    }

    #[test]
    fn chunked_bodies_decode_across_reads() {
        let full = b"4\r\nread\r\n3;ext=1\r\ny n\r\n2\r\now\r\n0\r\n\r\n";
        assert_eq!(dechunk(full).unwrap(), (b"ready now".to_vec(), true));
        assert_eq!(dechunk(&full[..9]).unwrap(), (b"read".to_vec(), false));
        assert_eq!(dechunk(&full[..5]).unwrap(), (b"re".to_vec(), false));
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(dechunk(b"2\r\nabXX").is_err());
    }

    #[test]
    fn header_checks() {
        assert!(valid_header_name("X-Probe"));
        assert!(!valid_header_name("X Probe"));
        assert!(valid_header_value("tandem/1.0"));
        assert!(!valid_header_value("a\r\nInjected: 1"));
        assert!(valid_path("/healthz?full=1"));
        assert!(!valid_path("/a b"));
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_head(&bytes);
            for f in [Framing::Chunked, Framing::UntilClose, Framing::Length(10)] {
                let _ = body(&bytes, f);
            }
        }
    }
}
