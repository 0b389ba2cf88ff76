//! The kernel dead man's switch: a node answers for its VIPs only while the speaker keeps
//! refreshing a short timeout in the kernel.
//!
//! One nftables table (`netdev l2speaker_gate`) with a chain on the egress and the ingress
//! hook of every interface that carries VIPs. While the interface's element in the `live`
//! set has not timed out, nothing changes. Once it has, for every VIP in `vips4`/`vips6`:
//! - egress drops ARP of every operation sent from the VIP, neighbor solicitations and
//!   advertisements sent from it, and advertisements whose target it is. The egress hook
//!   sees the kernel's own replies *and* the speaker's raw (AF_PACKET) announcements, which
//!   the `arp`/`ip6` output hooks never see: a speaker that resumes from a freeze with a
//!   gratuitous ARP half sent cannot point clients back at itself.
//! - ingress drops traffic to the VIP (clients that still have the node's MAC cached).
//!
//! Refreshing is two netlink batches per refresh, sent by the speaker itself: no process is
//! started, and no queue sits between the decision and the kernel. The first issues a
//! *ticket* ([`TICKET`], [`TICKET_LIFE`]); then the clock is read and the timeout computed
//! from how long the speaker may still answer; the second deletes the ticket and destroys and
//! re-adds the interface's element with its timeout, in one transaction that the kernel
//! refuses if the ticket has run out. A speaker frozen between its clock and the send cannot
//! open the gate after it resumes.
//!
//! The table's layout is nft text ([`render`], applied with `nft -f` when interfaces change,
//! which is rare); the hot path (refresh, VIP membership) is hand-written netlink below,
//! because no maintained crate sends nf_tables set-element batches with timeouts.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

pub const TABLE: &str = "l2speaker_gate";
pub const LIVE: &str = "live";
pub const VIPS4: &str = "vips4";
pub const VIPS6: &str = "vips6";
/// IPv6 VIPs again, as the 128-bit integers a neighbor advertisement's target is read as.
pub const TARGETS6: &str = "targets6";
/// A refresh's ticket: added with a [`TICKET_LIFE`] timeout right before the clock is read,
/// and deleted in the refresh's own transaction, which fails if the ticket has timed out. So
/// a refresh can land at most [`TICKET_LIFE`] after the clock it was computed from, even if
/// the speaker was frozen in between.
pub const TICKET: &str = "ticket";
/// How late a refresh may land, at most.
pub const TICKET_LIFE: Duration = Duration::from_millis(10);
/// What a refresh takes off the time the gate may stay open: the ticket's life and the
/// kernel's timer granularity (a jiffy, 4 ms at HZ=250).
pub const TICKET_SLACK: Duration = Duration::from_millis(15);

/// The table for `interfaces` (names) with `vips` under it, replacing any previous one
/// atomically: one transaction holds the table, its chains and its VIP elements, so no VIP
/// is ever answered ungated while the table is rebuilt. The `live` set starts empty (the
/// gate closed): the caller reopens it with a refresh.
pub fn render(interfaces: &[String], vips: &[IpAddr]) -> String {
    let list = |f: &dyn Fn(&IpAddr) -> Option<String>| {
        let items: Vec<String> = vips.iter().filter_map(f).collect();
        if items.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", items.join(", "))
        }
    };
    let v4 = list(&|ip| ip.is_ipv4().then(|| ip.to_string()));
    let v6 = list(&|ip| ip.is_ipv6().then(|| ip.to_string()));
    let t6 = list(&|ip| match ip {
        IpAddr::V6(a) => Some(format!("0x{:032x}", u128::from(*a))),
        IpAddr::V4(_) => None,
    });
    let mut s = format!(
        "table netdev {TABLE}\ndelete table netdev {TABLE}\ntable netdev {TABLE} {{\n\
         \tset {LIVE} {{ type ifname; flags timeout; }}\n\
         \tset {TICKET} {{ type ifname; flags timeout; }}\n\
         \tset {VIPS4} {{ type ipv4_addr;{v4} }}\n\
         \tset {VIPS6} {{ type ipv6_addr;{v6} }}\n\
         \tset {TARGETS6} {{ typeof @th,64,128;{t6} }}\n"
    );
    for (i, name) in interfaces.iter().enumerate() {
        let dev = quote(name);
        s.push_str(&format!(
            "\tchain out{i} {{\n\
             \t\ttype filter hook egress device {dev} priority 0; policy accept;\n\
             \t\toifname @{LIVE} accept\n\
             \t\tarp saddr ip @{VIPS4} drop\n\
             \t\tip6 saddr @{VIPS6} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} drop\n\
             \t\ticmpv6 type nd-neighbor-advert @th,64,128 @{TARGETS6} drop\n\
             \t}}\n\
             \tchain in{i} {{\n\
             \t\ttype filter hook ingress device {dev} priority 0; policy accept;\n\
             \t\tiifname @{LIVE} accept\n\
             \t\tip daddr @{VIPS4} drop\n\
             \t\tip6 daddr @{VIPS6} drop\n\
             \t}}\n"
        ));
    }
    s.push_str("}\n");
    s
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace(['"', '\\'], ""))
}

