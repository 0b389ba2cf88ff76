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
//! The table is an *owned, persistent* one ([`TABLE_F_OWNER`], [`TABLE_F_PERSIST`], Linux
//! 6.9 and later): only the speaker's own netlink socket may change it, `nft flush ruleset`
//! passes it by, and when the speaker dies it stays, closed. So everything the speaker writes
//! to it, the layout included ([`table_msgs`]), is netlink sent on that one socket, by hand,
//! because no maintained crate sends nf_tables batches with set-element timeouts or table
//! flags.

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

/// Table flags: the table belongs to the netlink socket that created it (no one else can
/// change or delete it, and `nft flush ruleset` passes it by), and it stays when that socket
/// closes (the speaker killed): orphaned, with its VIP sets and its timed-out `live` set, so
/// a dead speaker's node keeps dropping what it would answer for its VIPs.
pub const TABLE_F_OWNER: u32 = 0x2;
pub const TABLE_F_PERSIST: u32 = 0x4;

/// One nf_tables message of a batch: its type, the flags beyond `NLM_F_REQUEST`, its
/// attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub ty: u16,
    pub flags: u16,
    pub body: Vec<u8>,
}

/// The messages that replace the gate's table with one for `interfaces` (names) with `vips`
/// under it, atomically: one transaction destroys the old table (if any) and creates the
/// table, its sets with the VIPs in them, and its chains, so no VIP is ever answered
/// ungated while the table is rebuilt. The `live` set starts empty (the gate closed): the
/// caller reopens it with a refresh. `table_flags`: [`TABLE_F_OWNER`] | [`TABLE_F_PERSIST`]
/// where the kernel has them (6.9 and later).
///
/// Built as netlink, not nft text, because an owned table can only be written by the socket
/// that owns it; the rules are the ones `nft` 1.0.6 makes of
/// ```text
/// chain outN { type filter hook egress device "IF" priority 0; policy accept;
///     oifname @live accept
///     arp saddr ip @vips4 drop
///     ip6 saddr @vips6 icmpv6 type nd-neighbor-solicit drop
///     ip6 saddr @vips6 icmpv6 type nd-neighbor-advert drop
///     icmpv6 type nd-neighbor-advert @th,64,128 @targets6 drop }
/// chain inN { type filter hook ingress device "IF" priority 0; policy accept;
///     iifname @live accept
///     ip daddr @vips4 drop
///     ip6 daddr @vips6 drop }
/// ```
/// (the lab checks them against what `nft list` shows).
pub fn table_msgs(interfaces: &[String], vips: &[IpAddr], table_flags: u32) -> Vec<Msg> {
    let mut out = Vec::new();
    let mut table = Vec::new();
    attr(&mut table, NFTA_TABLE_NAME, &cstr(TABLE));
    out.push(Msg {
        ty: NFT_MSG_DESTROYTABLE,
        flags: 0,
        body: table.clone(),
    });
    attr(&mut table, NFTA_TABLE_FLAGS, &table_flags.to_be_bytes());
    out.push(Msg {
        ty: NFT_MSG_NEWTABLE,
        flags: NLM_F_CREATE,
        body: table,
    });
    let sets: [(&str, u32, u32, u32); 5] = [
        (LIVE, TYPE_IFNAME, IFNAMSIZ as u32, NFT_SET_TIMEOUT),
        (TICKET, TYPE_IFNAME, IFNAMSIZ as u32, NFT_SET_TIMEOUT),
        (VIPS4, TYPE_IPADDR, 4, 0),
        (VIPS6, TYPE_IP6ADDR, 16, 0),
        (TARGETS6, TYPE_INTEGER, 16, 0),
    ];
    for (id, (name, key_type, key_len, flags)) in sets.into_iter().enumerate() {
        let mut b = Vec::new();
        attr(&mut b, NFTA_SET_TABLE, &cstr(TABLE));
        attr(&mut b, NFTA_SET_NAME, &cstr(name));
        attr(&mut b, NFTA_SET_FLAGS, &flags.to_be_bytes());
        attr(&mut b, NFTA_SET_KEY_TYPE, &key_type.to_be_bytes());
        attr(&mut b, NFTA_SET_KEY_LEN, &key_len.to_be_bytes());
        attr(&mut b, NFTA_SET_ID, &(id as u32 + 1).to_be_bytes());
        if name == TARGETS6 {
            attr(&mut b, NFTA_SET_USERDATA, &unhex(TARGETS6_USERDATA));
        }
        out.push(Msg {
            ty: NFT_MSG_NEWSET,
            flags: NLM_F_CREATE,
            body: b,
        });
    }
    let mut keys: Vec<(&'static str, Vec<u8>)> = vips.iter().flat_map(|ip| vip_keys(*ip)).collect();
    keys.sort();
    for set in [VIPS4, VIPS6, TARGETS6] {
        let of_set: Vec<&Vec<u8>> = keys
            .iter()
            .filter(|(s, _)| *s == set)
            .map(|(_, k)| k)
            .collect();
        // A message's element list is one attribute (at most 64 KiB): a few hundred each.
        for chunk in of_set.chunks(512) {
            out.push(elements_msg(set, chunk));
        }
    }
    for (i, dev) in interfaces.iter().enumerate() {
        let out_chain = format!("out{i}");
        let in_chain = format!("in{i}");
        out.push(chain_msg(&out_chain, NF_NETDEV_EGRESS, dev));
        out.push(chain_msg(&in_chain, NF_NETDEV_INGRESS, dev));
        let ip6 = || [Expr::Meta(NFT_META_PROTOCOL), Expr::Cmp(vec![0x86, 0xdd])];
        let icmpv6_type = |t: u8| {
            [
                Expr::Meta(NFT_META_L4PROTO),
                Expr::Cmp(vec![58]),
                Expr::Payload(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1),
                Expr::Cmp(vec![t]),
            ]
        };
        let rules: Vec<(&str, Vec<Expr>)> = vec![
            (
                &out_chain,
                vec![
                    Expr::Meta(NFT_META_OIFNAME),
                    Expr::Lookup(LIVE),
                    Expr::Verdict(NF_ACCEPT),
                ],
            ),
            (
                &out_chain,
                vec![
                    Expr::Meta(NFT_META_PROTOCOL),
                    Expr::Cmp(vec![0x08, 0x06]),
                    Expr::Payload(NFT_PAYLOAD_NETWORK_HEADER, 14, 4),
                    Expr::Lookup(VIPS4),
                    Expr::Verdict(NF_DROP),
                ],
            ),
            (
                &out_chain,
                [
                    &ip6()[..],
                    &[
                        Expr::Payload(NFT_PAYLOAD_NETWORK_HEADER, 8, 16),
                        Expr::Lookup(VIPS6),
                    ],
                    &icmpv6_type(ND_NEIGHBOR_SOLICIT),
                    &[Expr::Verdict(NF_DROP)],
                ]
                .concat(),
            ),
            (
                &out_chain,
                [
                    &ip6()[..],
                    &[
                        Expr::Payload(NFT_PAYLOAD_NETWORK_HEADER, 8, 16),
                        Expr::Lookup(VIPS6),
                    ],
                    &icmpv6_type(ND_NEIGHBOR_ADVERT),
                    &[Expr::Verdict(NF_DROP)],
                ]
                .concat(),
            ),
            (
                &out_chain,
                [
                    &ip6()[..],
                    &icmpv6_type(ND_NEIGHBOR_ADVERT),
                    &[
                        Expr::Payload(NFT_PAYLOAD_TRANSPORT_HEADER, 8, 16),
                        Expr::Lookup(TARGETS6),
                        Expr::Verdict(NF_DROP),
                    ],
                ]
                .concat(),
            ),
            (
                &in_chain,
                vec![
                    Expr::Meta(NFT_META_IIFNAME),
                    Expr::Lookup(LIVE),
                    Expr::Verdict(NF_ACCEPT),
                ],
            ),
            (
                &in_chain,
                vec![
                    Expr::Meta(NFT_META_PROTOCOL),
                    Expr::Cmp(vec![0x08, 0x00]),
                    Expr::Payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4),
                    Expr::Lookup(VIPS4),
                    Expr::Verdict(NF_DROP),
                ],
            ),
            (
                &in_chain,
                [
                    &ip6()[..],
                    &[
                        Expr::Payload(NFT_PAYLOAD_NETWORK_HEADER, 24, 16),
                        Expr::Lookup(VIPS6),
                        Expr::Verdict(NF_DROP),
                    ],
                ]
                .concat(),
            ),
        ];
        for (chain, exprs) in rules {
            out.push(rule_msg(chain, &exprs));
        }
    }
    out
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect()
}

