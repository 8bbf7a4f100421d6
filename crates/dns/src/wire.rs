//! DNS wire format for an authoritative server: parsing a query (untrusted: every malformed
//! input is an error value, never a panic) and writing a response without allocating per query.
//!
//! The question is echoed byte for byte (so resolvers' 0x20 case randomisation survives), and
//! owner names in answers and authority are compression pointers into it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Header length.
pub const HEADER: usize = 12;
/// Longest name on the wire.
pub const MAX_NAME: usize = 255;
/// Payload a client without EDNS may receive over UDP.
pub const CLASSIC_UDP: usize = 512;
/// Our EDNS UDP payload: the size recommended to avoid fragmentation (DNS flag day 2020).
pub const EDNS_UDP: u16 = 1232;

pub mod rtype {
    pub const A: u16 = 1;
    pub const NS: u16 = 2;
    pub const CNAME: u16 = 5;
    pub const SOA: u16 = 6;
    pub const AAAA: u16 = 28;
    pub const OPT: u16 = 41;
    /// Incremental zone transfer (RFC 1995).
    pub const IXFR: u16 = 251;
    /// Zone transfer (RFC 5936).
    pub const AXFR: u16 = 252;
    /// Obsolete mailbox meta-types (RFC 1035; RFC 6895 §3.1).
    pub const MAILB: u16 = 253;
    pub const MAILA: u16 = 254;
    pub const ANY: u16 = 255;
}

pub mod rcode {
    pub const NOERROR: u8 = 0;
    pub const FORMERR: u8 = 1;
    pub const SERVFAIL: u8 = 2;
    pub const NXDOMAIN: u8 = 3;
    pub const NOTIMP: u8 = 4;
    pub const REFUSED: u8 = 5;
    /// Extended (EDNS) rcode 16: only the high bits go in the OPT record.
    pub const BADVERS: u16 = 16;
}

const CLASS_IN: u16 = 1;
const EDNS_CLIENT_SUBNET: u16 = 8;

/// EDNS Client Subnet (RFC 7871) of a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientSubnet {
    /// The address with bits past `source_prefix` zero.
    pub addr: IpAddr,
    pub source_prefix: u8,
}

/// EDNS(0) of a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edns {
    /// The client's UDP payload size (never below 512).
    pub payload: u16,
    pub version: u8,
    pub dnssec_ok: bool,
    pub subnet: Option<ClientSubnet>,
}

/// A parsed query. The name is kept lower-cased for lookups; the question bytes as sent.
#[derive(Clone, Debug)]
pub struct Query<'a> {
    pub id: u16,
    pub opcode: u8,
    pub recursion_desired: bool,
    /// The question section exactly as received (name, type, class).
    pub question: &'a [u8],
    /// The name in wire format, lower-cased.
    pub name: NameBuf,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
}

/// A lower-cased wire-format name with the offsets of its labels.
#[derive(Clone, Debug)]
pub struct NameBuf {
    bytes: [u8; MAX_NAME],
    len: u8,
    labels: [u8; 128],
    label_count: u8,
}

impl NameBuf {
    /// The whole name in wire format, ending with the root label.
    pub fn wire(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The name from its `i`-th label on (0 = the whole name).
    pub fn suffix(&self, i: usize) -> &[u8] {
        &self.bytes[self.labels[i] as usize..self.len as usize]
    }

    /// Number of labels, not counting the root.
    pub fn label_count(&self) -> usize {
        self.label_count as usize
    }

    /// Byte offset of the `i`-th label within the name.
    pub fn label_offset(&self, i: usize) -> usize {
        self.labels[i] as usize
    }
}

/// Why a query cannot be answered normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Not worth an answer: too short for a header, or a response.
    Drop,
    /// Answer with only a header: the ID, QR, the opcode echoed, this rcode, and RD when the
    /// query was a standard query that set it.
    Error {
        id: u16,
        opcode: u8,
        recursion_desired: bool,
        rcode: u8,
    },
}