// ---- netlink ----------------------------------------------------------------------------

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DESTROYSETELEM: u16 = 30;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 0x3;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFPROTO_NETDEV: u8 = 5;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;
const IFNAMSIZ: usize = 16;

/// One element operation in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Add (or keep) `key` in `set`, with a timeout for `live`.
    Add {
        set: &'static str,
        key: Vec<u8>,
        timeout: Option<Duration>,
    },
    /// Remove `key` from `set`; no error if it is not there.
    Destroy { set: &'static str, key: Vec<u8> },
    /// Remove `key` from `set`; the whole transaction fails (ENOENT) if it is not there or
    /// has timed out.
    Delete { set: &'static str, key: Vec<u8> },
}

/// The `live` key of an interface: its name, zero-padded as the kernel stores `ifname`.
pub fn ifname_key(name: &str) -> Vec<u8> {
    let mut k = vec![0u8; IFNAMSIZ];
    let b = &name.as_bytes()[..name.len().min(IFNAMSIZ - 1)];
    k[..b.len()].copy_from_slice(b);
    k
}

/// The sets and keys of a VIP (an IPv6 VIP is in two sets: as an address and as the
/// integer an advertisement's target is read as).
pub fn vip_keys(ip: IpAddr) -> Vec<(&'static str, Vec<u8>)> {
    match ip {
        IpAddr::V4(a) => vec![(VIPS4, a.octets().to_vec())],
        IpAddr::V6(a) => vec![
            (VIPS6, a.octets().to_vec()),
            (TARGETS6, a.octets().to_vec()),
        ],
    }
}

/// The ticket's key (one ticket per node).
pub fn ticket_key() -> Vec<u8> {
    ifname_key("refresh")
}

/// Issues a ticket (see [`TICKET`]): sent, and acknowledged, before the clock is read.
pub fn ticket_ops() -> Vec<Op> {
    vec![
        Op::Destroy {
            set: TICKET,
            key: ticket_key(),
        },
        Op::Add {
            set: TICKET,
            key: ticket_key(),
            timeout: Some(TICKET_LIFE),
        },
    ]
}

/// [`refresh_ops`] that only go through while the ticket issued before the clock was read
/// is still valid.
pub fn ticketed_refresh_ops(interfaces: &[String], timeout: Duration) -> Vec<Op> {
    let mut ops = vec![Op::Delete {
        set: TICKET,
        key: ticket_key(),
    }];
    ops.extend(refresh_ops(interfaces, timeout));
    ops
}

/// Opens the gate on `interfaces` for `timeout` (milliseconds are the kernel's granularity):
/// each element is destroyed and added again in one transaction, since adding an element
/// that exists does not restart its timeout.
pub fn refresh_ops(interfaces: &[String], timeout: Duration) -> Vec<Op> {
    let mut ops = Vec::new();
    for i in interfaces {
        ops.push(Op::Destroy {
            set: LIVE,
            key: ifname_key(i),
        });
        ops.push(Op::Add {
            set: LIVE,
            key: ifname_key(i),
            timeout: Some(timeout),
        });
    }
    ops
}

fn attr(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(payload);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn nested(out: &mut Vec<u8>, ty: u16, build: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    build(&mut inner);
    attr(out, ty | NLA_F_NESTED, &inner);
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn message(out: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, body: &[u8]) {
    let len = 16 + 4 + body.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(body);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The batch for `ops` (pure; the last message asks for an ack).
pub fn batch(ops: &[Op], first_seq: u32) -> Vec<u8> {
    let mut out = Vec::new();
    message(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        first_seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    for (n, op) in ops.iter().enumerate() {
        let (ty, set, key, timeout, create) = match op {
            Op::Add { set, key, timeout } => (NFT_MSG_NEWSETELEM, set, key, *timeout, true),
            Op::Destroy { set, key } => (NFT_MSG_DESTROYSETELEM, set, key, None, false),
            Op::Delete { set, key } => (NFT_MSG_DELSETELEM, set, key, None, false),
        };
        let mut body = Vec::new();
        attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr(TABLE));
        attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(set));
        nested(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS, |l| {
            nested(l, NFTA_LIST_ELEM, |e| {
                nested(e, NFTA_SET_ELEM_KEY, |k| attr(k, NFTA_DATA_VALUE, key));
                if let Some(t) = timeout {
                    attr(
                        e,
                        NFTA_SET_ELEM_TIMEOUT,
                        &(t.as_millis() as u64).to_be_bytes(),
                    );
                }
            });
        });
        let mut flags = NLM_F_REQUEST | if create { NLM_F_CREATE } else { 0 };
        if n + 1 == ops.len() {
            flags |= NLM_F_ACK;
        }
        message(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            flags,
            first_seq + 1 + n as u32,
            NFPROTO_NETDEV,
            0,
            &body,
        );
    }
    message(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        first_seq + 1 + ops.len() as u32,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    out
}

/// The attributes in `buf`: (type without its flags, payload).
fn attrs(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[at], buf[at + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & 0x3fff;
        if len < 4 || at + len > buf.len() {
            break;
        }
        out.push((ty, &buf[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// The live keys in one NEWSETELEM message's attributes (an element listed with no time
/// left counts as gone).
fn element_keys(body: &[u8], keys: &mut Vec<Vec<u8>>) {
    for (t, list) in attrs(body) {
        if t != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for (t, elem) in attrs(list) {
            if t != NFTA_LIST_ELEM {
                continue;
            }
            let a = attrs(elem);
            let expired = a.iter().any(|(t, v)| {
                *t == NFTA_SET_ELEM_EXPIRATION && v.len() == 8 && v.iter().all(|b| *b == 0)
            });
            let key = a
                .iter()
                .filter(|(t, _)| *t == NFTA_SET_ELEM_KEY)
                .flat_map(|(_, k)| attrs(k))
                .find(|(t, _)| *t == NFTA_DATA_VALUE)
                .map(|(_, v)| v.to_vec());
            if let (Some(k), false) = (key, expired) {
                keys.push(k);
            }
        }
    }
}

/// A netlink socket to nf_tables in the current network namespace.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a correctly sized timeval.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Netlink { fd, seq: 1 })
    }

    /// The keys in the gate's `set` now (the kernel leaves timed-out elements out): `None`
    /// when the gate's table is not there. Read over netlink, no process: what a lab sampler
    /// asks every few milliseconds.
    pub fn set_keys(&mut self, set: &str) -> io::Result<Option<Vec<Vec<u8>>>> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut body = Vec::new();
        attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr(TABLE));
        attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(set));
        let mut buf = Vec::new();
        message(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            NFPROTO_NETDEV,
            0,
            &body,
        );
        self.send(&buf)?;
        let mut keys = Vec::new();
        let mut rx = vec![0u8; 65536];
        loop {
            for m in self.receive(&mut rx)? {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => return Ok(Some(keys)),
                    NLMSG_ERROR => match m.errno() {
                        Some(e) if e == libc::ENOENT => return Ok(None),
                        Some(e) if e != 0 => return Err(io::Error::from_raw_os_error(e)),
                        _ => {}
                    },
                    _ if m.body.len() >= 4 => element_keys(&m.body[4..], &mut keys),
                    _ => {}
                }
            }
        }
    }

    /// Whether table `name` of nf_tables family `family` exists (one GETTABLE request).
    pub fn table_exists(&mut self, family: u8, name: &str) -> io::Result<bool> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut body = Vec::new();
        attr(&mut body, NFTA_TABLE_NAME, &cstr(name));
        let mut buf = Vec::new();
        message(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            family,
            0,
            &body,
        );
        self.send(&buf)?;
        let mut rx = vec![0u8; 8192];
        let mut found = false;
        loop {
            for m in self.receive(&mut rx)? {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_ERROR => {
                        return match m.errno() {
                            Some(0) => Ok(found),
                            Some(e) if e == libc::ENOENT => Ok(false),
                            Some(e) => Err(io::Error::from_raw_os_error(e)),
                            None => Err(io::Error::other("malformed netlink error")),
                        };
                    }
                    _ => found = true,
                }
            }
        }
    }

    /// Sends `ops` as one transaction and waits for the kernel's verdict (at most 1 s).
    pub fn apply(&mut self, ops: &[Op]) -> io::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let first = self.seq;
        self.seq = self.seq.wrapping_add(ops.len() as u32 + 2);
        self.send(&batch(ops, first))?;
        let last = first + ops.len() as u32;
        let mut rx = vec![0u8; 8192];
        loop {
            for m in self.receive(&mut rx)? {
                if m.ty != NLMSG_ERROR {
                    continue;
                }
                match m.errno() {
                    Some(e) if e != 0 => return Err(io::Error::from_raw_os_error(e)),
                    Some(_) if m.seq == last => return Ok(()),
                    _ => {}
                }
            }
        }
    }

    fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: buf is valid for its length; the kernel is the default destination.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram into `rx` (waiting at most 1 s) and splits it into messages.
    fn receive<'a>(&self, rx: &'a mut [u8]) -> io::Result<Vec<Message<'a>>> {
        // SAFETY: rx is valid for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), rx.as_mut_ptr().cast(), rx.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let rx = &rx[..n as usize];
        let mut out = Vec::new();
        let mut at = 0usize;
        while at + 16 <= rx.len() {
            let len = u32::from_ne_bytes(rx[at..at + 4].try_into().unwrap_or_default()) as usize;
            if len < 16 || at + len > rx.len() {
                return Err(io::Error::other("malformed netlink reply"));
            }
            out.push(Message {
                ty: u16::from_ne_bytes(rx[at + 4..at + 6].try_into().unwrap_or_default()),
                seq: u32::from_ne_bytes(rx[at + 8..at + 12].try_into().unwrap_or_default()),
                body: &rx[at + 16..at + len],
            });
            at += (len + 3) & !3;
        }
        Ok(out)
    }
}