/// The messages that remove the gate's table, if there is one.
pub fn remove_msgs() -> Vec<Msg> {
    let mut table = Vec::new();
    attr(&mut table, NFTA_TABLE_NAME, &cstr(TABLE));
    vec![Msg {
        ty: NFT_MSG_DESTROYTABLE,
        flags: 0,
        body: table,
    }]
}

/// One expression of a rule (register 1 is the only data register the gate needs).
#[derive(Clone)]
enum Expr {
    Meta(u32),
    Cmp(Vec<u8>),
    /// Base, offset, length.
    Payload(u32, u32, u32),
    Lookup(&'static str),
    Verdict(u32),
}

impl Expr {
    fn encode(&self, out: &mut Vec<u8>) {
        let reg = NFT_REG_1.to_be_bytes();
        let (name, data): (&str, Vec<u8>) = match self {
            Expr::Meta(key) => {
                let mut d = Vec::new();
                attr(&mut d, NFTA_META_DREG, &reg);
                attr(&mut d, NFTA_META_KEY, &key.to_be_bytes());
                ("meta", d)
            }
            Expr::Cmp(value) => {
                let mut d = Vec::new();
                attr(&mut d, NFTA_CMP_SREG, &reg);
                attr(&mut d, NFTA_CMP_OP, &NFT_CMP_EQ.to_be_bytes());
                nested(&mut d, NFTA_CMP_DATA, |v| attr(v, NFTA_DATA_VALUE, value));
                ("cmp", d)
            }
            Expr::Payload(base, offset, len) => {
                let mut d = Vec::new();
                attr(&mut d, NFTA_PAYLOAD_DREG, &reg);
                attr(&mut d, NFTA_PAYLOAD_BASE, &base.to_be_bytes());
                attr(&mut d, NFTA_PAYLOAD_OFFSET, &offset.to_be_bytes());
                attr(&mut d, NFTA_PAYLOAD_LEN, &len.to_be_bytes());
                ("payload", d)
            }
            Expr::Lookup(set) => {
                let mut d = Vec::new();
                attr(&mut d, NFTA_LOOKUP_SET, &cstr(set));
                attr(&mut d, NFTA_LOOKUP_SREG, &reg);
                ("lookup", d)
            }
            Expr::Verdict(code) => {
                let mut d = Vec::new();
                attr(&mut d, NFTA_IMMEDIATE_DREG, &NFT_REG_VERDICT.to_be_bytes());
                nested(&mut d, NFTA_IMMEDIATE_DATA, |v| {
                    nested(v, NFTA_DATA_VERDICT, |c| {
                        attr(c, NFTA_VERDICT_CODE, &code.to_be_bytes())
                    })
                });
                ("immediate", d)
            }
        };
        nested(out, NFTA_LIST_ELEM, |e| {
            attr(e, NFTA_EXPR_NAME, &cstr(name));
            nested(e, NFTA_EXPR_DATA, |d| d.extend_from_slice(&data));
        });
    }
}

fn elements_msg(set: &str, keys: &[&Vec<u8>]) -> Msg {
    let mut b = Vec::new();
    attr(&mut b, NFTA_SET_ELEM_LIST_TABLE, &cstr(TABLE));
    attr(&mut b, NFTA_SET_ELEM_LIST_SET, &cstr(set));
    nested(&mut b, NFTA_SET_ELEM_LIST_ELEMENTS, |l| {
        for key in keys {
            nested(l, NFTA_LIST_ELEM, |e| {
                nested(e, NFTA_SET_ELEM_KEY, |k| attr(k, NFTA_DATA_VALUE, key));
            });
        }
    });
    Msg {
        ty: NFT_MSG_NEWSETELEM,
        flags: NLM_F_CREATE,
        body: b,
    }
}

fn chain_msg(name: &str, hook: u32, dev: &str) -> Msg {
    let mut b = Vec::new();
    attr(&mut b, NFTA_CHAIN_TABLE, &cstr(TABLE));
    attr(&mut b, NFTA_CHAIN_NAME, &cstr(name));
    nested(&mut b, NFTA_CHAIN_HOOK, |h| {
        attr(h, NFTA_HOOK_HOOKNUM, &hook.to_be_bytes());
        attr(h, NFTA_HOOK_PRIORITY, &0u32.to_be_bytes());
        attr(h, NFTA_HOOK_DEV, &cstr(dev));
    });
    attr(&mut b, NFTA_CHAIN_POLICY, &NF_ACCEPT.to_be_bytes());
    attr(&mut b, NFTA_CHAIN_TYPE, &cstr("filter"));
    Msg {
        ty: NFT_MSG_NEWCHAIN,
        flags: NLM_F_CREATE,
        body: b,
    }
}

fn rule_msg(chain: &str, exprs: &[Expr]) -> Msg {
    let mut b = Vec::new();
    attr(&mut b, NFTA_RULE_TABLE, &cstr(TABLE));
    attr(&mut b, NFTA_RULE_CHAIN, &cstr(chain));
    nested(&mut b, NFTA_RULE_EXPRESSIONS, |l| {
        for e in exprs {
            e.encode(l);
        }
    });
    Msg {
        ty: NFT_MSG_NEWRULE,
        flags: NLM_F_CREATE | NLM_F_APPEND,
        body: b,
    }
}

// ---- netlink ----------------------------------------------------------------------------

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DESTROYTABLE: u16 = 26;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DESTROYSETELEM: u16 = 30;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
/// What nft 1.0.6 stores with a set declared `typeof @th,64,128` (big-endian keys; the
/// key is a 128-bit payload at transport header + 8), so that `nft list` prints it so.
const TARGETS6_USERDATA: &str =
    "0004020000000326000407000000011e000400000000010400000000020403000000030440000000040480000000";
const NFT_SET_TIMEOUT: u32 = 0x10;
/// nft's datatype numbers, which `nft list` reads back from the set's key type.
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_IFNAME: u32 = 41;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_HOOK_DEV: u16 = 3;
const NF_NETDEV_INGRESS: u32 = 0;
const NF_NETDEV_EGRESS: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_PROTOCOL: u32 = 1;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const NLM_F_APPEND: u16 = 0x800;
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

/// The message of one element operation.
fn op_msg(op: &Op) -> Msg {
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
    Msg {
        ty,
        flags: if create { NLM_F_CREATE } else { 0 },
        body,
    }
}

/// The batch for element operations `ops` (pure; the last message asks for an ack).
pub fn batch(ops: &[Op], first_seq: u32) -> Vec<u8> {
    encode(&ops.iter().map(op_msg).collect::<Vec<_>>(), first_seq)
}

/// One transaction of `msgs`, numbered from `first_seq` (pure; the last message asks for
/// an ack).
pub fn encode(msgs: &[Msg], first_seq: u32) -> Vec<u8> {
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
    for (n, m) in msgs.iter().enumerate() {
        let mut flags = NLM_F_REQUEST | m.flags;
        if n + 1 == msgs.len() {
            flags |= NLM_F_ACK;
        }
        message(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | m.ty,
            flags,
            first_seq + 1 + n as u32,
            NFPROTO_NETDEV,
            0,
            &m.body,
        );
    }
    message(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        first_seq + 1 + msgs.len() as u32,
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

    /// Sends element operations `ops` as one transaction and waits for the kernel's verdict
    /// (at most 1 s).
    pub fn apply(&mut self, ops: &[Op]) -> io::Result<()> {
        self.transact(&ops.iter().map(op_msg).collect::<Vec<_>>())
    }

    /// Sends `msgs` as one transaction and waits for the kernel's verdict (at most 1 s).
    /// Replies to an earlier transaction that were still queued are told apart by their
    /// sequence numbers.
    pub fn transact(&mut self, msgs: &[Msg]) -> io::Result<()> {
        if msgs.is_empty() {
            return Ok(());
        }
        let first = self.seq;
        self.seq = self.seq.wrapping_add(msgs.len() as u32 + 2);
        self.send(&encode(msgs, first))?;
        let last = first.wrapping_add(msgs.len() as u32);
        let ours = |seq: u32| seq.wrapping_sub(first) <= msgs.len() as u32 + 1;
        let mut rx = vec![0u8; 8192];
        loop {
            for m in self.receive(&mut rx)? {
                if m.ty != NLMSG_ERROR || !ours(m.seq) {
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
    fn the_table_is_replaced_in_one_transaction_with_its_vips_and_a_chain_pair_per_interface() {
        let vips: Vec<IpAddr> = vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        let m = table_msgs(
            &["eth0".into(), "bond0".into()],
            &vips,
            TABLE_F_OWNER | TABLE_F_PERSIST,
        );
        let kinds: Vec<u16> = m.iter().map(|m| m.ty).collect();
        // destroy the old, create the new (owned, persistent), 5 sets, 3 element lists,
        // then per interface 2 chains and 8 rules.
        assert_eq!(kinds[..2], [NFT_MSG_DESTROYTABLE, NFT_MSG_NEWTABLE]);
        assert!(
            m[1].body.windows(4).any(|w| w == 6u32.to_be_bytes()),
            "owner|persist"
        );
        assert_eq!(kinds.iter().filter(|k| **k == NFT_MSG_NEWSET).count(), 5);
        assert_eq!(
            kinds.iter().filter(|k| **k == NFT_MSG_NEWSETELEM).count(),
            3
        );
        assert_eq!(kinds.iter().filter(|k| **k == NFT_MSG_NEWCHAIN).count(), 4);
        assert_eq!(kinds.iter().filter(|k| **k == NFT_MSG_NEWRULE).count(), 16);
        let first_chain = kinds.iter().position(|k| *k == NFT_MSG_NEWCHAIN).unwrap();
        let last_element = kinds
            .iter()
            .rposition(|k| *k == NFT_MSG_NEWSETELEM)
            .unwrap();
        assert!(
            last_element < first_chain,
            "the VIPs are in their sets before any hook runs"
        );
        let devs: Vec<bool> = ["eth0", "bond0"]
            .iter()
            .map(|d| {
                m.iter().any(|m| {
                    m.ty == NFT_MSG_NEWCHAIN && m.body.windows(d.len() + 1).any(|w| w == cstr(d))
                })
            })
            .collect();
        assert_eq!(devs, [true, true]);
        // With no VIPs no element list is sent (an empty list is an error).
        let empty = table_msgs(&["eth0".into()], &[], 0);
        assert!(empty.iter().all(|m| m.ty != NFT_MSG_NEWSETELEM));
    }

    #[test]
    fn a_thousand_vips_fit_in_element_lists_under_the_attribute_limit() {
        let vips: Vec<IpAddr> = (0..1000u32)
            .map(|i| IpAddr::V6(std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | i as u128)))
            .collect();
        let m = table_msgs(&["eth0".into()], &vips, 0);
        let lists: Vec<&Msg> = m.iter().filter(|m| m.ty == NFT_MSG_NEWSETELEM).collect();
        assert_eq!(lists.len(), 4, "two sets of 1,000 keys in chunks of 512");
        assert!(lists.iter().all(|m| m.body.len() < u16::MAX as usize));
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