/// Parses a query; `Err` says whether to drop it or to answer with an error code.
///
/// - An opcode other than QUERY: NOTIMP, no section. The reply keeps only the ID and the
///   opcode: RD and the other flags are defined for the opcodes that use them (RFC 1035
///   §4.1.1 for QUERY), so a server that does not implement an opcode has nothing to copy
///   (NSD and gdnsd copy RD here).
/// - A standard query that is malformed: FORMERR, copying RD (RFC 1035 §4.1.1). That covers a
///   question count other than one, records in the answer or authority section (a query has
///   none; an OPT record anywhere but the additional section is malformed, RFC 6891 §6.1.1),
///   more than one OPT, an OPT not owned by the root, a bad client subnet, and trailing bytes.
pub fn parse(msg: &[u8]) -> Result<Query<'_>, Reject> {
    if msg.len() < HEADER {
        return Err(Reject::Drop);
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & 0x8000 != 0 {
        return Err(Reject::Drop); // a response: answering could loop
    }
    let opcode = ((flags >> 11) & 0xf) as u8;
    let recursion_desired = flags & 0x0100 != 0;
    let error = |rcode| Reject::Error {
        id,
        opcode,
        recursion_desired,
        rcode,
    };
    if opcode != 0 {
        return Err(Reject::Error {
            id,
            opcode,
            recursion_desired: false,
            rcode: rcode::NOTIMP,
        });
    }
    let count = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
    if qd != 1 || an != 0 || ns != 0 {
        return Err(error(rcode::FORMERR));
    }
    let mut pos = HEADER;
    let name = read_question_name(msg, &mut pos).ok_or(error(rcode::FORMERR))?;
    let fixed = msg.get(pos..pos + 4).ok_or(error(rcode::FORMERR))?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    pos += 4;
    let question = &msg[HEADER..pos];
    let mut edns = None;
    for _ in 0..ar {
        let rec = read_record(msg, &mut pos).ok_or(error(rcode::FORMERR))?;
        if rec.rtype == rtype::OPT {
            if edns.is_some() || !rec.root_owner {
                return Err(error(rcode::FORMERR));
            }
            edns = Some(read_edns(&rec).ok_or(error(rcode::FORMERR))?);
        }
    }
    if pos != msg.len() {
        return Err(error(rcode::FORMERR)); // trailing garbage
    }
    Ok(Query {
        id,
        opcode,
        recursion_desired,
        question,
        name,
        qtype,
        qclass,
        edns,
    })
}

impl Query<'_> {
    pub fn is_class_in(&self) -> bool {
        self.qclass == CLASS_IN || self.qclass == 255
    }

    /// The rcode for a question of a meta-type (RFC 6895 §3.1: 128–255, and OPT) other than
    /// ANY, which no zone data answers; `None` for the data types. As BIND does: zone
    /// transfers (AXFR, IXFR) are REFUSED, since Tandem serves none; the obsolete MAILA and
    /// MAILB are NOTIMP; every other meta-type (OPT, TKEY, TSIG, unassigned ones) is FORMERR,
    /// since it cannot be a question.
    pub fn meta_rcode(&self) -> Option<u8> {
        match self.qtype {
            rtype::ANY => None,
            rtype::AXFR | rtype::IXFR => Some(rcode::REFUSED),
            rtype::MAILA | rtype::MAILB => Some(rcode::NOTIMP),
            rtype::OPT | 128..=250 => Some(rcode::FORMERR),
            _ => None,
        }
    }
}