/// One netlink message of a reply: its type, sequence number and what follows the header.
struct Message<'a> {
    ty: u16,
    seq: u32,
    body: &'a [u8],
}

impl Message<'_> {
    /// An NLMSG_ERROR's errno as a positive number (0: an ack).
    fn errno(&self) -> Option<i32> {
        let b: [u8; 4] = self.body.get(..4)?.try_into().ok()?;
        Some(-i32::from_ne_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_gates_every_way_out_on_each_interface() {
        let t = render(&["eth0".into(), "bond\"0".into()], &[]);
        assert!(t.starts_with("table netdev l2speaker_gate\ndelete table netdev l2speaker_gate\n"));
        assert!(t.contains("hook egress device \"eth0\""));
        assert!(
            t.contains("hook ingress device \"bond0\""),
            "quotes cannot be injected"
        );
        assert!(t.contains("arp saddr ip @vips4 drop"));
        assert!(t.contains("ip daddr @vips4 drop"));
    }

    #[test]
    fn a_refresh_destroys_and_re_adds_each_element_with_its_timeout() {
        let ops = refresh_ops(&["eth0".into()], Duration::from_millis(300));
        assert_eq!(ops.len(), 2);
        let b = batch(&ops, 7);
        // begin, destroy, add, end
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < b.len() {
            let len = u32::from_ne_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            kinds.push((
                u16::from_ne_bytes(b[at + 4..at + 6].try_into().unwrap()),
                u32::from_ne_bytes(b[at + 8..at + 12].try_into().unwrap()),
            ));
            at += len;
        }
        assert_eq!(kinds, vec![(0x10, 7), (0x0a1e, 8), (0x0a0c, 9), (0x11, 10)]);
        assert!(b.windows(8).any(|w| w == 300u64.to_be_bytes()));
        assert_eq!(ifname_key("eth0")[..5], *b"eth0\0");
    }
}