/// The question name: plain labels only (a pointer cannot point anywhere valid from here).
fn read_question_name(msg: &[u8], pos: &mut usize) -> Option<NameBuf> {
    let mut name = NameBuf {
        bytes: [0; MAX_NAME],
        len: 0,
        labels: [0; 128],
        label_count: 0,
    };
    let mut out = 0usize;
    loop {
        let len = *msg.get(*pos)? as usize;
        if len == 0 {
            name.bytes[out] = 0;
            name.len = (out + 1) as u8;
            *pos += 1;
            return Some(name);
        }
        if len > 63 || out + 1 + len + 1 > MAX_NAME {
            return None;
        }
        let label = msg.get(*pos + 1..*pos + 1 + len)?;
        name.labels[name.label_count as usize] = out as u8;
        name.label_count += 1;
        name.bytes[out] = len as u8;
        for (dst, src) in name.bytes[out + 1..out + 1 + len].iter_mut().zip(label) {
            *dst = src.to_ascii_lowercase();
        }
        out += 1 + len;
        *pos += 1 + len;
    }
}

/// Skips a possibly compressed name.
fn skip_name(msg: &[u8], pos: &mut usize) -> Option<bool> {
    let start = *pos;
    loop {
        let len = *msg.get(*pos)?;
        match len {
            0 => {
                *pos += 1;
                return Some(*pos - start == 1);
            }
            l if l & 0xc0 == 0xc0 => {
                msg.get(*pos + 1)?;
                *pos += 2;
                return Some(false);
            }
            l if l > 63 => return None,
            l => *pos += 1 + l as usize,
        }
    }
}

struct Record<'a> {
    root_owner: bool,
    rtype: u16,
    class: u16,
    ttl: u32,
    rdata: &'a [u8],
}

fn read_record<'a>(msg: &'a [u8], pos: &mut usize) -> Option<Record<'a>> {
    let root_owner = skip_name(msg, pos)?;
    let fixed = msg.get(*pos..*pos + 10)?;
    let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let class = u16::from_be_bytes([fixed[2], fixed[3]]);
    let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
    let rdlen = u16::from_be_bytes([fixed[8], fixed[9]]) as usize;
    *pos += 10;
    let rdata = msg.get(*pos..*pos + rdlen)?;
    *pos += rdlen;
    Some(Record {
        root_owner,
        rtype,
        class,
        ttl,
        rdata,
    })
}

fn read_edns(rec: &Record<'_>) -> Option<Edns> {
    let version = (rec.ttl >> 16) as u8;
    let dnssec_ok = rec.ttl & 0x8000 != 0;
    let mut subnet = None;
    let mut opts = rec.rdata;
    while !opts.is_empty() {
        let code = u16::from_be_bytes([*opts.first()?, *opts.get(1)?]);
        let len = u16::from_be_bytes([*opts.get(2)?, *opts.get(3)?]) as usize;
        let data = opts.get(4..4 + len)?;
        if code == EDNS_CLIENT_SUBNET {
            if subnet.is_some() {
                return None;
            }
            subnet = Some(read_subnet(data)?);
        }
        opts = &opts[4 + len..];
    }
    Some(Edns {
        payload: rec.class.max(CLASSIC_UDP as u16),
        version,
        dnssec_ok,
        subnet,
    })
}

/// RFC 7871 §7.1: a query's scope must be 0, the address exactly as long as its prefix needs,
/// and the bits past the prefix zero; anything else is FORMERR.
fn read_subnet(data: &[u8]) -> Option<ClientSubnet> {
    let family = u16::from_be_bytes([*data.first()?, *data.get(1)?]);
    let source_prefix = *data.get(2)?;
    let scope = *data.get(3)?;
    let addr = data.get(4..)?;
    let max = match family {
        1 => 32,
        2 => 128,
        _ => return None,
    };
    if scope != 0 || source_prefix > max || addr.len() != usize::from(source_prefix).div_ceil(8) {
        return None;
    }
    let mut full = [0u8; 16];
    full[..addr.len()].copy_from_slice(addr);
    if source_prefix % 8 != 0 {
        let last = addr.len() - 1;
        let mask = 0xffu8 >> (source_prefix % 8);
        if full[last] & mask != 0 {
            return None;
        }
    }
    let addr = match family {
        1 => IpAddr::V4(Ipv4Addr::new(full[0], full[1], full[2], full[3])),
        _ => IpAddr::V6(Ipv6Addr::from(full)),
    };
    Some(ClientSubnet {
        addr,
        source_prefix,
    })
}

/// Encodes a dotted name (`www.shop.test`) in lower-case wire format; `None` if not a valid
/// name. Used when tables are built, never per query.
pub fn encode_name(dotted: &str) -> Option<Vec<u8>> {
    let dotted = dotted.trim_end_matches('.');
    let mut out = Vec::with_capacity(dotted.len() + 2);
    if !dotted.is_empty() {
        for label in dotted.split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    (out.len() <= MAX_NAME).then_some(out)
}

/// Prints a wire-format name as dotted text (for logs and the API).
pub fn name_to_string(wire: &[u8]) -> String {
    let mut out = String::new();
    let mut rest = wire;
    while let Some((&len, tail)) = rest.split_first() {
        if len == 0 || tail.len() < len as usize {
            break;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(&String::from_utf8_lossy(&tail[..len as usize]));
        rest = &tail[len as usize..];
    }
    out
}

/// Writes one response into a reusable buffer.
#[derive(Debug)]
pub struct Writer<'b> {
    buf: &'b mut Vec<u8>,
    answers: u16,
    authority: u16,
    additional: u16,
}

/// Pointer to the question name, which always starts right after the header.
pub const QUESTION_NAME: u16 = 0xc000 | HEADER as u16;

impl<'b> Writer<'b> {
    /// Starts a response to `q`: header (QR, the opcode, the query's RD, `rcode`) and the
    /// question. AA is set only by [`Writer::set_authoritative`].
    pub fn new(buf: &'b mut Vec<u8>, q: &Query<'_>, rcode: u8) -> Self {
        Self::start(
            buf,
            q.id,
            q.opcode,
            q.recursion_desired,
            rcode,
            Some(q.question),
        )
    }

    /// A header-only error response to a query that did not parse.
    pub fn error(buf: &'b mut Vec<u8>, id: u16, opcode: u8, rd: bool, rcode: u8) -> Self {
        Self::start(buf, id, opcode, rd, rcode, None)
    }

    fn start(
        buf: &'b mut Vec<u8>,
        id: u16,
        opcode: u8,
        rd: bool,
        rcode: u8,
        question: Option<&[u8]>,
    ) -> Self {
        buf.clear();
        let mut flags: u16 = 0x8000 | (u16::from(opcode & 0xf) << 11) | u16::from(rcode & 0xf);
        if rd {
            flags |= 0x0100;
        }
        buf.extend_from_slice(&id.to_be_bytes());
        buf.extend_from_slice(&flags.to_be_bytes());
        buf.extend_from_slice(&u16::from(question.is_some()).to_be_bytes());
        buf.extend_from_slice(&[0; 6]);
        if let Some(q) = question {
            buf.extend_from_slice(q);
        }
        Writer {
            buf,
            answers: 0,
            authority: 0,
            additional: 0,
        }
    }

    /// Sets the 4-bit rcode in the header.
    pub fn set_rcode(&mut self, rcode: u8) {
        self.buf[3] = (self.buf[3] & 0xf0) | (rcode & 0xf);
    }

    /// Sets AA: the answer comes from a zone served here.
    pub fn set_authoritative(&mut self) {
        self.buf[2] |= 0x04;
    }

    /// A compression pointer to a name written at `offset`, if one can reach it.
    pub fn pointer(offset: usize) -> Option<u16> {
        u16::try_from(offset)
            .ok()
            .filter(|o| *o < 0x4000)
            .map(|o| 0xc000 | o)
    }

    /// A record whose owner is the name at compression pointer `owner`.
    pub fn record(&mut self, owner: u16, rtype: u16, ttl: u32, rdata: &[u8]) {
        self.rr(owner, rtype, CLASS_IN, ttl, rdata);
    }

    pub fn answer(&mut self, owner: u16, rtype: u16, ttl: u32, rdata: &[u8]) {
        self.record(owner, rtype, ttl, rdata);
        self.answers += 1;
    }

    pub fn authority(&mut self, owner: u16, rtype: u16, ttl: u32, rdata: &[u8]) {
        self.record(owner, rtype, ttl, rdata);
        self.authority += 1;
    }

    /// A record of the additional section (after every answer and authority record) whose
    /// owner is the name at compression pointer `owner`.
    pub fn additional(&mut self, owner: u16, rtype: u16, ttl: u32, rdata: &[u8]) {
        self.record(owner, rtype, ttl, rdata);
        self.additional += 1;
    }

    /// A record of the additional section whose owner is written out (`name` in wire format).
    pub fn additional_named(&mut self, name: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) {
        self.buf.extend_from_slice(name);
        self.buf.extend_from_slice(&rtype.to_be_bytes());
        self.buf.extend_from_slice(&CLASS_IN.to_be_bytes());
        self.buf.extend_from_slice(&ttl.to_be_bytes());
        self.buf
            .extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(rdata);
        self.additional += 1;
    }

    fn rr(&mut self, owner: u16, rtype: u16, class: u16, ttl: u32, rdata: &[u8]) {
        self.buf.extend_from_slice(&owner.to_be_bytes());
        self.buf.extend_from_slice(&rtype.to_be_bytes());
        self.buf.extend_from_slice(&class.to_be_bytes());
        self.buf.extend_from_slice(&ttl.to_be_bytes());
        self.buf
            .extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(rdata);
    }

    /// Our OPT record: payload size, extended rcode bits, and the client subnet echoed with the
    /// scope prefix the answer depended on.
    pub fn opt(&mut self, ext_rcode: u16, subnet: Option<(ClientSubnet, u8)>) {
        let ttl = u32::from((ext_rcode >> 4) as u8) << 24;
        let mut rdata = [0u8; 4 + 4 + 16];
        let mut len = 0;
        if let Some((s, scope)) = subnet {
            let (family, octets): (u16, [u8; 16]) = match s.addr {
                IpAddr::V4(a) => {
                    let mut o = [0u8; 16];
                    o[..4].copy_from_slice(&a.octets());
                    (1, o)
                }
                IpAddr::V6(a) => (2, a.octets()),
            };
            let n = usize::from(s.source_prefix).div_ceil(8);
            rdata[..2].copy_from_slice(&EDNS_CLIENT_SUBNET.to_be_bytes());
            rdata[2..4].copy_from_slice(&((4 + n) as u16).to_be_bytes());
            rdata[4..6].copy_from_slice(&family.to_be_bytes());
            rdata[6] = s.source_prefix;
            rdata[7] = scope;
            rdata[8..8 + n].copy_from_slice(&octets[..n]);
            len = 8 + n;
        }
        self.buf.push(0); // root owner
        self.buf.extend_from_slice(&rtype::OPT.to_be_bytes());
        self.buf.extend_from_slice(&EDNS_UDP.to_be_bytes());
        self.buf.extend_from_slice(&ttl.to_be_bytes());
        self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        self.buf.extend_from_slice(&rdata[..len]);
        self.additional += 1;
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Writes the section counts. The response is complete.
    pub fn finish(self) {
        let counts = [self.answers, self.authority, self.additional];
        for (i, c) in counts.iter().enumerate() {
            let at = 6 + 2 * i;
            self.buf[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
    }

    /// Drops every record after the question and sets TC, so the client retries over TCP.
    pub fn truncate(&mut self, question_end: usize) {
        self.buf.truncate(question_end);
        self.buf[2] |= 0x02;
        self.answers = 0;
        self.authority = 0;
        self.additional = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16, extra: &[u8], arcount: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0];
        m.extend_from_slice(&arcount.to_be_bytes());
        for label in name.split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(extra);
        m
    }

    fn opt(payload: u16, version: u8, options: &[u8]) -> Vec<u8> {
        let mut o = vec![0];
        o.extend_from_slice(&rtype::OPT.to_be_bytes());
        o.extend_from_slice(&payload.to_be_bytes());
        o.extend_from_slice(&[0, version, 0, 0]);
        o.extend_from_slice(&(options.len() as u16).to_be_bytes());
        o.extend_from_slice(options);
        o
    }

    #[test]
    fn parses_a_mixed_case_query_and_keeps_the_question_as_sent() {
        let m = query("WwW.Shop.TEST", rtype::A, &[], 0);
        let q = parse(&m).unwrap();
        assert_eq!(q.id, 0x1234);
        assert!(q.recursion_desired);
        assert_eq!(q.name.wire(), &encode_name("www.shop.test").unwrap()[..]);
        assert_eq!(q.name.label_count(), 3);
        assert_eq!(q.name.suffix(1), &encode_name("shop.test").unwrap()[..]);
        assert_eq!(&q.question[1..4], b"WwW");
        assert_eq!(q.qtype, rtype::A);
        assert!(q.edns.is_none());
    }

    #[test]
    fn reads_edns_and_client_subnet() {
        let ecs = [0, 8, 0, 7, 0, 1, 24, 0, 192, 0, 2];
        let m = query("a.test", rtype::A, &opt(4096, 0, &ecs), 1);
        let e = parse(&m).unwrap().edns.unwrap();
        assert_eq!(e.payload, 4096);
        assert_eq!(
            e.subnet,
            Some(ClientSubnet {
                addr: "192.0.2.0".parse().unwrap(),
                source_prefix: 24
            })
        );
        // Bits set past the prefix, a non-zero scope, or a wrong length are FORMERR.
        for bad in [
            [0, 8, 0, 7, 0, 1, 23, 0, 192, 0, 3].to_vec(),
            [0, 8, 0, 7, 0, 1, 24, 8, 192, 0, 2].to_vec(),
            [0, 8, 0, 6, 0, 1, 24, 0, 192, 0].to_vec(),
        ] {
            let m = query("a.test", rtype::A, &opt(4096, 0, &bad), 1);
            assert!(matches!(
                parse(&m),
                Err(Reject::Error {
                    rcode: rcode::FORMERR,
                    ..
                })
            ));
        }
    }

    #[test]
    fn rejects_malformed_queries() {
        assert_eq!(parse(&[1, 2, 3]).unwrap_err(), Reject::Drop);
        let mut response = query("a.test", 1, &[], 0);
        response[2] |= 0x80;
        assert_eq!(parse(&response).unwrap_err(), Reject::Drop);
        let mut two = query("a.test", 1, &[], 0);
        two[5] = 2;
        assert!(matches!(
            parse(&two),
            Err(Reject::Error {
                rcode: rcode::FORMERR,
                ..
            })
        ));
        let truncated = &query("a.test", 1, &[], 0)[..15];
        assert!(matches!(
            parse(truncated),
            Err(Reject::Error {
                rcode: rcode::FORMERR,
                ..
            })
        ));
        let mut update = query("a.test", 1, &[], 0);
        update[2] = 0x28; // opcode 5
        assert!(matches!(
            parse(&update),
            Err(Reject::Error {
                rcode: rcode::NOTIMP,
                ..
            })
        ));
        let mut trailing = query("a.test", 1, &[], 0);
        trailing.push(0);
        assert!(parse(&trailing).is_err());
    }

    fn formerr(m: &[u8]) -> bool {
        matches!(
            parse(m),
            Err(Reject::Error {
                rcode: rcode::FORMERR,
                ..
            })
        )
    }

    #[test]
    fn an_unknown_opcode_keeps_no_flag_of_the_query() {
        for opcode in [1u8, 2, 3, 4, 5, 6, 15] {
            let mut m = query("a.test", rtype::A, &[], 0);
            m[2] = (opcode << 3) | 0x07; // AA, TC and RD set
            m[3] = 0xb0; // RA, Z, AD set
            assert_eq!(
                parse(&m).unwrap_err(),
                Reject::Error {
                    id: 0x1234,
                    opcode,
                    recursion_desired: false,
                    rcode: rcode::NOTIMP
                }
            );
        }
    }

    #[test]
    fn records_outside_the_additional_section_are_formerr() {
        let a = [0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1];
        for (count_at, record) in [(7, a.to_vec()), (9, a.to_vec()), (7, opt(1232, 0, &[]))] {
            let mut m = query("a.test", rtype::A, &record, 0);
            m[count_at] = 1;
            assert!(formerr(&m), "count at {count_at}");
        }
        // Counted but absent is FORMERR too; an OPT in the additional section is EDNS.
        let mut m = query("a.test", rtype::A, &[], 0);
        m[9] = 1;
        assert!(formerr(&m));
        assert!(
            parse(&query("a.test", rtype::A, &opt(1232, 0, &[]), 1))
                .unwrap()
                .edns
                .is_some()
        );
        let two = [opt(1232, 0, &[]), opt(1232, 0, &[])].concat();
        assert!(formerr(&query("a.test", rtype::A, &two, 2)));
        // FORMERR of a standard query copies RD.
        let mut m = query("a.test", rtype::A, &a, 0);
        m[7] = 1;
        assert!(matches!(
            parse(&m),
            Err(Reject::Error {
                opcode: 0,
                recursion_desired: true,
                ..
            })
        ));
    }

    #[test]
    fn meta_types_other_than_any_get_their_rcode() {
        let rcode_of = |t: u16| {
            let m = query("a.test", t, &[], 0);
            parse(&m).unwrap().meta_rcode()
        };
        assert_eq!(rcode_of(rtype::AXFR), Some(rcode::REFUSED));
        assert_eq!(rcode_of(rtype::IXFR), Some(rcode::REFUSED));
        assert_eq!(rcode_of(rtype::MAILA), Some(rcode::NOTIMP));
        assert_eq!(rcode_of(rtype::MAILB), Some(rcode::NOTIMP));
        for t in [rtype::OPT, 128, 200, 249, 250] {
            assert_eq!(rcode_of(t), Some(rcode::FORMERR), "type {t}");
        }
        for t in [rtype::ANY, rtype::A, rtype::SOA, 127, 256, 65535] {
            assert_eq!(rcode_of(t), None, "type {t}");
        }
    }

    #[test]
    fn writes_counts_pointers_and_truncation() {
        let m = query("www.shop.test", rtype::A, &[], 0);
        let q = parse(&m).unwrap();
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf, &q, rcode::NOERROR);
        let question_end = w.len();
        assert_eq!(w.buf[2] & 0x84, 0x80, "QR, AA only when set");
        w.set_authoritative();
        w.answer(QUESTION_NAME, rtype::A, 30, &[10, 0, 0, 1]);
        w.answer(QUESTION_NAME, rtype::A, 30, &[10, 0, 0, 2]);
        w.finish();
        assert_eq!(&buf[6..8], &[0, 2]);
        assert_eq!(buf[2] & 0x84, 0x84, "QR and AA");
        let mut w = Writer::new(&mut buf, &q, rcode::NOERROR);
        w.answer(QUESTION_NAME, rtype::A, 30, &[10, 0, 0, 1]);
        w.truncate(question_end);
        w.finish();
        assert_eq!(buf.len(), question_end);
        assert_eq!(buf[2] & 0x02, 0x02, "TC");
        assert_eq!(&buf[6..8], &[0, 0]);
    }

    #[test]
    fn names_encode_and_print() {
        assert_eq!(encode_name("A.b").unwrap(), vec![1, b'a', 1, b'b', 0]);
        assert_eq!(encode_name(".").unwrap(), vec![0]);
        assert!(encode_name("a..b").is_none());
        assert_eq!(
            name_to_string(&encode_name("www.shop.test").unwrap()),
            "www.shop.test"
        );
    }
}
